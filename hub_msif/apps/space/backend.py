"""The attributor and document index behind the page: loaded on first use, shared by requests."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from hub_msif.attribution.attributor import Attributor
from hub_msif.attribution.retrieval import DocumentIndex
from hub_msif.errors import MsifError, SpaceError

logger = logging.getLogger(__name__)


class Backend:
    """The attributor and index behind the page, loaded on first use and shared by requests.

    ``factors``: a location (``REPO[@REV]`` or folder) or a ready ``Attributor``; ``index``: a
    location or a ready ``DocumentIndex``. Locations are resolved by the attributor and the index
    themselves (``hub_msif.hub.pull``). A failed load is not remembered: the next request tries
    again. Model computations run one at a time (gradient capture hooks the models). ``device``
    (``MSIF_DEVICE``, default ``auto``: CUDA when there is one when the attributor loads, on ZeroGPU
    inside a ``spaces.GPU`` call) is where the attributor puts both models and the factors.
    """

    def __init__(self, factors, index, device: str = "auto"):
        self.factors_location, self.index_location, self.device = factors, index, device
        self._attributor = factors if isinstance(factors, Attributor) else None
        self._index = index if isinstance(index, DocumentIndex) else None
        self._load_lock = threading.Lock()
        self.compute_lock = threading.Lock()

    def attributor(self, modules: str = "all", progress: Callable | None = None) -> Attributor:
        """The attributor over ``all`` modules, or its MLP-only view (``restrict("mlp")``)."""
        with self._load_lock:
            if self._attributor is None:
                report_progress(progress, 0.05, f"Getting factors from {self.factors_location} and loading the model pair")
                try:
                    self._attributor = Attributor(self.factors_location, device=self.device)
                except (MsifError, OSError, ValueError) as err:
                    raise SpaceError(f"cannot load the factors from {str(self.factors_location)!r}: "
                                     f"{one_line(err)}") from err
            if modules == self._attributor.modules:
                return self._attributor
            if modules != "mlp":
                raise SpaceError("this Space was given factors of MLP modules only: tick 'MLP modules only'")
            try:
                return self._attributor.restrict("mlp")
            except MsifError as err:
                raise SpaceError(f"{err}; untick 'MLP modules only'") from err

    def index(self, progress: Callable | None = None) -> DocumentIndex:
        with self._load_lock:
            if self._index is None:
                if self.index_location is None:
                    raise SpaceError("this Space has no document index configured (MSIF_INDEX)")
                report_progress(progress, 0.3, f"Getting the document index from {self.index_location}")
                try:
                    self._index = DocumentIndex.load(self.index_location)
                except (MsifError, OSError, ValueError) as err:
                    raise SpaceError(f"cannot load the index from {str(self.index_location)!r}: {one_line(err)}") from err
            return self._index


def report_progress(progress: Callable | None, fraction: float, desc: str) -> None:
    logger.info(desc)
    if progress is not None:
        progress(fraction, desc=desc)


def one_line(err: BaseException, limit: int = 400) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
