"""The attributor and document index behind the page: loaded on first use, shared by requests."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from hub_msif.apps.space.settings import model_paths
from hub_msif.attribution.attributor import Attributor
from hub_msif.attribution.retrieval import DocumentIndex
from hub_msif.errors import MsifError, SpaceError

logger = logging.getLogger(__name__)


class Backend:
    """The attributor and index behind the page, loaded on first use and shared by requests.

    ``factors``: a pair location (``REPO[@REV]`` or folder), ``{stage: location}`` of two stages, or a
    ready ``Attributor``; ``index``: a
    location or a ready ``DocumentIndex``. Locations are resolved by the attributor and the index
    themselves (``hub_msif.hub.pull``). A failed load is not remembered: the next request tries
    again. Model computations run one at a time (gradient capture hooks the models). ``device``
    (``MSIF_DEVICE``, default ``auto``: CUDA when there is one when the attributor loads, on ZeroGPU
    inside a ``spaces.GPU`` call) is where the attributor puts both models and the factors.
    ``gradindex`` (optional): a gradient index location or a ready ``GradientIndex`` of the
    pre-trained stage, for candidates from the whole corpus (docs/design.md, "Gradient index").
    """

    def __init__(self, factors, index, device: str = "auto", gradindex=None):
        self.factors_location, self.index_location, self.device = factors, index, device
        self.gradindex_location = gradindex
        self._attributor = factors if isinstance(factors, Attributor) else None
        self._index = index if isinstance(index, DocumentIndex) else None
        self._gradindex = gradindex if gradindex is not None and not isinstance(gradindex, (str, Path)) else None
        self._load_lock = threading.Lock()
        self.compute_lock = threading.Lock()

    def _loaded(self, progress: Callable | None = None) -> Attributor:
        """The attributor as loaded (over the modules its factors track)."""
        with self._load_lock:
            if self._attributor is None:
                report_progress(progress, 0.05, f"Getting factors from {self.factors_location} and loading the model pair")
                try:
                    self._attributor = Attributor(**factor_arguments(self.factors_location),
                                                  model_paths=model_paths(), device=self.device)
                except (MsifError, OSError, ValueError) as err:
                    raise SpaceError(f"cannot load the factors from {str(self.factors_location)!r}: "
                                     f"{one_line(err)}") from err
            return self._attributor

    def attributor(self, modules: str = "all", progress: Callable | None = None) -> Attributor:
        """The attributor over ``all`` modules, or its MLP-only view (``restrict("mlp")``)."""
        loaded = self._loaded(progress)  # self._attributor, set once and kept
        with self._load_lock:
            if modules == loaded.modules:
                return loaded
            if modules != "mlp":
                raise SpaceError("this Space was given factors of MLP modules only: tick 'MLP modules only'")
            try:
                return loaded.restrict("mlp")
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


    @property
    def has_gradindex(self) -> bool:
        """Whether a gradient index is configured (known before anything loads)."""
        return self.gradindex_location is not None

    def gradindex(self, progress: Callable | None = None):
        """The gradient index (loaded on first use), or None when none is configured."""
        if self.gradindex_location is None:
            return None
        with self._load_lock:
            if self._gradindex is None:
                from hub_msif.attribution.gradient_index import GradientIndex

                report_progress(progress, 0.35, f"Getting the gradient index from {self.gradindex_location}")
                try:
                    self._gradindex = GradientIndex.load(self.gradindex_location)
                except (MsifError, OSError, ValueError) as err:
                    raise SpaceError(f"cannot load the gradient index from {str(self.gradindex_location)!r}: "
                                     f"{one_line(err)}") from err
            return self._gradindex

    def describe(self, progress: Callable | None = None) -> dict:
        """What this Space serves, from what is loaded (loading it first): ``models`` ``{stage:
        "id@revision"}`` as the factors' manifest records them, ``factors`` ``{stage: location}``
        (a pair's location serves both), ``index`` (its location), ``documents`` (how many the
        index holds), ``corpus`` (where they came from; local files by their name only),
        ``modules`` and the index's ``example_questions``; ``gradindex`` (None without one): its
        ``location``, ``documents``, ``dims``, ``projection`` (kind) and recorded ``check``."""
        from hub_msif.hub.cards import public_source

        attributor, index, gradindex = self._loaded(progress), self.index(progress), self.gradindex(progress)
        corpus = public_source((index.metadata.get("corpus") or {}).get("data"))
        described = None
        if gradindex is not None:
            projection = gradindex.metadata.get("projection") or {}
            where = self.gradindex_location
            described = {"location": str(where) if isinstance(where, (str, Path)) else "a GradientIndex given in Python",
                         "documents": len(gradindex), "dims": projection.get("dims"),
                         "projection": projection.get("kind"), "check": gradindex.metadata.get("check")}
        return {
            "models": {stage: _model_ref(f.info.get("model") or {}) for stage, f in attributor.factors.items()},
            "factors": dict(attributor.locations),
            "index": "a DocumentIndex given in Python" if isinstance(self.index_location, DocumentIndex)
            else str(self.index_location),
            "documents": len(index),
            "corpus": ", ".join(map(str, corpus)) if isinstance(corpus, list) else str(corpus or "not recorded"),
            "modules": attributor.modules,
            "example_questions": index.example_questions,
            "gradindex": described,
        }


def _model_ref(recorded: dict) -> str:
    """``id@revision`` of a model as a stage's manifest records it."""
    return f"{recorded.get('id', '?')}@{recorded.get('revision') or 'unknown revision'}"


def factor_arguments(factors) -> dict:
    """The ``Attributor`` arguments for a pair location, or ``{stage: location}`` of two stages."""
    if isinstance(factors, dict):
        return {"factors_pretrained": factors["pretrained"], "factors_finetuned": factors["finetuned"]}
    return {"factors": factors}


def report_progress(progress: Callable | None, fraction: float, desc: str) -> None:
    logger.info(desc)
    if progress is not None:
        progress(fraction, desc=desc)


def one_line(err: BaseException, limit: int = 400) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
