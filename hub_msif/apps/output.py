"""What ``hub-msif`` prints: text safe for a terminal, and strict JSON."""

from __future__ import annotations

import json
import math
import unicodedata

from hub_msif.errors import MsifValueError

_ESCAPED_CATEGORIES = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def printable(text: object) -> str:
    """``text`` safe to print as (part of) one terminal line: control and format characters (ANSI
    escapes, bidi overrides, newlines...) and line separators become ``repr`` escapes, so a
    document, prompt or path can neither drive the terminal nor forge output lines. Tabs stay."""
    return "".join(repr(c)[1:-1] if c != "\t" and unicodedata.category(c) in _ESCAPED_CATEGORIES else c
                   for c in str(text))


def non_finite(value, path: str = "") -> str | None:
    """Where in a JSON-ready value the first NaN or infinity sits (``rows[2].score = nan``), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{path or 'the value'} = {value}"
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    return next((found for where, v in items if (found := non_finite(v, where))), None)


def print_json(value) -> None:
    """One strict JSON document on stdout. NaN and Infinity are not JSON (strict parsers refuse
    them), so a non-finite number is an error naming where it is, and nothing is printed."""
    try:
        text = json.dumps(value, indent=2, allow_nan=False)
    except ValueError as err:
        where = non_finite(value)
        if where is None:  # not a non-finite number: a bug, keep its traceback
            raise
        raise MsifValueError(f"not printed as JSON: it holds a non-finite number ({where})") from err
    print(text)


def json_line(value) -> str:
    """One strict JSON document on one line (JSON Lines), refused like ``print_json`` when it holds
    a non-finite number."""
    try:
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except ValueError as err:
        where = non_finite(value)
        if where is None:
            raise
        raise MsifValueError(f"not printed as JSON: it holds a non-finite number ({where})") from err


# Libraries' own progress bars (downloads and LFS uploads, split generation, weight loading,
# embedding batches) are never shown: a command shows at most one bar per long phase of its own,
# and only on a terminal (docs/design.md, "Command line").
_QUIET_ENVIRONMENT = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"}


def quiet_libraries() -> None:
    """Silences the progress bars of huggingface_hub, datasets and transformers: through their
    environment variables for what is imported later (and for child processes), through their
    switches for what is imported already. A variable the user set is kept."""
    import os
    import sys

    for name, value in _QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        datasets.disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def show_progress(as_json: bool = False) -> bool:
    """Whether a command shows its own progress bars: only on a terminal, and never under ``--json``."""
    import sys

    return not as_json and sys.stderr.isatty()
