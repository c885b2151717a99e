"""The gradient index artifact: every document's projected pre-trained gradient, searched with faiss
(docs/design.md, "Gradient index").

The folder::

    gradindex.json                  manifest (written last): stage, projection, corpus, files + sha256
    documents.parquet               id (string), text, as the embedding index
    shards/r<rank>-<k>.safetensors  "vectors" float16 [n, dims] (unit rows), "norms" float32 [n], "rows" int64 [n]

A document's vector is ``vectors[i] * norms[i]``; its inner product with a query vector of the same
projection (``GradientProjection.query_vectors``) approximates the MS-IF score. Loading checks every
file's sha256 against the manifest over the exact bytes it parses, never unpickles, and rebuilds the
faiss index from the shards (no faiss file is ever read):

- ``flat`` (default): ``IndexFlatIP``, exact inner products;
- ``ivf,pq``: ``IVF<nlist>,PQ<m>x<nbits>`` over inner products, ``nlist = clamp(4 sqrt(N), 1, min(N / 39, 1024))``
  (faiss wants 39 training points per list; the lists' k-means runs 10 iterations on a seeded sample of
  64 points per list), ``m`` the largest divisor of ``dims`` up to ``dims / 8``
  (8 numbers per sub-quantizer), ``nbits = min(8, log2 N)``, k-means seeded with ``IVF_SEED``,
  ``nprobe = min(nlist, 64)``; the best ``4 k`` by the codes are rescored with float16 copies of the
  vectors (``IndexRefine``, as stored in the shards). ``search_parameters()`` gives them.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hub_msif.artifacts.integrity import read_verified
from hub_msif.artifacts.manifest import (
    DOCUMENTS_NAME,
    GRADINDEX,
    artifact_path,
    gradindex_files,
    read_manifest,
    stage_sha256,
)
from hub_msif.attribution.documents import documents_from_parquet
from hub_msif.attribution.embeddings import one_line
from hub_msif.attribution.gradient_defaults import ANN_CHOICES
from hub_msif.errors import IndexIntegrityError, RetrievalError

MANIFEST_NAME = GRADINDEX.manifest_name
SHARD_FOLDER = "shards"
IVF_SEED = 1234
IVF_POINTS_PER_LIST = 39  # faiss warns below 39 training points per cluster
PQ_NUMBERS_PER_CODE = 8
MAX_NLIST = 1024  # as bergson's IVF1024
TRAIN_POINTS_PER_LIST = 64
TRAIN_ITERATIONS = 10
MAX_NPROBE = 64
REFINE_FACTOR = 4  # ivf,pq: the best REFINE_FACTOR * k by the codes are rescored with the float16 vectors


def shard_name(rank: int, number: int) -> str:
    return f"{SHARD_FOLDER}/r{rank:03d}-{number:05d}.safetensors"


def ivf_pq_parameters(num_documents: int, dims: int) -> dict:
    """The ``ivf,pq`` parameters for ``num_documents`` vectors of ``dims`` numbers (see the module docstring)."""
    nlist = max(1, min(round(4 * math.sqrt(num_documents)), num_documents // IVF_POINTS_PER_LIST, MAX_NLIST))
    m = max(d for d in range(1, dims + 1) if dims % d == 0 and d <= max(1, dims // PQ_NUMBERS_PER_CODE))
    nbits = max(1, min(8, int(math.log2(max(2, num_documents)))))
    return {"nlist": nlist, "m": m, "nbits": nbits, "nprobe": min(nlist, MAX_NPROBE), "seed": IVF_SEED,
            "refine": "fp16", "refine_factor": REFINE_FACTOR}


def _faiss():
    try:
        import faiss
    except ImportError as err:
        raise RetrievalError("the gradient index needs faiss: pip install 'hub_msif[retrieval]' (faiss-cpu)") from err
    return faiss


@dataclass
class GradientIndex:
    """Documents, their projected gradients (float16 unit rows and float32 norms, in document order)
    and the manifest's metadata (``stage``, ``projection``, ``corpus``, ``num_documents``, ...)."""

    documents: list[dict]
    unit_rows: np.ndarray
    norms: np.ndarray
    metadata: dict
    ann: str = "flat"
    _faiss_index: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.metadata = copy.deepcopy(dict(self.metadata))
        if self.ann not in ANN_CHOICES:
            raise RetrievalError(f"ann must be one of {', '.join(ANN_CHOICES)}, not {self.ann!r}")
        n = len(self.documents)
        if self.unit_rows.ndim != 2 or self.unit_rows.shape[0] != n or self.norms.shape != (n,):
            raise RetrievalError(f"{n} documents but vectors {list(self.unit_rows.shape)} and norms {list(self.norms.shape)}")
        if self.metadata.get("num_documents") != n:
            raise RetrievalError(f"the manifest says {self.metadata.get('num_documents')} documents, the index has {n}")
        dims = (self.metadata.get("projection") or {}).get("dims")
        if dims != self.unit_rows.shape[1]:
            raise RetrievalError(f"the projection has {dims} dims, the vectors {self.unit_rows.shape[1]}")
        if not (np.isfinite(self.unit_rows).all() and np.isfinite(self.norms).all()) or (self.norms < 0).any():
            raise RetrievalError("the vectors or norms hold NaN, infinite or negative values")

    def __len__(self) -> int:
        return len(self.documents)

    @property
    def dims(self) -> int:
        return int(self.unit_rows.shape[1])

    def vectors(self) -> np.ndarray:
        """``[N, dims]`` float32: each document's vector (unit row times its norm)."""
        return self.unit_rows.astype(np.float32) * self.norms[:, None]

    # -- search ----------------------------------------------------------------------------------

    def search_parameters(self) -> dict:
        """``{"ann": ...}`` plus, for ``ivf,pq``, its parameters."""
        if self.ann == "flat":
            return {"ann": "flat"}
        return {"ann": self.ann} | ivf_pq_parameters(len(self), self.dims)

    def faiss_index(self):
        """The faiss index over the vectors, built on first use from the shards (never read from disk)."""
        if self._faiss_index is None:
            faiss = _faiss()
            vectors = np.ascontiguousarray(self.vectors())
            if self.ann == "flat":
                index = faiss.IndexFlatIP(self.dims)
            else:
                p = ivf_pq_parameters(len(self), self.dims)
                quantizer = faiss.IndexFlatIP(self.dims)
                index = faiss.IndexIVFPQ(quantizer, self.dims, p["nlist"], p["m"], p["nbits"],
                                         faiss.METRIC_INNER_PRODUCT)
                for clustering in (index.cp, index.pq.cp):  # seeded; few points per centroid is fine here
                    clustering.seed = p["seed"]
                    clustering.min_points_per_centroid = 1
                # k-means on a seeded sample of 64 points per list, 10 iterations: at 1M x 1000 all points
                # and faiss' 25 iterations would take hours on a CPU, for no better lists.
                index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
                index.cp.niter = TRAIN_ITERATIONS
                index.nprobe = p["nprobe"]
                exact = faiss.IndexScalarQuantizer(self.dims, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
                index = faiss.IndexRefine(index, exact)
                index.k_factor = p["refine_factor"]
                index.train(vectors)
            index.add(vectors)
            self._faiss_index = index
        return self._faiss_index

    def search(self, query_vectors: np.ndarray, k: int = 100) -> list[list[tuple[int, float]]]:
        """For each query vector (``[Q, dims]``, from ``GradientProjection.query_vectors``), up to ``k``
        ``(document index, score)`` pairs, best first; the score approximates MS-IF. ``k`` above the
        number of documents is clamped."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise RetrievalError(f"k must be a positive integer, got {k!r}")
        queries = np.asarray(query_vectors, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if queries.ndim != 2 or queries.shape[0] == 0:
            raise RetrievalError("no query vectors given")
        if queries.shape[1] != self.dims:
            raise RetrievalError(f"wrong dimension: query vectors have {queries.shape[1]}, the gradient index {self.dims}")
        if not np.isfinite(queries).all():
            raise RetrievalError("the query vectors hold NaN or infinite values")
        scores, indices = self.faiss_index().search(np.ascontiguousarray(queries), min(int(k), len(self)))
        return [[(int(i), float(s)) for i, s in zip(row_i, row_s, strict=True) if i >= 0 and math.isfinite(s)]
                for row_i, row_s in zip(indices, scores, strict=True)]

    # -- the stage it belongs to -----------------------------------------------------------------

    def check_stage(self, stage_factors_info: dict, location: str | None = None) -> None:
        """Raises ``RetrievalError`` (one line, naming both models as id@revision) unless the index was
        built from exactly these factors (the stage's manifest entry, by its sha256)."""
        built = self.metadata.get("stage") or {}
        if stage_sha256(stage_factors_info) == built.get("manifest_sha256"):
            return
        ours, theirs = built.get("model") or {}, stage_factors_info.get("model") or {}
        where = f" ({location})" if location else ""
        raise RetrievalError(
            f"the gradient index was built for the {built.get('name', 'pretrained')} factors of "
            f"{ours.get('id')}@{ours.get('revision')} ({built.get('location')}), not for the factors given{where} "
            f"of {theirs.get('id')}@{theirs.get('revision')}: build an index for these factors (hub-msif gradindex build)")

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, location, token: str | None = None, ann: str | None = None) -> GradientIndex:
        """Reads a gradient index folder (or ``REPO[@REV]``, pulled), checking every file's sha256
        against the manifest. ``ann`` overrides the search the manifest records."""
        from safetensors import SafetensorError
        from safetensors.numpy import load as st_load

        from hub_msif.hub.pull import pull_gradindex

        folder = Path(pull_gradindex(location, token=token))
        manifest = read_manifest(folder, GRADINDEX)
        try:
            files = gradindex_files(manifest)
        except RetrievalError as err:
            raise RetrievalError(f"{folder}: {err}") from None
        payloads = {}
        for name, sha256 in files.items():
            path = artifact_path(folder, name, GRADINDEX)  # checked before the file is opened
            if not path.is_file():
                raise RetrievalError(f"gradient index folder {folder} is missing {name}")
            payloads[name] = read_verified(path, sha256, IndexIntegrityError)
        documents = documents_from_parquet(payloads.pop(DOCUMENTS_NAME), folder / DOCUMENTS_NAME)
        n = len(documents)
        dims = (manifest.get("projection") or {}).get("dims")
        if not isinstance(dims, int) or dims < 1:
            raise RetrievalError(f"{folder / MANIFEST_NAME}: the projection records no dims")
        units = np.zeros((n, dims), dtype=np.float16)
        norms = np.zeros(n, dtype=np.float32)
        seen = np.zeros(n, dtype=bool)
        for name in sorted(payloads):
            try:
                tensors = st_load(payloads[name])
            except (SafetensorError, ValueError) as err:
                raise RetrievalError(f"{folder / name} cannot be read: {one_line(err)}") from None
            vectors, lengths, rows = (tensors.get(key) for key in ("vectors", "norms", "rows"))
            if vectors is None or lengths is None or rows is None or vectors.dtype != np.float16 \
                    or lengths.dtype != np.float32 or rows.dtype != np.int64 or vectors.ndim != 2 \
                    or vectors.shape[1] != dims or lengths.shape != rows.shape or rows.shape != vectors.shape[:1]:
                raise RetrievalError(f"{folder / name} is not a gradient index shard of {dims} dims")
            if rows.size and (rows.min() < 0 or rows.max() >= n or seen[rows].any() or len(set(rows.tolist())) != rows.size):
                raise RetrievalError(f"{folder / name} holds rows outside the {n} documents, or rows listed twice")
            units[rows], norms[rows], seen[rows] = vectors, lengths, True
        if not seen.all():
            raise RetrievalError(f"{folder}: the shards hold no vector for {int((~seen).sum())} of {n} documents")
        metadata = {k: v for k, v in manifest.items() if k not in ("format", "format_version", "files")}
        chosen = ann or (manifest.get("search") or {}).get("ann", "flat")
        return cls(documents, units, norms, metadata, chosen)
