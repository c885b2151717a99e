"""The checks of an attribution request's arguments, defined once (no torch).

The ``Attributor``, the command line (``--damping``) and the Space (``SpaceRequests``) all check
the prompt, the number of candidates, ``top``, the method and the damping here. Each check returns
the value it accepts or raises ``ArgumentError``: a ``MsifValueError`` with the library's message,
and ``argument`` and ``problem`` so that an app can word the same refusal for its own users (the
Space's sentences, argparse's ``argument --damping: ...``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hub_msif.errors import MsifValueError

METHODS = ("ms-if", "ss-if", "gdp", "repsim", "bm25")
CANDIDATE_SOURCES = ("embedding", "gradient", "both")  # where stage one finds candidates (``candidates_from``)
DEFAULT_DAMPING = 0.1  # relative: 0.1 x mean(Lambda) per module, as in Grosse et al.


class ArgumentError(MsifValueError):
    """A refused argument. ``argument``: ``prompt``, ``candidates``, ``top``, ``method``,
    ``damping`` or ``candidates_from``; ``problem``: ``empty``, ``not_whole``, ``too_small``, ``unknown``, ``not_number``
    or ``not_positive``; ``value``: the value refused (a count as the whole number it was read as)."""

    def __init__(self, message: str, argument: str, problem: str, value=None):
        super().__init__(message)
        self.argument, self.problem, self.value = argument, problem, value


def check_prompt(prompt: str | None) -> str:
    """A prompt with something besides white space; returned as given."""
    if not prompt or not prompt.strip():
        raise ArgumentError("the prompt is empty", "prompt", "empty", prompt)
    return prompt


def check_count(value, argument: str, what: str) -> int:
    """A whole number of at least 1 (an int, or a float without a fractional part, as a form's
    number box gives it); ``what`` names it in the message."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
        raise ArgumentError(f"{what} must be a whole number, got {value!r}", argument, "not_whole", value)
    if value < 1:
        raise ArgumentError(f"{what} must be at least 1, got {int(value)}", argument, "too_small", int(value))
    return int(value)


def check_candidates(candidates) -> int:
    """How many documents to retrieve and score: at least 1 (zero leave nothing to rank)."""
    return check_count(candidates, "candidates", "the number of candidates")


def check_top(top) -> int:
    """How many ranked documents to keep: at least 1."""
    return check_count(top, "top", "top")


def check_method(method: str) -> str:
    """One of ``METHODS``."""
    if method not in METHODS:
        raise ArgumentError(f"unknown method {method!r}; use one of {', '.join(METHODS)}", "method", "unknown",
                            method)
    return method


def check_methods(methods: str | Sequence[str]) -> list[str]:
    """One method or several, each one of ``METHODS``; duplicates dropped, order kept."""
    if isinstance(methods, str):
        methods = [methods]
    if not methods:
        check_method("")
    for method in methods:
        check_method(method)
    return list(dict.fromkeys(methods))


def check_candidates_from(source: str | None) -> str | None:
    """None (the default for the indexes given) or one of ``CANDIDATE_SOURCES``."""
    if source is not None and source not in CANDIDATE_SOURCES:
        raise ArgumentError(f"candidates come from {', '.join(CANDIDATE_SOURCES)}, not {source!r}",
                            "candidates_from", "unknown", source)
    return source


def check_damping(damping) -> float:
    """A finite number above 0: 0 divides by zero where Lambda vanishes, NaN and infinity give NaN
    or all-zero scores, i.e. no ranking at all."""
    message = f"damping must be a finite number above 0, got {damping!r}"
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise ArgumentError(message, "damping", "not_number", damping)
    if not math.isfinite(damping) or damping <= 0:
        raise ArgumentError(message, "damping", "not_positive", damping)
    return float(damping)


def check_dampings(dampings: float | Sequence[float]) -> list[float]:
    """One damping or several, each ``check_damping``; duplicates dropped, order kept."""
    dampings = [dampings] if isinstance(dampings, (int, float)) else list(dampings)
    if not dampings:
        raise MsifValueError("give at least one damping")
    return list(dict.fromkeys(check_damping(d) for d in dampings))
