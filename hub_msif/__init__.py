"""hub_msif: multi-stage influence functions with EK-FAC factors shared on the Hugging Face Hub.

The pipeline, one subpackage per stage (docs/design.md, "Pipeline and package layout"):
``factors`` (fit EK-FAC factors of a model pair on its corpora) -> ``artifacts`` and ``hub``
(factor and index folders, published and pulled as versioned Hub dataset repos) ->
``attribution`` (retrieve candidates, score them, rank) -> ``apps`` (the ``hub-msif`` command
line and the Gradio Space). ``toy`` holds the fact world behind the demo.

The user-facing names below are imported on first use (PEP 562), so ``import hub_msif`` stays
cheap and loads no torch until, say, ``hub_msif.Attributor`` is touched.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "Attributor": "hub_msif.attribution.attributor",
    "Attribution": "hub_msif.attribution.results",
    "ResultRow": "hub_msif.attribution.results",
    "DocumentIndex": "hub_msif.attribution.retrieval",
    "build_index": "hub_msif.attribution.retrieval",
    "GradientIndex": "hub_msif.attribution.gradient_index",
    "GradientProjection": "hub_msif.attribution.gradient_projection",
    "build_gradindex": "hub_msif.attribution.gradient_index_build",
    "FitConfig": "hub_msif.factors.fit",
    "fit_stage": "hub_msif.factors.fit",
    "CorpusSpec": "hub_msif.data",
    "push_factors": "hub_msif.hub.push",
    "push_index": "hub_msif.hub.push",
    "pull_factors": "hub_msif.hub.pull",
    "pull_index": "hub_msif.hub.pull",
    "find_factors": "hub_msif.hub.find",
    "MsifError": "hub_msif.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hub_msif' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
