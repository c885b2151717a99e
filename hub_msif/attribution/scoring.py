"""Influence scores: MS-IF, single-stage IF and the gradient dot product (docs/design.md, "Scores and their sign").

For query gradients ``G_q`` (answer loss under the fine-tuned model) and candidate gradients
``G_c`` (document loss under the pre-trained model, or the fine-tuned one for SS-IF):

- MS-IF: ``<P_ft(G_q), P_pt(G_c)> = <P_pt(P_ft(G_q)), G_c>`` (P is symmetric);
- SS-IF: ``<P_ft(G_q), G_c>``;
- GDP: ``<G_q, G_c>``.

Fast path: each query is preconditioned once into ``W_q``; one forward and backward pass over a
batch of candidates then gives every ``<W_q, G_c>`` for all queries at once. A candidate's
gradient ``G_c = sum_t g_t a_t^T`` exists only transiently, one module and one batch at a time,
inside the backward hook, so memory does not grow with the number of candidates. (The
per-token form ``sum_t g_t^T W_q a_t`` costs ``T*Q`` instead of ``T+Q`` matrix products per
candidate; it is used only when token-level shares are asked for.)

Low-rank queries (``rank=r``, docs/design.md "Scores and their sign", "Low-rank queries"): each
module's ``W_q`` is kept as ``U_q V_q^T`` (``[d_out, r]``, ``[d_in, r]``), a truncated SVD taken in
the metric of the candidates' gradients (the pre-trained stage's EK-FAC eigenbasis, scaled by the
square roots of Lambda's row and column means), and candidates are scored from the factors:
``<W_q, G_c> = sum_t sum_r (g_t . u_r)(a_t . v_r)``, or through ``G_c`` where that is cheaper.

Normalised scores (``normalize=True``, "Unit-normalised scores"): the cosine
``<W_q, G_c> / (||W_q|| ||G_c||)`` with Frobenius norms over all scored modules together.

Sign: a positive score means that training more on the candidate lowers the query's answer
loss, i.e. the candidate supports the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast, overload

import torch

from hub_msif.attribution.baselines import mean_last_hidden
from hub_msif.data import collate
from hub_msif.errors import MsifValueError
from hub_msif.factors.architectures import TrackedModule
from hub_msif.factors.capture import GradientCapture, compute_dtype, input_gradients_only
from hub_msif.factors.ekfac import ModuleFactors, precondition_twice
from hub_msif.factors.objectives import lm_loss
from hub_msif.factors.storage import StageFactors

GRADIENT_METHODS = ("ms-if", "ss-if", "gdp")
_MAX_CHUNK_ELEMENTS = 32 * 1024 * 1024
_BLOCK = 256  # elements of the d_out * d_in axis per float32 partial product (docs/design.md, "Fast path")
_OVERSAMPLE = 8  # extra columns of the randomized range finder (truncated SVD)
_POWER_ITERATIONS = 2
_METRIC_FLOOR = 1e-3  # Lambda's row and column means are floored at this fraction of their mean
_PATH: str | None = None  # low-rank scoring path: None picks the cheaper; tests force "factors" or "gradient"


@dataclass
class LowRankQueries:
    """Rank-r preconditioned queries: ``W_q ~ u[name][q] @ v[name][q].T`` per module.

    ``u[name]``: ``[Q, d_out, r]`` (singular values folded in), ``v[name]``: ``[Q, d_in, r]``;
    ``r`` is at most ``min(d_out, d_in)`` of the module.
    """

    u: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]

    @property
    def num_queries(self) -> int:
        return next(iter(self.u.values())).shape[0]

    def dense(self) -> dict[str, torch.Tensor]:
        """The full ``W_q`` ``[Q, d_out, d_in]`` per module (for checks; memory as today's queries)."""
        return {name: self.u[name] @ self.v[name].transpose(-1, -2) for name in self.u}

    def bytes_per_query(self) -> int:
        """Memory of one query's factors over all modules."""
        return sum((self.u[n][0].numel() + self.v[n][0].numel()) * self.u[n].element_size() for n in self.u)

    def square_norms(self) -> torch.Tensor:
        """``||W_q||_F^2`` over all modules, ``[Q]``: ``trace((U^T U)(V^T V))`` per module."""
        return cast(torch.Tensor, sum(((u.transpose(-1, -2) @ u) * (v.transpose(-1, -2) @ v)).sum((-2, -1))
                                      for u, v in zip(self.u.values(), self.v.values())))


def per_example_gradients(
    model: torch.nn.Module, specs: Sequence[TrackedModule], sequences: Sequence[dict], pad_id: int,
    batch_size: int = 8, representations: list[torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Each sequence's gradient of its summed loss (true labels, ``-100`` = no loss), per module.

    Returns ``{name: [N, d_out, d_in]}`` (bias as last column) in the compute dtype. Used for
    queries, which are few, and for the slow reference path. When ``representations`` is a list,
    the same pass appends each batch's mean last hidden states ``[B, hidden]`` to it (RepSim).
    """
    grads: dict[str, list[torch.Tensor]] = {s.name: [] for s in specs}
    device = next(model.parameters()).device
    want_hidden = representations is not None

    def consume(spec, a, g):
        grads[spec.name].append(torch.einsum("bto,bti->boi", g, a))

    capture = GradientCapture(model, specs, consume)
    with input_gradients_only(model), capture:
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start : start + batch_size]
            batch = collate(chunk, range(start, start + len(chunk)), pad_id, device)
            capture.mask = batch["attention_mask"]
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                            output_hidden_states=want_hidden)
            if representations is not None:
                representations.append(mean_last_hidden(outputs, batch["attention_mask"]))
            lm_loss(outputs.logits, batch, "empirical").backward()
    # One batch: its gradients as they are (a cat would hold a second copy of every query's gradients).
    return {name: parts[0] if len(parts) == 1 else torch.cat(parts) for name, parts in grads.items()}


@overload
def precondition_queries(
    query_grads: Mapping[str, torch.Tensor], method: str, finetuned: StageFactors | None,
    pretrained: StageFactors | None, damping: float, relative: bool = ..., rank: None = ...,
    damping_pretrained: float | None = ...,
) -> dict[str, torch.Tensor]: ...


@overload
def precondition_queries(
    query_grads: Mapping[str, torch.Tensor], method: str, finetuned: StageFactors | None,
    pretrained: StageFactors | None, damping: float, relative: bool = ..., *, rank: int,
    damping_pretrained: float | None = ...,
) -> LowRankQueries: ...


@overload
def precondition_queries(
    query_grads: Mapping[str, torch.Tensor], method: str, finetuned: StageFactors | None,
    pretrained: StageFactors | None, damping: float, relative: bool = ..., rank: int | None = ...,
    damping_pretrained: float | None = ...,
) -> dict[str, torch.Tensor] | LowRankQueries: ...


def precondition_queries(
    query_grads: Mapping[str, torch.Tensor], method: str, finetuned: StageFactors | None,
    pretrained: StageFactors | None, damping: float, relative: bool = True, rank: int | None = None,
    damping_pretrained: float | None = None,
) -> dict[str, torch.Tensor] | LowRankQueries:
    """``W_q`` per module for ``method``: ``P_pt(P_ft(G_q))`` (MS-IF), ``P_ft(G_q)`` (SS-IF) or ``G_q`` (GDP).

    With ``rank`` (an int >= 1), ``LowRankQueries`` of at most that rank per module (see
    ``truncate``), one module's dense ``W_q`` at a time; its metric is that of the pre-trained
    stage (the candidates are pre-training documents), else the fine-tuned one.
    ``damping`` damps the fine-tuned stage (and the pre-trained one too unless
    ``damping_pretrained`` is given: MS-IF's per-stage damping, docs/design.md, "Per-stage damping").
    """
    if method not in GRADIENT_METHODS:
        raise MsifValueError(f"unknown gradient method {method!r}; use one of {', '.join(GRADIENT_METHODS)}")
    if rank is not None:
        check_rank(rank)
        metric = pretrained if pretrained is not None else finetuned
        u, v = {}, {}
        for name, grad in query_grads.items():
            target = metric.modules.get(name) if metric is not None else None
            source = finetuned.modules.get(name) if finetuned is not None and method != "gdp" else None
            direct = pretrained is not None and target is not None and (
                method == "gdp" or (source is not None and source.spec.block_labels == target.spec.block_labels))
            if direct and target is not None:  # (direct implies a target)
                coefficients = _metric_coefficients(method, grad, source, target, damping, relative,
                                                    damping_pretrained)
                u[name], v[name] = _truncate_coefficients(coefficients, rank, target)
            else:
                (w,) = precondition_queries({name: grad}, method, finetuned, pretrained, damping, relative,
                                            damping_pretrained=damping_pretrained).values()
                u[name], v[name] = truncate(w, rank, target)
        return LowRankQueries(u, v)
    if method == "gdp":
        return dict(query_grads)
    if finetuned is None:
        raise MsifValueError(f"{method} needs the fine-tuned stage's factors")
    if method == "ss-if":
        return finetuned.precondition(query_grads, damping, relative)
    if pretrained is None:
        raise MsifValueError("ms-if needs the pre-trained stage's factors")
    missing = [name for name in query_grads if name not in finetuned.modules or name not in pretrained.modules]
    if missing:
        raise MsifValueError(f"no factors of both stages for module(s) {', '.join(missing)}")
    return {
        name: precondition_twice(finetuned.modules[name], pretrained.modules[name], grad, damping, relative,
                                 damping_pretrained)
        for name, grad in query_grads.items()
    }


def check_rank(rank) -> int:
    """A query rank must be a whole number of at least 1 (None, not 0, means full rank)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MsifValueError(f"the query rank must be a whole number of at least 1 (or none for full rank), got {rank!r}")
    return rank


def _metric_scales(factors: ModuleFactors, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Square roots of Lambda's row and column means (``[d_out]``, ``[d_in]``), floored: their
    outer product approximates Lambda, the candidates' second moment in the eigenbasis."""
    lam = factors.lam.double().reshape(-1, factors.lam.shape[-1]).clamp_min(0)  # [d_out, d_in]
    rows, cols = lam.mean(1), lam.mean(0) / lam.mean().clamp_min(torch.finfo(torch.float64).tiny)
    rows = rows + _METRIC_FLOOR * rows.mean() + torch.finfo(torch.float64).tiny
    cols = cols + _METRIC_FLOOR * cols.mean() + torch.finfo(torch.float64).tiny
    return rows.sqrt().to(device=device, dtype=dtype), cols.sqrt().to(device=device, dtype=dtype)


def truncated_svd(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` of the best rank-``rank`` approximation of each ``x`` (``[Q, m, n]``):
    ``U [Q, m, r]``, ``S [Q, r]``, ``V [Q, n, r]``, ``r = min(rank, m, n)``.

    Exact SVD when ``rank + oversampling`` reaches ``min(m, n)``; otherwise a randomized range
    finder with power iterations (Halko, Martinsson and Tropp 2011) from a fixed seed, so the
    result is deterministic.
    """
    m, n = x.shape[-2:]
    r = min(rank, m, n)
    k = min(r + _OVERSAMPLE, m, n)
    if k == min(m, n):
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        return u[..., :r], s[..., :r], vh[..., :r, :].transpose(-1, -2)
    generator = torch.Generator(device=x.device).manual_seed(0)
    probe = torch.randn(n, k, generator=generator, dtype=x.dtype, device=x.device)
    basis = torch.linalg.qr(x @ probe).Q  # [Q, m, k]
    for _ in range(_POWER_ITERATIONS):
        basis = torch.linalg.qr(x @ torch.linalg.qr(x.transpose(-1, -2) @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.transpose(-1, -2) @ x, full_matrices=False)  # [Q, k, n]
    return (basis @ u)[..., :r], s[..., :r], vh[..., :r, :].transpose(-1, -2)


def _metric_coefficients(method: str, grad: torch.Tensor, finetuned: ModuleFactors | None, metric: ModuleFactors,
                         damping: float, relative: bool, damping_pretrained: float | None = None) -> torch.Tensor:
    """``Q_S^T W_q Q_A`` (``[Q, d_out, d_in]``) in the eigenbasis of ``metric`` (the pre-trained
    stage for MS-IF), formed without ``W_q``: the rotation out of the fine-tuned eigenbasis and
    into the metric's is one change of basis, as in ``precondition_twice`` (4 full-size matrix
    products per query for MS-IF and SS-IF instead of 6 + 2)."""
    qa2, qs2, den2 = metric.operands(grad, damping if damping_pretrained is None else damping_pretrained, relative)
    if method == "gdp":
        return (qs2.transpose(-1, -2) @ metric.blocks(grad) @ qa2).reshape(grad.shape)
    if finetuned is None:
        raise MsifValueError(f"{method} needs the fine-tuned stage's factors")
    qa1, qs1, den1 = finetuned.operands(grad, damping, relative)
    inner = qs1.transpose(-1, -2) @ finetuned.blocks(grad) @ qa1 / den1
    inner = (qs2.transpose(-1, -2) @ qs1) @ inner @ (qa1.transpose(-1, -2) @ qa2)
    if method == "ms-if":
        inner = inner / den2
    return inner.reshape(grad.shape)


def finetuned_in_pretrained_basis(query_grads: Mapping[str, torch.Tensor], finetuned: StageFactors,
                                  pretrained: StageFactors, damping: float, relative: bool = True
                                  ) -> dict[str, torch.Tensor]:
    """``X = Q_S2^T P_ft(G_q) Q_A2`` per module (``[Q, d_out, d_in]``, blocks of the pre-trained stage
    laid out as the rows of ``d_out``): each query preconditioned by the fine-tuned stage, rotated
    into the pre-trained stage's eigenbasis (the query side of the gradient index, docs/design.md,
    "Gradient index"). MS-IF is then ``<X / (Lambda_pt + damping), Q_S2^T G_c Q_A2>``."""
    out = {}
    for name, grad in query_grads.items():
        source, target = finetuned.modules.get(name), pretrained.modules.get(name)
        if source is None or target is None:
            raise MsifValueError(f"no factors of both stages for module {name}")
        if source.spec.block_labels != target.spec.block_labels:
            raise MsifValueError(f"module {name!r}: the two stages split the output into different blocks")
        out[name] = _metric_coefficients("ss-if", grad, source, target, damping, relative)
    return out


def _truncate_coefficients(coefficients: torch.Tensor, rank: int, factors: ModuleFactors
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` from ``W``'s coefficients ``Q_S^T W Q_A`` in the eigenbasis of ``factors``: see ``truncate``."""
    rows, cols = _metric_scales(factors, coefficients.dtype, coefficients.device)
    u, s, v = truncated_svd(rows.unsqueeze(-1) * coefficients * cols, rank)
    u = u * s.unsqueeze(-2) / rows.unsqueeze(-1)  # [Q, d_out, r], back out of the metric
    v = v / cols.unsqueeze(-1)
    q_a, q_s, _ = factors.operands(coefficients, 0.0)
    spec = factors.spec
    u = (q_s @ u.reshape(*u.shape[:-2], spec.num_blocks, spec.block_size, u.shape[-1])).reshape(u.shape)
    return u, q_a @ v


def truncate(w: torch.Tensor, rank: int, factors: ModuleFactors | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U @ V^T`` the rank-``rank`` truncation of ``w`` (``[Q, d_out, d_in]``).

    With the candidates' stage ``factors``, the truncation is optimal in their metric rather than
    the plain Frobenius one: the expected squared score error over candidates whose gradients have
    second moment ``(Q_S (x) Q_A) diag(Lambda) (Q_S (x) Q_A)^T`` is ``||sqrt(Lambda) * (Q_S^T E Q_A)||^2``
    for an error ``E``; with Lambda approximated by the outer product of its row and column means
    ``s_row s_col^T``, the best ``E`` comes from the SVD of ``diag(sqrt s_row) Q_S^T w Q_A diag(sqrt s_col)``
    (see docs/design.md, "Low-rank queries"). At full rank both give ``w`` exactly.
    """
    if factors is None:
        u, s, v = truncated_svd(w, rank)
        return u * s.unsqueeze(-2), v
    q_a, q_s, _ = factors.operands(w, 0.0)
    rotated = (q_s.transpose(-1, -2) @ factors.blocks(w) @ q_a).reshape(w.shape)
    return _truncate_coefficients(rotated, rank, factors)


def stack_queries(weights: Sequence[Mapping[str, torch.Tensor] | LowRankQueries]
                  ) -> Mapping[str, torch.Tensor] | LowRankQueries:
    """Several sets of preconditioned queries (say, one per method and damping) as one, queries
    in order. Low-rank sets of different ranks are padded with zero columns to the largest. One set
    is returned as it is (no copy: a full-rank query is as large as the tracked weights)."""
    if len(weights) == 1:
        return weights[0]
    low_rank = [w for w in weights if isinstance(w, LowRankQueries)]
    if len(low_rank) < len(weights):
        if low_rank:
            raise MsifValueError("cannot stack low-rank and full-rank queries")
        dense = [w for w in weights if not isinstance(w, LowRankQueries)]
        return {name: torch.cat([w[name] for w in dense]) for name in dense[0]}

    def padded(x: torch.Tensor, r: int) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, r - x.shape[-1]))

    u, v = {}, {}
    for name in low_rank[0].u:
        r = max(w.u[name].shape[-1] for w in low_rank)
        u[name] = torch.cat([padded(w.u[name], r) for w in low_rank])
        v[name] = torch.cat([padded(w.v[name], r) for w in low_rank])
    return LowRankQueries(u, v)


@dataclass
class CandidateScores:
    """Scores of C candidates against Q queries: ``per_module[name]`` is ``[C, Q]``; ``total`` their sum.

    ``tokens[c]`` (when asked for) is ``[T_c, Q]``: each candidate token's share ``g_t^T W_q a_t``,
    summed over modules; it sums to the candidate's total. ``representations`` (when asked for)
    is ``[C, hidden]``: each candidate's mean last hidden state, from the same pass (RepSim).
    With ``normalize``, every score and share is divided by ``||W_q|| ||G_c||`` (all modules), so
    ``total`` is the cosine; ``candidate_norms`` ``[C]`` and ``query_norms`` ``[Q]`` are those norms.
    """

    per_module: dict[str, torch.Tensor]
    tokens: list[torch.Tensor] | None = None
    representations: torch.Tensor | None = None
    candidate_norms: torch.Tensor | None = None
    query_norms: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        return torch.stack(list(self.per_module.values())).sum(0)


class _Scorer:
    """The scores of a stream of candidate batches, added up from the gradient hooks: ``consume(spec,
    a, g)`` gets one module's inputs ``a`` [B, T, d_in] and output gradients ``g`` [B, T, d_out] of
    the batch whose first candidate is ``batch_start`` (docs/design.md, "Fast path")."""

    def __init__(self, by_name: Mapping[str, TrackedModule], num_queries: int, num_candidates: int,
                 device: torch.device, dtype: torch.dtype, token_shares: bool, normalize: bool):
        self.num_queries, self.token_shares, self.normalize = num_queries, token_shares, normalize
        # Preallocated outputs, filled batch by batch: many small score tensors kept alive between the
        # large transient per-batch gradients fragment the CPU heap, and RSS then grew with C.
        self.per_module = {name: torch.zeros(num_candidates, num_queries, dtype=dtype, device=device)
                           for name in by_name}
        self.candidate_sq = torch.zeros(num_candidates, dtype=dtype, device=device) if normalize else None
        self.query_sq: torch.Tensor | None = None  # [Q] with ``normalize``: each query's squared norm
        self.batch_start = 0  # the current batch's first candidate
        self.batch_tokens: dict[str, torch.Tensor] = {}  # with ``token_shares``: [B, T, Q] per module

    def consume(self, spec: TrackedModule, a: torch.Tensor, g: torch.Tensor) -> None:
        raise NotImplementedError


class _DenseScorer(_Scorer):
    """Full-rank queries ``W_q`` [Q, d_out, d_in]: each candidate's ``G_c = g^T a``, in chunks, times all
    queries in fixed blocks of the ``d_out * d_in`` axis (docs/design.md, "Fast path")."""

    def __init__(self, weights: Mapping[str, torch.Tensor], by_name: Mapping[str, TrackedModule], num_candidates: int,
                 device: torch.device, dtype: torch.dtype, token_shares: bool, normalize: bool):
        self.w = {name: weights[name].to(device=device, dtype=dtype) for name in by_name}
        num_queries = next(iter(self.w.values())).shape[0]
        # Views, no copies: [n, _BLOCK, Q] (block k of every query side by side) and [rest, Q] (the tail).
        self.blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, wq in self.w.items():
            flat = wq.reshape(num_queries, -1)  # [Q, d_out * d_in]
            main = flat.shape[1] // _BLOCK * _BLOCK
            self.blocks[name] = (flat[:, :main].reshape(num_queries, -1, _BLOCK).permute(1, 2, 0), flat[:, main:].T)
        super().__init__(by_name, num_queries, num_candidates, device, dtype, token_shares, normalize)
        if normalize:
            self.query_sq = cast(torch.Tensor, sum(wq.reshape(num_queries, -1).square().sum(1, dtype=torch.float64)
                                                   for wq in self.w.values())).to(dtype)

    def consume(self, spec: TrackedModule, a: torch.Tensor, g: torch.Tensor) -> None:  # a: [B, T, d_in], g: [B, T, d_out]
        blocks, tail = self.blocks[spec.name]  # [n, _BLOCK, Q], [rest, Q]
        main = blocks.shape[0] * _BLOCK
        out = self.per_module[spec.name]  # [C, Q]
        chunk = max(1, _MAX_CHUNK_ELEMENTS // (spec.d_out * spec.d_in))
        for start in range(0, a.shape[0], chunk):
            grad = g[start : start + chunk].transpose(1, 2) @ a[start : start + chunk]  # [b, d_out, d_in]
            b = grad.shape[0]
            flat = grad.reshape(b, -1)
            rows = slice(self.batch_start + start, self.batch_start + start + b)
            # float32 partial products over fixed blocks of _BLOCK elements, summed in float64: a score moves
            # with the batch's shape only by one block's float32 rounding, not by that of a d_out * d_in sum.
            scores = (flat[:, :main].reshape(b, -1, _BLOCK).transpose(0, 1) @ blocks).sum(0, dtype=torch.float64)
            if tail.shape[0]:
                scores += flat[:, main:] @ tail
            out[rows] += scores.to(out.dtype)  # += : a module used twice
            if self.candidate_sq is not None:
                self.candidate_sq[rows] += grad.square().sum((1, 2))
        if self.token_shares:
            self.batch_tokens[spec.name] = torch.einsum("bto,qoi,bti->btq", g, self.w[spec.name], a)


class _LowRankScorer(_Scorer):
    """Low-rank queries ``U_q V_q^T`` (docs/design.md, "Low-rank queries"): from the factors, ``(g U) * (a V)``
    summed over tokens, or through each candidate's ``G_c``, whichever is cheaper per module and batch."""

    def __init__(self, weights: LowRankQueries, by_name: Mapping[str, TrackedModule], num_candidates: int,
                 device: torch.device, dtype: torch.dtype, token_shares: bool, normalize: bool):
        # [d_out, Q*r] and [d_in, Q*r]: query q's factors are columns q*r .. q*r + r - 1.
        u = {n: weights.u[n].to(device=device, dtype=dtype) for n in by_name}
        v = {n: weights.v[n].to(device=device, dtype=dtype) for n in by_name}
        num_queries = next(iter(u.values())).shape[0]
        self.ranks = {n: u[n].shape[-1] for n in by_name}
        self.u_cols = {n: u[n].permute(1, 0, 2).reshape(by_name[n].d_out, -1) for n in by_name}
        self.v_cols = {n: v[n].permute(1, 0, 2).reshape(by_name[n].d_in, -1) for n in by_name}
        query_sq = LowRankQueries(u, v).square_norms() if normalize else None
        del u, v
        super().__init__(by_name, num_queries, num_candidates, device, dtype, token_shares, normalize)
        self.query_sq = query_sq

    def consume(self, spec: TrackedModule, a: torch.Tensor, g: torch.Tensor) -> None:
        uc, vc, r = self.u_cols[spec.name], self.v_cols[spec.name], self.ranks[spec.name]
        num_queries, candidate_sq = self.num_queries, self.candidate_sq
        out = self.per_module[spec.name]
        b, t = a.shape[:2]
        rows = slice(self.batch_start, self.batch_start + b)
        factored = t * num_queries * r * (spec.d_in + spec.d_out)
        through_gradient = t * spec.d_out * spec.d_in + spec.d_out * spec.d_in * num_queries * r
        if (factored <= through_gradient if _PATH is None else _PATH == "factors") or self.token_shares:
            per_token = (g @ uc) * (a @ vc)  # [B, T, Q*r]: (g_t . u_qr)(a_t . v_qr)
            out[rows] += per_token.sum(1, dtype=torch.float64).reshape(b, num_queries, r).sum(-1).to(out.dtype)
            if self.token_shares:
                self.batch_tokens[spec.name] = per_token.reshape(b, t, num_queries, r).sum(-1)
            if candidate_sq is not None:  # ||sum_t g_t a_t^T||^2 = sum_{t,t'} (g_t . g_t')(a_t . a_t')
                candidate_sq[rows] += ((g @ g.transpose(1, 2)) * (a @ a.transpose(1, 2))).sum((1, 2))
        else:
            chunk = max(1, _MAX_CHUNK_ELEMENTS // (spec.d_out * spec.d_in))
            for start in range(0, b, chunk):
                grad = g[start : start + chunk].transpose(1, 2) @ a[start : start + chunk]  # [b, d_out, d_in]
                part = slice(self.batch_start + start, self.batch_start + start + grad.shape[0])
                summed = ((grad @ vc) * uc).sum(1, dtype=torch.float64)  # [b, Q*r]
                out[part] += summed.reshape(grad.shape[0], num_queries, r).sum(-1).to(out.dtype)
                if candidate_sq is not None:
                    candidate_sq[part] += grad.square().sum((1, 2))


def score_candidates(
    model: torch.nn.Module, specs: Sequence[TrackedModule], weights: Mapping[str, torch.Tensor] | LowRankQueries,
    candidates: Sequence[dict], pad_id: int, batch_size: int = 8, token_shares: bool = False,
    show_progress: bool = False, representations: bool = False, normalize: bool = False,
) -> CandidateScores:
    """``<W_q, G_c>`` for every candidate c and query q, streaming candidates in batches.

    ``weights[name]`` is ``[Q, d_out, d_in]``, or ``weights`` is ``LowRankQueries``; ``candidates``
    are token sequences whose summed loss defines ``G_c`` (true labels). ``normalize``: the
    cosine ``<W_q, G_c> / (||W_q|| ||G_c||)`` instead (0 for a candidate whose gradient is 0).
    """
    from tqdm.auto import tqdm

    if not candidates:
        raise MsifValueError("no candidates to score")
    by_name = {s.name: s for s in specs}
    known = weights.u if isinstance(weights, LowRankQueries) else weights
    missing = [name for name in by_name if name not in known]
    if missing:
        raise MsifValueError(f"no query weights for module(s) {', '.join(missing)}")
    device = next(model.parameters()).device
    dtype = compute_dtype(model)
    scorer: _Scorer
    if isinstance(weights, LowRankQueries):
        scorer = _LowRankScorer(weights, by_name, len(candidates), device, dtype, token_shares, normalize)
    else:
        scorer = _DenseScorer(weights, by_name, len(candidates), device, dtype, token_shares, normalize)
    token_parts: list[torch.Tensor] = []
    hidden_parts: list[torch.Tensor] = []

    capture = GradientCapture(model, specs, scorer.consume)
    with input_gradients_only(model), capture:
        for start in tqdm(range(0, len(candidates), batch_size), desc="scoring candidates", disable=not show_progress,
                          leave=False):
            chunk = candidates[start : start + batch_size]
            batch = collate(chunk, range(start, start + len(chunk)), pad_id, device)
            capture.mask = batch["attention_mask"]
            scorer.batch_start = start
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                            output_hidden_states=representations)
            if representations:
                hidden_parts.append(mean_last_hidden(outputs, batch["attention_mask"]))
            lm_loss(outputs.logits, batch, "empirical").backward()
            if token_shares:
                summed = torch.stack(list(scorer.batch_tokens.values())).sum(0)  # [B, T, Q]
                token_parts.extend(summed[i, : len(seq["input_ids"])].cpu() for i, seq in enumerate(chunk))
    per_module, candidate_sq, query_sq = scorer.per_module, scorer.candidate_sq, scorer.query_sq
    candidate_norms = query_norms = None
    if normalize:
        if candidate_sq is None or query_sq is None:
            raise RuntimeError("a scorer built with normalize=True has no squared norms")  # never: both are set
        candidate_norms, query_norms = candidate_sq.clamp_min(0).sqrt(), query_sq.clamp_min(0).sqrt()
        scale = candidate_norms.unsqueeze(1) * query_norms.unsqueeze(0)  # [C, Q]
        inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))  # a zero vector: cosine 0
        per_module = {name: v * inverse for name, v in per_module.items()}
        token_parts = [t * inverse[i].cpu() for i, t in enumerate(token_parts)]
        candidate_norms, query_norms = candidate_norms.cpu(), query_norms.cpu()
    return CandidateScores({k: v.cpu() for k, v in per_module.items()}, token_parts if token_shares else None,
                           torch.cat(hidden_parts) if representations else None, candidate_norms, query_norms)
