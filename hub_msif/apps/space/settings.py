"""The Space's limits and defaults, read from ``MSIF_*`` environment variables."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, fields

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

    ENV = {"max_prompt_tokens": "MSIF_MAX_PROMPT_TOKENS", "max_candidates": "MSIF_MAX_CANDIDATES",
           "concurrency": "MSIF_CONCURRENCY", "queue_size": "MSIF_QUEUE_SIZE",
           "default_candidates": "MSIF_DEFAULT_CANDIDATES", "top": "MSIF_TOP", "max_new_tokens": "MSIF_MAX_NEW_TOKENS"}

    def __post_init__(self) -> None:
        for f in fields(self):
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
            if raw:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise SpaceError(f"{var} must be a whole number, got {raw!r}") from None
        return cls(**values)
