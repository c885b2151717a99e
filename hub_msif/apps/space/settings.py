"""The Space's limits and defaults, read from ``MSIF_*`` environment variables, and what it serves."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

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
    def from_env(cls, environ: dict | None = None) -> SpaceSettings:
        environ = os.environ if environ is None else environ
        values = {}
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


def space_locations(environ: dict | None = None, config: str | Path | None = None) -> tuple[str, str]:
    """``(factors, index)`` the Space serves: ``MSIF_FACTORS`` and ``MSIF_INDEX``, else the
    ``factors`` and ``index`` of the JSON file ``config`` (``msif_space.json``, written by
    ``hub-msif push space``), else ``("", "")`` (the demo). ``SpaceError`` when only one of the
    variables is set or the file is not such a JSON object."""
    environ = os.environ if environ is None else environ
    factors, index = environ.get("MSIF_FACTORS", "").strip(), environ.get("MSIF_INDEX", "").strip()
    if bool(factors) != bool(index):
        raise SpaceError("set both MSIF_FACTORS and MSIF_INDEX (REPO[@REV] or a folder), or neither")
    if factors or config is None or not Path(config).is_file():
        return factors, index
    try:
        data = json.loads(Path(config).read_text())
        factors, index = data["factors"], data["index"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SpaceError(f"{config} must be a JSON object with the strings 'factors' and 'index': {err}") from None
    if not (isinstance(factors, str) and factors.strip() and isinstance(index, str) and index.strip()):
        raise SpaceError(f"{config} must give 'factors' and 'index' as non-empty strings (REPO@REV)")
    return factors.strip(), index.strip()
