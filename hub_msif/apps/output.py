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
