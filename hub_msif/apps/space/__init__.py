"""The Gradio Space: attribute a fine-tuned model's answer to pre-training documents in a browser.

``settings`` (limits from ``MSIF_*``, and what the Space serves), ``gpu`` (CUDA and ZeroGPU),
``backend`` (the attributor and index, loaded on first use), ``render`` (table, chart,
highlighted snippets, token shading), ``requests`` (``SpaceRequests``: the checks and the handlers
of ``generate``, ``attribute``, ``compare`` and ``describe``), ``page`` (``build_app`` and ``layout``: the page,
its events wired to those handlers), ``run`` (``main`` and the fact-world demo) and ``app`` (the file a
pushed Space runs as ``app.py``; docs/design.md, "Space").
"""

from hub_msif.apps.space.backend import Backend
from hub_msif.apps.space.page import build_app
from hub_msif.apps.space.render import highlight, query_terms
from hub_msif.apps.space.requests import SpaceRequests
from hub_msif.apps.space.run import demo_app, main, serve_demo
from hub_msif.apps.space.settings import SpaceSettings
from hub_msif.errors import SpaceError

__all__ = ["Backend", "SpaceError", "SpaceRequests", "SpaceSettings", "build_app", "demo_app", "highlight", "main",
           "query_terms", "serve_demo"]
