"""``hub-msif gradindex check``: how much of exact MS-IF's top 10 a gradient index finds in its top 100
(docs/design.md, "Gradient index").

For N queries sampled (seeded) from a query file and a seeded sample of M documents of the index's
corpus (all of them when the corpus is small), every sampled document is scored exactly (stage two:
``Attributor.score_methods``, MS-IF at the check's damping) and searched with the index restricted to
the same documents (faiss with an id selector: the index as stage one uses it, ``ivf,pq`` included).
A query's recall@10 is ``|exact top 10 ∩ index top 100| / 10``; the check's is their mean. With M at
most 100, the index's top 100 holds every sampled document and the recall is 1 by construction: the
check says so (``trivial``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hub_msif import __version__
from hub_msif.artifacts.atomic import atomic_write_json
from hub_msif.artifacts.manifest import GRADINDEX, read_manifest
from hub_msif.attribution.checks import DEFAULT_DAMPING, check_count, check_damping
from hub_msif.errors import MsifValueError, RetrievalError

EXACT_TOP = 10  # the exact top that must be found ...
INDEX_TOP = 100  # ... within the index's top
DEFAULT_CORPUS_SAMPLE = 2000  # documents scored exactly per query when the corpus is larger


@dataclass
class QueryCheck:
    """One query: its ``recall_at_10``, the exact top (``exact_top``: ids, best first) and which of them
    the index's top 100 holds (``found``)."""

    id: str | int
    prompt: str
    answer: str
    recall_at_10: float
    exact_top: list[str]
    found: list[str]


@dataclass
class GradindexCheck:
    """The check's result: the mean ``recall_at_10`` of its ``queries``, over ``corpus_sample`` of the
    index's ``num_documents`` documents, with the settings it ran with and its wall time."""

    recall_at_10: float
    queries: list[QueryCheck]
    corpus_sample: int
    num_documents: int
    seed: int
    damping: float
    relative: bool
    seconds: dict = field(default_factory=dict)

    @property
    def trivial(self) -> bool:
        """Whether the index's top 100 holds every sampled document (recall 1 by construction)."""
        return self.corpus_sample <= INDEX_TOP

    def to_json(self) -> dict:
        out = asdict(self)
        out["trivial"] = self.trivial
        out["exact_top"], out["index_top"] = EXACT_TOP, INDEX_TOP
        return out

    def record(self) -> dict:
        """What ``--record`` writes into the manifest's ``check``."""
        return {"recall_at_10": self.recall_at_10, "queries": len(self.queries), "corpus_sample": self.corpus_sample,
                "num_documents": self.num_documents, "seed": self.seed, "damping": self.damping,
                "relative": self.relative, "library_version": __version__}


def sample_rows(total: int, count: int | None, rng: random.Random) -> list[int]:
    """``count`` of ``range(total)`` drawn by ``rng`` (all when ``count`` is None or at least ``total``), sorted."""
    if count is None or count >= total:
        return list(range(total))
    return sorted(rng.sample(range(total), count))


def restricted_search(gradindex, vectors: np.ndarray, rows: Sequence[int], k: int) -> list[list[int]]:
    """Each query's top ``k`` rows of ``gradindex`` among ``rows`` only: the index's own faiss search
    (flat, or ``ivf,pq`` with its ``nprobe`` and its exact refinement of ``k_factor`` times ``k``
    candidates) through an id selector on the searched index."""
    import faiss

    if len(rows) == len(gradindex):
        return [[i for i, _ in hits] for hits in gradindex.search(vectors, k)]
    index = gradindex.faiss_index()
    refine = isinstance(index, faiss.IndexRefine)
    base = faiss.downcast_index(index.base_index) if refine else index
    selector = faiss.IDSelectorBatch(np.asarray(rows, dtype=np.int64))
    params: Any = faiss.SearchParametersIVF() if hasattr(base, "nprobe") else faiss.SearchParameters()
    params.sel = selector
    if hasattr(base, "nprobe"):
        params.nprobe = int(base.nprobe)
    if refine:  # the selector and nprobe go to the base index, whose candidates are then rescored
        base_params, params = params, faiss.IndexRefineSearchParameters()
        params.k_factor = float(index.k_factor)
        params.base_index_params = base_params
    _, found = index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(rows)), params=params)
    return [[int(i) for i in row if i >= 0] for row in found]


def check_gradindex(attributor, gradindex, queries: Sequence[tuple[str | int, str, str | None]], sample: int,
                    corpus_sample: int | None = None, seed: int = 0, damping: float = DEFAULT_DAMPING,
                    relative: bool = True) -> GradindexCheck:
    """Recall@10 of exact MS-IF's top 10 within ``gradindex``'s top 100 (module docstring).

    ``queries``: ``(id, prompt, answer)``, an answer None generated by the fine-tuned model;
    ``sample`` of them are drawn with ``seed``, and ``corpus_sample`` documents of the index
    (default: all of them up to ``DEFAULT_CORPUS_SAMPLE``, else that many) with the same generator.
    """
    check_count(sample, "sample", "the number of sampled queries")
    if corpus_sample is not None:
        check_count(corpus_sample, "corpus_sample", "the corpus sample")
    damping = check_damping(damping)
    if not queries:
        raise MsifValueError("no queries to check the gradient index with")
    rng = random.Random(seed)
    picked = [queries[i] for i in sample_rows(len(queries), sample, rng)]
    rows = sample_rows(len(gradindex), corpus_sample if corpus_sample is not None else DEFAULT_CORPUS_SAMPLE, rng)
    started = time.perf_counter()
    answered = []
    for ident, prompt, answer in picked:
        if answer is None or not answer.strip():
            answer = attributor.generate(prompt)
            if not answer.strip():
                raise MsifValueError(f"query {ident!r}: the fine-tuned model generated an empty answer; give one")
        attributor.query_sequence(prompt, answer)  # length checked before any scoring
        answered.append((prompt, answer))
    vectors = attributor.gradient_query_vectors(answered, gradindex, damping, relative)
    index_top = restricted_search(gradindex, vectors, rows, INDEX_TOP)
    index_seconds = time.perf_counter() - started
    started = time.perf_counter()
    texts = [gradindex.documents[r]["text"] for r in rows]
    columns = []
    chunk = attributor.query_chunk(len(rows), len(rows))
    for start in range(0, len(answered), chunk):
        (scores,) = attributor.score_methods(answered[start:start + chunk], texts, ["ms-if"], [damping], relative,
                                             query_batch_size=1)
        columns.append(scores.total)
    exact = torch.cat(columns, dim=1)  # [M, N]
    if not bool(torch.isfinite(exact).all()):
        raise RetrievalError("exact MS-IF gave non-finite scores; try a larger damping")
    results = []
    for q, ((ident, _, _), (prompt, answer)) in enumerate(zip(picked, answered, strict=True)):
        order = torch.argsort(exact[:, q], descending=True, stable=True)[:EXACT_TOP].tolist()
        exact_rows = [rows[i] for i in order]
        in_index = set(index_top[q])
        found = [r for r in exact_rows if r in in_index]
        ids = [gradindex.documents[r]["id"] for r in exact_rows]
        results.append(QueryCheck(ident, prompt, answer, len(found) / len(exact_rows), ids,
                                  [gradindex.documents[r]["id"] for r in found]))
    recall = float(np.mean([r.recall_at_10 for r in results]))
    return GradindexCheck(recall, results, len(rows), len(gradindex), seed, damping, relative,
                          {"index": index_seconds, "exact": time.perf_counter() - started})


def record_check(folder: str | Path, check: GradindexCheck) -> None:
    """Writes ``check.record()`` into the ``check`` of the gradient index's manifest in ``folder``,
    atomically, changing nothing else (no data file changes: every sha256 stays valid)."""
    manifest = read_manifest(Path(folder), GRADINDEX)
    manifest["check"] = check.record()
    atomic_write_json(Path(folder) / GRADINDEX.manifest_name, manifest)
