"""Stage one of an attribution: which documents stage two scores exactly (docs/design.md, "Gradient index").

Candidates come from the embedding index (the documents whose sentence embeddings are nearest to the
prompt and answer text), from the gradient index (the documents whose compressed, pre-trained-stage
gradients have the largest inner product with the query's projected multi-stage vector: MS-IF itself,
compressed, over the whole corpus), or from both (the union of the two top N). ``StageOne`` records
how a query's candidates were found; ``Attributor`` runs the searches and then scores the candidates
exactly (stage two).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from hub_msif.attribution.checks import CANDIDATE_SOURCES, check_candidates_from
from hub_msif.attribution.scoring import per_example_gradients
from hub_msif.errors import MsifValueError
from hub_msif.factors.storage import StageFactors

if TYPE_CHECKING:
    from hub_msif.attribution.gradient_projection import GradientProjection


@dataclass
class StageOne:
    """How one query's candidates were found: ``source`` (``embedding``, ``gradient`` or ``both``),
    ``candidates`` (how many documents stage two scored), ``searched`` (``{"embedding": N,
    "gradient": N}``: how many documents each index searched holds), ``seconds`` (the search's wall time, the query's
    gradient and projection included) and ``check`` (the gradient index's last recorded ``gradindex
    check``: ``recall_at_10`` and its settings; None when none is recorded or no gradient index was
    searched)."""

    source: str
    candidates: int
    searched: dict[str, int]
    seconds: float
    check: dict | None = None

    def to_json(self) -> dict:
        out: dict = {"source": self.source, "candidates": self.candidates, "searched": dict(self.searched),
                     "seconds": self.seconds}
        if self.check is not None:
            out["check"] = dict(self.check)
        return out


def choose_source(candidates_from: str | None, index, gradindex) -> str:
    """The candidate source: ``candidates_from`` when given (checked against the indexes there are),
    else ``gradient`` when there is a gradient index, else ``embedding`` (docs/design.md, "Gradient
    index": with both indexes and no choice, the gradient index, whose stage one ranks by the same
    score as stage two)."""
    source = check_candidates_from(candidates_from)
    if source is None:
        source = "gradient" if gradindex is not None else "embedding"
    needs = {"embedding": ("embedding",), "gradient": ("gradient",), "both": ("embedding", "gradient")}[source]
    if "embedding" in needs and index is None:
        raise MsifValueError("give candidate documents or an index to retrieve them from" if candidates_from is None
                             else f"candidates from {source} need a document index (index=, --index)")
    if "gradient" in needs and gradindex is None:
        raise MsifValueError(f"candidates from {source} need a gradient index (gradindex=, --gradindex)")
    return source


def recorded_check(gradindex) -> dict | None:
    """The last ``gradindex check`` the gradient index's manifest records, or None."""
    check = (getattr(gradindex, "metadata", None) or {}).get("check")
    return dict(check) if isinstance(check, dict) else None


def index_projection(gradindex, pretrained: StageFactors, where: str) -> GradientProjection:
    """The projection a gradient index was built with, remade from its manifest over the pre-trained
    stage's factors (``pretrained``, already checked to be the index's stage): every module the
    index covers must be loaded (an attributor of ``modules='mlp'`` lacks the attention modules)."""
    from hub_msif.attribution.gradient_projection import GradientProjection

    settings = (gradindex.metadata or {}).get("projection") or {}
    names = list(settings.get("k") or {})
    missing = [name for name in names if name not in pretrained.modules]
    if missing:
        raise MsifValueError(f"the gradient index covers {len(missing)} module(s) that the factors from {where} do "
                             f"not load (first: {missing[0]}); load them with modules='all' (--modules all)")
    # in the factors' order, as the build made it (identity lays the modules out in that order)
    covered = StageFactors(pretrained.stage, pretrained.info,
                           {n: m for n, m in pretrained.modules.items() if n in set(names)})
    return GradientProjection.from_json(settings, covered)


def query_vectors(projection: GradientProjection, model: torch.nn.Module, finetuned: StageFactors,
                  pretrained: StageFactors, pad_id: int, sequences: Sequence[dict], damping: float,
                  relative: bool, damping_pretrained: float | None = None,
                  neutral: Sequence[dict] | None = None) -> np.ndarray:
    """The gradient index's query vectors ``[Q, dims]`` (float32) of query ``sequences``: each one's
    answer-loss gradient under the fine-tuned ``model`` over the projection's modules
    (``per_example_gradients``, one query per pass, as stage two takes them), minus that of its
    ``neutral`` sequence when given (a contrastive query), preconditioned by the fine-tuned stage at
    ``damping`` and the pre-trained one at ``damping_pretrained`` (default ``damping``), and
    projected as the index's candidates were (``GradientProjection.query_vectors``)."""
    grads = per_example_gradients(model, projection.specs, sequences, pad_id, 1)
    if neutral is not None:  # scores are linear in the query gradient
        base = per_example_gradients(model, projection.specs, neutral, pad_id, 1)
        grads = {name: g - base.pop(name) for name, g in grads.items()}
    vectors = projection.query_vectors(grads, finetuned, pretrained, damping, relative, damping_pretrained)
    array = vectors.detach().to(device="cpu", dtype=torch.float32).numpy()
    if not np.all(np.isfinite(array)):
        raise MsifValueError("the query's gradient-index vector is not finite; try a larger damping")
    return np.ascontiguousarray(array)


def union(first: Sequence[dict], second: Sequence[dict]) -> list[dict]:
    """``first`` then the documents of ``second`` it lacks, by id; the same id with another text in
    the two (indexes of two different corpora) is refused."""
    texts = {d["id"]: d["text"] for d in first}
    out = list(first)
    for doc in second:
        known = texts.get(doc["id"])
        if known is None:
            texts[doc["id"]] = doc["text"]
            out.append(doc)
        elif known != doc["text"]:
            raise MsifValueError(f"document {doc['id']!r} has another text in the document index than in the "
                                 "gradient index: they index different corpora")
    return out


__all__ = ["CANDIDATE_SOURCES", "StageOne", "choose_source", "index_projection", "query_vectors", "recorded_check",
           "union"]
