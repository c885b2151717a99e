"""The counterfactual statistics of issue 11: linear datamodeling score (LDS), bootstrap intervals,
top-k removal summaries. See docs/design.md, "Counterfactual benchmarks".

LDS (Park et al., TRAK; Bae et al., kronfluence): M models are retrained on random subsets of the
training corpus. A method's *predicted effect* of subset m on query q is the sum of its scores of
the documents the subset kept (a positive score supports the answer); the *measured* effect is the
answer's log-probability under the model trained on subset m. A query's LDS is the Spearman rank
correlation of the two over the M subsets; a method's LDS is the mean over queries.

Pure numpy, no torch: the bench and the tests import it without loading a model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hub_msif.errors import MsifValueError


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 along the last axis, ties getting their average rank (as Spearman needs)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, axis=-1, kind="stable")
    out = np.empty_like(values)
    flat_v, flat_o, flat_r = values.reshape(-1, values.shape[-1]), order.reshape(-1, values.shape[-1]), out.reshape(-1, values.shape[-1])
    for row in range(flat_v.shape[0]):
        v, o = flat_v[row], flat_o[row]
        sorted_v = v[o]
        r = np.empty(len(v))
        start = 0
        while start < len(v):  # average rank over each run of equal values
            end = start
            while end + 1 < len(v) and sorted_v[end + 1] == sorted_v[start]:
                end += 1
            r[start : end + 1] = (start + end) / 2
            start = end + 1
        flat_r[row, o] = r
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long vectors; NaN when either is constant (no
    ranking to correlate), which callers must drop, never report."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise MsifValueError(f"spearman needs two vectors of the same length >= 2, got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise MsifValueError("spearman got non-finite values")
    rx, ry = ranks(x) - (len(x) - 1) / 2, ranks(y) - (len(y) - 1) / 2
    denom = np.sqrt((rx**2).sum() * (ry**2).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


def predicted_effects(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """``[M, Q]``: for each subset (row of the 0/1 ``masks [M, D]``) the sum of the scores
    ``[D, Q]`` of the documents it kept."""
    scores, masks = np.asarray(scores, dtype=np.float64), np.asarray(masks, dtype=np.float64)
    if scores.ndim != 2 or masks.ndim != 2 or masks.shape[1] != scores.shape[0]:
        raise MsifValueError(f"scores [D, Q] and masks [M, D] do not match: {scores.shape} and {masks.shape}")
    return masks @ scores


def lds_per_query(scores: np.ndarray, masks: np.ndarray, measured: np.ndarray) -> np.ndarray:
    """``[Q]`` LDS of each query: Spearman over the M subsets between the predicted effect and the
    ``measured [M, Q]`` answer log-probability (NaN where the prediction is constant)."""
    predicted = predicted_effects(scores, masks)
    measured = np.asarray(measured, dtype=np.float64)
    if measured.shape != predicted.shape:
        raise MsifValueError(f"measured effects {measured.shape} do not match predicted {predicted.shape}")
    return np.array([spearman(predicted[:, q], measured[:, q]) for q in range(predicted.shape[1])])


def bootstrap_ci(values: Sequence[float], samples: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0 or not np.isfinite(values).all():
        raise MsifValueError("bootstrap needs a non-empty vector of finite values")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def summarize_lds(per_query: Sequence[float], seed: int = 0) -> dict:
    """``{"mean", "ci": [lo, hi], "queries", "dropped"}`` over the queries with a finite LDS."""
    per_query = np.asarray(per_query, dtype=np.float64)
    kept = per_query[np.isfinite(per_query)]
    if len(kept) == 0:
        raise MsifValueError("no query has a finite LDS (every prediction was constant)")
    lo, hi = bootstrap_ci(kept, seed=seed)
    return {"mean": float(kept.mean()), "ci": [lo, hi], "queries": int(len(kept)), "dropped": int(len(per_query) - len(kept))}


def top_k(scores: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` highest scores, best first (ties: lower index first)."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise MsifValueError("top_k got non-finite scores")
    return [int(i) for i in np.argsort(-scores, kind="stable")[:k]]


def reciprocal_rank(scores: Sequence[float], relevant: set[int]) -> float:
    """1 / the rank (1 = best) of the best-ranked ``relevant`` index under ``scores`` (ties: lower
    index first, as in ``top_k``); 0 when nothing is relevant. Fact tracing's MRR is its mean."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise MsifValueError("reciprocal_rank got non-finite scores")
    if not relevant:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    first = next(r for r, i in enumerate(order) if int(i) in relevant)
    return 1.0 / (first + 1)


def removal_summary(base_loss: Sequence[float], removed_loss: Sequence[float], base_correct: Sequence[bool],
                    removed_correct: Sequence[bool]) -> dict:
    """Per removal (one per query): ``loss_increase`` = mean of removed - base answer loss;
    ``flip_rate`` = share of the answers right before the removal that are wrong after it."""
    base, removed = np.asarray(base_loss, dtype=np.float64), np.asarray(removed_loss, dtype=np.float64)
    if base.shape != removed.shape or base.ndim != 1 or len(base) == 0 or len(base_correct) != len(base) \
            or len(removed_correct) != len(base):
        raise MsifValueError("removal summary needs equally long, non-empty vectors")
    right = [i for i, c in enumerate(base_correct) if c]
    flips = sum(not removed_correct[i] for i in right)
    increase = removed - base
    lo, hi = bootstrap_ci(increase)
    return {"loss_increase": float(increase.mean()), "loss_increase_ci": [lo, hi],
            "flip_rate": flips / len(right) if right else None, "flips": int(flips), "right_before": len(right),
            "removals": int(len(base))}


MIN_PAIRED = 5  # fewer paired queries than this: no verdict, whatever the interval


def heldout_split(num_queries: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of ``range(num_queries)`` into two disjoint halves ``(select, report)``:
    settings are chosen on ``select`` and reported on ``report`` (the larger half when odd), for
    every method alike, so a tuned method gets no selection bonus."""
    if num_queries < 2:
        raise MsifValueError(f"a held-out split needs at least 2 queries, got {num_queries}")
    order = np.random.default_rng(seed).permutation(num_queries)
    half = num_queries // 2
    return sorted(int(i) for i in order[:half]), sorted(int(i) for i in order[half:])


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = 0) -> dict:
    """``a - b`` paired by query (NaN pairs dropped): mean, bootstrap 95% interval, and ``beats``
    (1 when the interval lies above 0, -1 below, 0 when it holds 0 or fewer than ``MIN_PAIRED``
    queries are paired): "A beats B" only when the interval excludes 0."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise MsifValueError(f"paired values must be two equally long vectors, got {a.shape} and {b.shape}")
    diff = (a - b)[np.isfinite(a) & np.isfinite(b)]
    if len(diff) == 0:
        raise MsifValueError("no query has both values finite")
    lo, hi = bootstrap_ci(diff, seed=seed)
    enough = len(diff) >= MIN_PAIRED  # a bootstrap over a handful of queries says nothing
    return {"mean": float(diff.mean()), "ci": [lo, hi],
            "beats": (1 if lo > 0 else -1 if hi < 0 else 0) if enough else 0, "queries": int(len(diff))}


def mean_with_ci(values: Sequence[float], seed: int = 0) -> dict:
    """``{"mean", "ci", "n"}`` of the finite ``values`` (bootstrap 95% interval)."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[np.isfinite(values)]
    if len(kept) == 0:
        raise MsifValueError("no finite values to summarise")
    lo, hi = bootstrap_ci(kept, seed=seed)
    return {"mean": float(kept.mean()), "ci": [lo, hi], "n": int(len(kept))}


def indicator_scores(num_docs: int, proponent_sets: Sequence[set[int]]) -> np.ndarray:
    """``[D, Q]`` ceiling scores: 1 on each query's true proponents, 0 elsewhere."""
    out = np.zeros((num_docs, len(proponent_sets)))
    for q, docs in enumerate(proponent_sets):
        out[sorted(docs), q] = 1.0
    return out
