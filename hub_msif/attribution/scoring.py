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

Sign: a positive score means that training more on the candidate lowers the query's answer
loss, i.e. the candidate supports the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from hub_msif.attribution.baselines import mean_last_hidden
from hub_msif.data import collate
from hub_msif.errors import MsifValueError
from hub_msif.factors.capture import GradientCapture, compute_dtype, input_gradients_only
from hub_msif.factors.ekfac import precondition_twice
from hub_msif.factors.objectives import lm_loss
from hub_msif.factors.storage import StageFactors
from hub_msif.factors.tracking import TrackedModule

GRADIENT_METHODS = ("ms-if", "ss-if", "gdp")
_MAX_CHUNK_ELEMENTS = 32 * 1024 * 1024


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
            if want_hidden:
                representations.append(mean_last_hidden(outputs, batch["attention_mask"]))
            lm_loss(outputs.logits, batch, "empirical").backward()
    return {name: torch.cat(parts) for name, parts in grads.items()}


def precondition_queries(
    query_grads: Mapping[str, torch.Tensor], method: str, finetuned: StageFactors | None,
    pretrained: StageFactors | None, damping: float, relative: bool = True,
) -> dict[str, torch.Tensor]:
    """``W_q`` per module for ``method``: ``P_pt(P_ft(G_q))`` (MS-IF), ``P_ft(G_q)`` (SS-IF) or ``G_q`` (GDP)."""
    if method not in GRADIENT_METHODS:
        raise MsifValueError(f"unknown gradient method {method!r}; use one of {', '.join(GRADIENT_METHODS)}")
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
        name: precondition_twice(finetuned.modules[name], pretrained.modules[name], grad, damping, relative)
        for name, grad in query_grads.items()
    }


@dataclass
class CandidateScores:
    """Scores of C candidates against Q queries: ``per_module[name]`` is ``[C, Q]``; ``total`` their sum.

    ``tokens[c]`` (when asked for) is ``[T_c, Q]``: each candidate token's share ``g_t^T W_q a_t``,
    summed over modules; it sums to the candidate's total. ``representations`` (when asked for)
    is ``[C, hidden]``: each candidate's mean last hidden state, from the same pass (RepSim).
    """

    per_module: dict[str, torch.Tensor]
    tokens: list[torch.Tensor] | None = None
    representations: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        return torch.stack(list(self.per_module.values())).sum(0)


def score_candidates(
    model: torch.nn.Module, specs: Sequence[TrackedModule], weights: Mapping[str, torch.Tensor],
    candidates: Sequence[dict], pad_id: int, batch_size: int = 8, token_shares: bool = False,
    show_progress: bool = False, representations: bool = False,
) -> CandidateScores:
    """``<W_q, G_c>`` for every candidate c and query q, streaming candidates in batches.

    ``weights[name]`` is ``[Q, d_out, d_in]``; ``candidates`` are token sequences whose summed
    loss defines ``G_c`` (true labels).
    """
    from tqdm.auto import tqdm

    if not candidates:
        raise MsifValueError("no candidates to score")
    by_name = {s.name: s for s in specs}
    missing = [name for name in by_name if name not in weights]
    if missing:
        raise MsifValueError(f"no query weights for module(s) {', '.join(missing)}")
    device = next(model.parameters()).device
    dtype = compute_dtype(model)
    w = {name: weights[name].to(device=device, dtype=dtype) for name in by_name}
    num_queries = next(iter(w.values())).shape[0]
    w_flat = {name: wq.reshape(num_queries, -1).double() for name, wq in w.items()}  # [Q, d_out * d_in]
    # Preallocated outputs, filled batch by batch: many small score tensors kept alive between the
    # large transient per-batch gradients fragment the CPU heap, and RSS then grew with C.
    per_module = {name: torch.zeros(len(candidates), num_queries, dtype=dtype, device=device) for name in by_name}
    batch_start = 0
    token_parts: list[torch.Tensor] = []
    hidden_parts: list[torch.Tensor] = []
    batch_tokens: dict[str, torch.Tensor] = {}

    def consume(spec, a, g):  # a: [B, T, d_in], g: [B, T, d_out]
        wq, wq_flat = w[spec.name], w_flat[spec.name]  # [Q, d_out, d_in], [Q, d_out * d_in]
        out = per_module[spec.name]  # [C, Q]
        chunk = max(1, _MAX_CHUNK_ELEMENTS // (spec.d_out * spec.d_in))
        for start in range(0, a.shape[0], chunk):
            grad = g[start : start + chunk].transpose(1, 2) @ a[start : start + chunk]  # [b, d_out, d_in]
            rows = slice(batch_start + start, batch_start + start + grad.shape[0])
            # One matrix product: einsum("boi,qoi->bq") took 9x (Q=32) to 40x (Q=1) longer on CPU. In float64:
            # a float32 sum over d_out * d_in terms moved by ~1e-6 of the scale with the batch's shape
            # (candidates per batch, queries per pass), so one query alone and many together disagreed.
            out[rows] += (grad.reshape(grad.shape[0], -1).double() @ wq_flat.T).to(out.dtype)  # += : module used twice
        if token_shares:
            share = torch.einsum("bto,qoi,bti->btq", g, wq, a)
            batch_tokens[spec.name] = share

    capture = GradientCapture(model, specs, consume)
    with input_gradients_only(model), capture:
        for start in tqdm(range(0, len(candidates), batch_size), desc="scoring candidates", disable=not show_progress,
                          leave=False):
            chunk = candidates[start : start + batch_size]
            batch = collate(chunk, range(start, start + len(chunk)), pad_id, device)
            capture.mask = batch["attention_mask"]
            batch_start = start
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                            output_hidden_states=representations)
            if representations:
                hidden_parts.append(mean_last_hidden(outputs, batch["attention_mask"]))
            lm_loss(outputs.logits, batch, "empirical").backward()
            if token_shares:
                summed = torch.stack(list(batch_tokens.values())).sum(0)  # [B, T, Q]
                token_parts.extend(summed[i, : len(seq["input_ids"])].cpu() for i, seq in enumerate(chunk))
    return CandidateScores({k: v.cpu() for k, v in per_module.items()}, token_parts if token_shares else None,
                           torch.cat(hidden_parts) if representations else None)

