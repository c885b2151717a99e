"""Hugging Face Space entry point: MS-IF attribution of a fine-tuned LLM's answers.

The Space runs ``python app.py``. ``hub-msif push space`` publishes the package's own copy of this
entry point (``hub_msif/apps/space/app.py``) with a wheel and ``msif_space.json``; this one also
runs from a checkout. Configuration: ``msif_space.json`` next to it, or the Space variables
``MSIF_FACTORS`` and ``MSIF_INDEX`` (``REPO[@REV]`` or a folder; the models are the
ones the factor manifest records), and the limits ``MSIF_MAX_PROMPT_TOKENS``,
``MSIF_MAX_CANDIDATES``, ``MSIF_CONCURRENCY`` (see README.md). With neither location set it serves
the toy fact world demo. The page itself lives in the package (``hub_msif.apps.space``) so that
``hub-msif demo --space`` and the tests build the same app in-process.
"""

import sys
from pathlib import Path

try:
    import hub_msif  # noqa: F401
except ModuleNotFoundError:  # run from a checkout of the repository without installing the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hub_msif.apps.space import SpaceSettings, build_app, main, serve_demo  # noqa: E402

__all__ = ["SpaceSettings", "build_app", "main", "serve_demo"]

if __name__ == "__main__":
    main(config=Path(__file__).resolve().with_name("msif_space.json"))
