"""The Space's limits and defaults, read from ``MSIF_*`` environment variables, and what it serves."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from hub_msif.errors import SpaceError

logger = logging.getLogger(__name__)


@dataclass
class SpaceSettings:
    """Limits and defaults of the Space; ``from_env`` reads them from ``MSIF_*`` variables."""

    max_prompt_tokens: int = 256  # MSIF_MAX_PROMPT_TOKENS: longest prompt (and answer), in tokens
    max_candidates: int = 200  # MSIF_MAX_CANDIDATES: most candidate documents scored per request
    concurrency: int = 1  # MSIF_CONCURRENCY: requests processed at once (the rest wait in the queue)
    queue_size: int = 32  # MSIF_QUEUE_SIZE: waiting requests beyond which new ones are turned away
    default_candidates: int = 100  # MSIF_DEFAULT_CANDIDATES: the candidates slider's initial value
    top: int = 10  # MSIF_TOP: rows shown per method
    max_new_tokens: int = 32  # MSIF_MAX_NEW_TOKENS: longest generated answer
    device: str = "auto"  # MSIF_DEVICE: auto (CUDA when there is one), cpu, cuda or cuda:N (Attributor's device)

    ENV = {"max_prompt_tokens": "MSIF_MAX_PROMPT_TOKENS", "max_candidates": "MSIF_MAX_CANDIDATES",
           "concurrency": "MSIF_CONCURRENCY", "queue_size": "MSIF_QUEUE_SIZE",
           "default_candidates": "MSIF_DEFAULT_CANDIDATES", "top": "MSIF_TOP", "max_new_tokens": "MSIF_MAX_NEW_TOKENS",
           "device": "MSIF_DEVICE"}
    TEXT = ("device",)  # settings that are words, not whole numbers

    def __post_init__(self) -> None:
        from hub_msif.attribution.device import check_device_text
        from hub_msif.errors import MsifValueError

        try:
            self.device = check_device_text(self.device)
        except MsifValueError as err:
            raise SpaceError(f"MSIF_DEVICE: {err}") from None
        for f in fields(self):
            if f.name in self.TEXT:
                continue
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpaceError(f"{self.ENV[f.name]} ({f.name}) must be a whole number of at least 1, got {value!r}")
        self.default_candidates = min(self.default_candidates, self.max_candidates)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SpaceSettings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}  # keyword arguments of cls: text or whole numbers, by field
        for name, var in cls.ENV.items():
            raw = environ.get(var, "").strip()
            if raw and name in cls.TEXT:
                values[name] = raw
            elif raw:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise SpaceError(f"{var} must be a whole number, got {raw!r}") from None
        return cls(**values)


def space_locations(environ: Mapping[str, str] | None = None, config: str | Path | None = None) -> tuple[str | dict, str]:
    """``(factors, index)`` the Space serves. ``factors`` is a pair location (a string), or
    ``{"pretrained": LOC, "finetuned": LOC}`` for two stages from two places. From the variables
    ``MSIF_FACTORS`` (or ``MSIF_FACTORS_PRETRAINED`` and ``MSIF_FACTORS_FINETUNED``) and
    ``MSIF_INDEX``, else from the JSON file ``config`` (``msif_space.json``, written by ``hub-msif
    push space``: the same keys in lower case, without ``msif_``), else ``("", "")`` (the demo).
    ``SpaceError`` when the variables or the file give only some of what is needed."""
    environ = os.environ if environ is None else environ
    given = {key: environ.get(var, "").strip() for key, var in
             (("factors", "MSIF_FACTORS"), ("factors_pretrained", "MSIF_FACTORS_PRETRAINED"),
              ("factors_finetuned", "MSIF_FACTORS_FINETUNED"), ("index", "MSIF_INDEX"))}
    if any(given.values()):
        return _factors_and_index(given, "set MSIF_FACTORS (or MSIF_FACTORS_PRETRAINED and MSIF_FACTORS_FINETUNED) "
                                         "and MSIF_INDEX (REPO[@REV] or a folder), or none of them")
    if config is None or not Path(config).is_file():
        return "", ""
    try:
        data = json.loads(Path(config).read_text())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, TypeError) as err:
        raise SpaceError(f"{config} must be a JSON object with the strings 'factors' and 'index': {err}") from None
    stored = {k: data.get(k) for k in ("factors", "factors_pretrained", "factors_finetuned", "index")}
    if any(v is not None and not (isinstance(v, str) and v.strip()) for v in stored.values()):
        raise SpaceError(f"{config} must give 'factors' and 'index' as non-empty strings (REPO@REV)")
    return _factors_and_index({k: (v or "").strip() for k, v in stored.items()},
                              f"{config} must give 'factors' (or 'factors_pretrained' and 'factors_finetuned') and "
                              "'index' as non-empty strings (REPO@REV)")


def space_gradindex(environ: Mapping[str, str] | None = None, config: str | Path | None = None) -> str:
    """The gradient index the Space serves besides its document index (docs/design.md, "Gradient
    index"): ``MSIF_GRADINDEX``; else, when no ``MSIF_FACTORS*`` / ``MSIF_INDEX`` variable says what
    is served, the ``gradindex`` of the ``config`` file; else ``""`` (none)."""
    environ = os.environ if environ is None else environ
    value = environ.get("MSIF_GRADINDEX", "").strip()
    if value or any(environ.get(var, "").strip() for var in
                    ("MSIF_FACTORS", "MSIF_FACTORS_PRETRAINED", "MSIF_FACTORS_FINETUNED", "MSIF_INDEX")):
        return value
    if config is None or not Path(config).is_file():
        return ""
    try:
        data = json.loads(Path(config).read_text())
    except (OSError, ValueError):
        return ""  # space_locations says what is wrong with the file
    stored = data.get("gradindex") if isinstance(data, dict) else None
    if stored is not None and not (isinstance(stored, str) and stored.strip()):
        raise SpaceError(f"{config} must give 'gradindex' as a non-empty string (REPO@REV) when it gives one")
    return (stored or "").strip()


def _factors_and_index(given: dict, problem: str) -> tuple[str | dict, str]:
    stages = {"pretrained": given["factors_pretrained"] or given["factors"],
              "finetuned": given["factors_finetuned"] or given["factors"]}
    if not all(stages.values()) or not given["index"]:
        raise SpaceError(problem)
    factors = given["factors"] if stages["pretrained"] == stages["finetuned"] == given["factors"] else stages
    return factors, given["index"]


def model_paths(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``MSIF_MODEL_PATHS``: a JSON object ``{name: folder}`` for models that the factors record as
    local folders (by name and weights' sha256), where they lie on the Space's machine (the same as
    ``hub-msif attribute --model-path NAME=FOLDER``); empty when unset."""
    environ = os.environ if environ is None else environ
    raw = environ.get("MSIF_MODEL_PATHS", "").strip()
    if not raw:
        return {}
    try:
        paths = json.loads(raw)
        if not isinstance(paths, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in paths.items()):
            raise TypeError("not an object of strings")
    except (ValueError, TypeError) as err:
        raise SpaceError(f"MSIF_MODEL_PATHS must be a JSON object {{name: folder}}: {err}") from None
    return paths
