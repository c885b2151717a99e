"""Running the Space: the entry point ``main()`` and the toy fact-world demo served on loopback."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import gradio as gr

from hub_msif.apps.space.page import build_app
from hub_msif.apps.space.settings import SpaceSettings, space_gradindex, space_locations
from hub_msif.errors import SpaceError

logger = logging.getLogger(__name__)


def default_cache() -> Path:
    """``HUB_MSIF_CACHE``, else ``/data/hub_msif`` (a Space's persistent storage), else ``~/.cache/hub_msif``."""
    if os.environ.get("HUB_MSIF_CACHE"):
        return Path(os.environ["HUB_MSIF_CACHE"])
    if Path("/data").is_dir() and os.access("/data", os.W_OK):
        return Path("/data/hub_msif")
    return Path.home() / ".cache" / "hub_msif"


def demo_app(cache: str | Path, settings: SpaceSettings | None = None) -> gr.Blocks:
    """The app over the toy fact world (built or reused in ``cache``), with its example questions."""
    from hub_msif.toy.demo import example_queries, prepare

    artifacts = prepare(cache)
    return build_app(artifacts["factors"], artifacts["index_folder"], example_queries(artifacts["world"]), settings,
                     title="MS-IF attribution: toy fact world")


def serve_demo(cache: str | Path, port: int | None = None, settings: SpaceSettings | None = None) -> tuple[gr.Blocks, str]:
    """Builds the fact-world app and serves it on 127.0.0.1 without blocking; returns (app, URL).

    ``port`` None takes ``GRADIO_SERVER_PORT`` or the first free port from 7860. Call
    ``app.block_thread()`` to keep serving until interrupted, ``app.close()`` to stop.
    """
    app = demo_app(cache, settings)
    app.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    if app.local_url is None:  # launch() sets it; None only before launching
        raise RuntimeError("gradio launched the demo without a local URL")
    return app, app.local_url


def main(environ: Mapping[str, str] | None = None, config: str | Path | None = None) -> None:
    """The Space entry point: serves ``MSIF_FACTORS`` and ``MSIF_INDEX`` (``REPO[@REV]`` or folders;
    a gradient index too with ``MSIF_GRADINDEX``),
    else the locations of the ``config`` file (``msif_space.json``, see ``space_locations``), with
    limits from ``MSIF_*`` (see ``SpaceSettings``); with neither, the toy fact world demo. Listens
    on ``GRADIO_SERVER_NAME`` (default 0.0.0.0 on a Space, else 127.0.0.1) and
    ``GRADIO_SERVER_PORT`` (default 7860), as Spaces do."""
    environ = os.environ if environ is None else environ
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = SpaceSettings.from_env(environ)
    try:
        factors, index = space_locations(environ, config)
        gradindex = space_gradindex(environ, config) or None
    except SpaceError as err:
        raise SystemExit(str(err)) from None
    if factors:
        logger.info("serving factors %s and index %s%s", factors, index,
                    f" and gradient index {gradindex}" if gradindex else "")
        app = build_app(factors, index, settings=settings, gradindex=gradindex)
    else:
        logger.info("MSIF_FACTORS and MSIF_INDEX are not set: serving the toy fact world demo")
        app = demo_app(default_cache() / "demo", settings)
    on_hub = bool(environ.get("SPACE_ID"))
    host = environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_hub else "127.0.0.1")
    port = int(environ.get("GRADIO_SERVER_PORT") or 7860)
    app.launch(server_name=host, server_port=port, share=False)
