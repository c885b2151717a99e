"""The attribution plan (``hub-msif attribute --plan``), for the attribution layer: it lives in
``hub_msif.factors.attribution_plan``, beside the fit's plan, so that the hub layer (the Space card)
can use it without importing upward (docs/design.md, "Device and attribution plan")."""

from hub_msif.factors.attribution_plan import (  # noqa: F401
    EXACT,
    NOT_INCLUDED,
    PHASES,
    AttributionPlan,
    format_attribution_plan,
    plan_attribution,
    plan_stages,
    stored_bytes,
)

__all__ = ["EXACT", "NOT_INCLUDED", "PHASES", "AttributionPlan", "format_attribution_plan", "plan_attribution",
           "plan_stages", "stored_bytes"]
