"""Refined query iHVPs: a few EK-FAC-preconditioned conjugate-gradient steps on exact GGN products.

docs/design.md, "Refined queries". For one stage with EK-FAC factors, a model and a curvature
sample of M sequences of the stage's fitting data:

- ``GGNProduct``: ``v -> G v = (1/M) sum_n J_n^T H_n J_n v`` over the tracked modules' weights
  (bias as the last column, the ``[d_out, d_in]`` layout of every gradient in the package).
  ``J_n`` is the Jacobian of sequence n's logits, ``H_n`` the Hessian of its summed softmax
  cross-entropy with respect to the logits at the positions that carry loss,
  ``diag(p) - p p^T`` with p the model's own predictive distribution: the matrix whose
  expectation EK-FAC's sampled-label Lambda pass estimates ("Per-sequence Lambda"). ``J v`` is a
  double backward through the graph of ``J^T u0`` (dummy cotangent ``u0``), ``J^T u`` a plain
  backward; both batched over the vectors.
- ``refine``: preconditioned CG on ``(G + D) x = b`` with ``D`` the damping of
  "Preconditioning and damping" (relative: ``ratio * mean(Lambda)`` per module, the very value
  EK-FAC adds) and preconditioner ``P = (EKFAC + D)^-1``, started from ``x_0 = P b``: zero steps
  return plain EK-FAC exactly, and the iterates converge to ``(G + D)^-1 b``.
- ``refine_queries``: what ``precondition_queries`` computes, refined: SS-IF solves under the
  fine-tuned stage, MS-IF then solves the result again under the pre-trained stage.

Each step costs one GGN product per stage, i.e. about three backward-sized passes and one
forward over the curvature sample for all queries together; candidates are untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import cast

import torch

from hub_msif.attribution.scoring import GRADIENT_METHODS, precondition_queries
from hub_msif.data import DEFAULT_TEMPLATE, collate
from hub_msif.errors import MsifValueError
from hub_msif.factors.architectures import TrackedModule
from hub_msif.factors.objectives import shifted_targets
from hub_msif.factors.storage import StageFactors

Vectors = dict[str, torch.Tensor]  # {module name: [K, d_out, d_in]}


@contextlib.contextmanager
def _tracked_parameters(model: torch.nn.Module, specs: Sequence[TrackedModule]) -> Iterator[list[torch.Tensor]]:
    """Only the tracked modules' weights and biases require grad (restored on exit); the SDPA
    math kernel, whose backward is itself differentiable, serves any attention that uses SDPA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    saved = [(p, p.requires_grad) for p in model.parameters()]
    params: list[torch.Tensor] = []
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        for spec in specs:
            module = model.get_submodule(spec.name)
            weight = cast(torch.Tensor, module.weight)
            weight.requires_grad_(True)
            params.append(weight)
            if spec.has_bias:
                bias = cast(torch.Tensor, module.bias)
                bias.requires_grad_(True)
                params.append(bias)
        with sdpa_kernel([SDPBackend.MATH]):
            yield params
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


class GGNProduct:
    """Exact products with the Gauss-Newton matrix of the mean-over-sequences summed loss.

    ``model``: the stage's model (eval mode); ``specs``: the tracked modules; ``sequences``: the
    curvature sample (``input_ids``, ``labels``; ``-100`` = no loss, as in the fit); labels
    themselves never matter, only which positions carry loss. The graph is rebuilt for every
    product, ``batch_size`` sequences at a time, so memory stays that of one batch with
    ``[K, batch, T, vocab]`` output-space tangents.
    """

    def __init__(self, model: torch.nn.Module, specs: Sequence[TrackedModule], sequences: Sequence[dict],
                 pad_id: int, batch_size: int = 8):
        if not sequences:
            raise MsifValueError("the curvature sample is empty")
        if batch_size < 1:
            raise MsifValueError(f"batch size must be at least 1, got {batch_size}")
        self.model, self.specs, self.sequences = model, list(specs), list(sequences)
        self.pad_id, self.batch_size = pad_id, batch_size
        self.device = next(model.parameters()).device

    def _tangents(self, vectors: Mapping[str, torch.Tensor], params: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for spec in self.specs:
            mat = vectors[spec.name]
            weight = mat[..., : spec.d_in - int(spec.has_bias)]
            out.append((weight.transpose(-1, -2) if spec.transposed else weight).contiguous())
            if spec.has_bias:
                out.append(mat[..., -1].contiguous())
        return [t.to(device=p.device, dtype=p.dtype) for t, p in zip(out, params)]

    def _matrices(self, grads: Sequence[torch.Tensor | None], params: list[torch.Tensor], k: int) -> Vectors:
        filled = [torch.zeros(k, *p.shape, dtype=p.dtype, device=p.device) if g is None else g
                  for g, p in zip(grads, params)]
        out, i = {}, 0
        for spec in self.specs:
            weight = filled[i].transpose(-1, -2) if spec.transposed else filled[i]
            i += 1
            if spec.has_bias:
                weight = torch.cat([weight, filled[i].unsqueeze(-1)], -1)
                i += 1
            out[spec.name] = weight
        return out

    def __call__(self, vectors: Mapping[str, torch.Tensor]) -> Vectors:
        """``G v`` for ``vectors`` ``{name: [K, d_out, d_in]}`` (every tracked module), same layout."""
        missing = [s.name for s in self.specs if s.name not in vectors]
        if missing:
            raise MsifValueError(f"no vector for module(s) {', '.join(missing)}")
        k = next(iter(vectors.values())).shape[0]
        total: Vectors | None = None
        with _tracked_parameters(self.model, self.specs) as params:
            tangents = self._tangents(vectors, params)
            for start in range(0, len(self.sequences), self.batch_size):
                chunk = self.sequences[start : start + self.batch_size]
                batch = collate(chunk, range(start, start + len(chunk)), self.pad_id, self.device)
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False).logits
                _, valid = shifted_targets(batch)
                mask = torch.zeros(logits.shape[:2], dtype=logits.dtype, device=logits.device)
                mask[:, :-1] = valid.to(logits.dtype)  # logits at t predict token t+1
                u0 = torch.zeros_like(logits, requires_grad=True)
                jt_u0 = torch.autograd.grad(logits, params, u0, create_graph=True)
                jv = torch.autograd.grad(jt_u0, u0, tangents, is_grads_batched=True, retain_graph=True)[0]
                probs = torch.softmax(logits.detach().double(), -1).to(logits.dtype)
                hjv = probs * (jv - (probs * jv).sum(-1, keepdim=True)) * mask.unsqueeze(-1)
                grads = torch.autograd.grad(logits, params, hjv, is_grads_batched=True, allow_unused=True)
                part = self._matrices(grads, params, k)
                total = part if total is None else {n: total[n] + part[n] for n in total}
                del logits, u0, jt_u0, jv, hjv, grads
        if total is None:
            raise RuntimeError("no curvature sequences")  # never: the constructor refuses an empty sample
        return {n: v / len(self.sequences) for n, v in total.items()}


def _dot(x: Vectors, y: Vectors) -> torch.Tensor:
    """Per-vector inner products ``[K]`` summed over modules."""
    return cast(torch.Tensor, sum((x[n] * y[n]).flatten(1).sum(1) for n in x))


def refine(stage: StageFactors, product: Callable[[Vectors], Vectors], vectors: Mapping[str, torch.Tensor],
           damping: float, relative: bool = True, steps: int = 2,
           on_step: Callable[[int, Vectors], None] | None = None) -> Vectors:
    """``(G + D)^-1 b`` for each ``b`` in ``vectors`` by ``steps`` EK-FAC-preconditioned CG steps.

    ``G``: ``product`` (a ``GGNProduct`` of this stage); ``D``: per module
    ``ModuleFactors.damping_value(damping, relative)``, the damping EK-FAC adds; started from
    plain EK-FAC, ``stage.precondition(vectors, damping, relative)``, which zero steps return
    unchanged. ``on_step(i, x_i)`` sees every iterate (``i = 0 .. steps``). Each step costs one
    product, plus one for the initial residual.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise MsifValueError(f"refinement steps must be a non-negative integer, got {steps!r}")
    names = list(vectors)
    missing = [n for n in names if n not in stage.modules]
    if missing:
        raise MsifValueError(f"no {stage.stage} factors for module(s) {', '.join(missing)}")
    lam = {n: stage.modules[n].damping_value(damping, relative) for n in names}

    def precondition(r: Vectors) -> Vectors:
        return stage.precondition(r, damping, relative)

    def apply(v: Vectors) -> Vectors:
        gv = product(v)
        return {n: gv[n].to(v[n].dtype) + lam[n] * v[n] for n in names}

    b = dict(vectors)
    x = precondition(b)
    if on_step is not None:
        on_step(0, x)
    if steps == 0:
        return x
    ax = apply(x)
    r = {n: b[n] - ax[n] for n in names}
    z = precondition(r)
    p = dict(z)
    rz = _dot(r, z)
    for step in range(1, steps + 1):
        ap = apply(p)
        curvature = _dot(p, ap)
        # A vector already solved (zero residual) has p = 0: it stays where it is.
        alpha = torch.where(curvature > 0, rz / torch.where(curvature > 0, curvature, 1.0), 0.0)
        x = {n: x[n] + _bcast(alpha, x[n]) * p[n] for n in names}
        if on_step is not None:
            on_step(step, x)
        if step == steps:
            break
        r = {n: r[n] - _bcast(alpha, r[n]) * ap[n] for n in names}
        z = precondition(r)
        rz_new = _dot(r, z)
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, 1.0), 0.0)
        p = {n: z[n] + _bcast(beta, p[n]) * p[n] for n in names}
        rz = rz_new
    return x


def _bcast(scalars: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scalars.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def refine_queries(query_grads: Mapping[str, torch.Tensor], method: str, finetuned: StageFactors | None,
                   pretrained: StageFactors | None, damping: float, relative: bool = True, steps: int = 0,
                   products: Mapping[str, Callable[[Vectors], Vectors]] | None = None) -> Vectors:
    """``W_q`` of ``precondition_queries`` with each EK-FAC inverse refined by ``steps`` CG steps.

    SS-IF: ``(G_ft + D_ft)^-1 G_q``; MS-IF: ``(G_pt + D_pt)^-1 (G_ft + D_ft)^-1 G_q``, each
    inverse refined under its own stage's GGN (``products[stage]``, a ``GGNProduct``); GDP has
    no inverse. Zero steps is ``precondition_queries`` itself.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise MsifValueError(f"refinement steps must be a non-negative integer, got {steps!r}")
    if steps == 0 or method == "gdp":
        return precondition_queries(query_grads, method, finetuned, pretrained, damping, relative)
    if method not in GRADIENT_METHODS:
        raise MsifValueError(f"unknown gradient method {method!r}; use one of {', '.join(GRADIENT_METHODS)}")
    stages = ["finetuned"] + (["pretrained"] if method == "ms-if" else [])
    factors = {"finetuned": finetuned, "pretrained": pretrained}
    products = products or {}
    checked: dict[str, StageFactors] = {}
    for stage in stages:
        stage_factors = factors[stage]
        if stage_factors is None:
            raise MsifValueError(f"{method} needs the {stage} stage's factors")
        if stage not in products:
            raise MsifValueError(f"refining {method} needs a curvature sample of the {stage} stage's data")
        checked[stage] = stage_factors
    out = dict(query_grads)
    for stage in stages:
        out = refine(checked[stage], products[stage], out, damping, relative, steps)
    return out


DEFAULT_CURVATURE_SEQUENCES = 64


def _recorded_files(recorded: dict):
    """The local files of a stage's recorded corpus: found on this machine by their content's
    sha256 (``local_folders``), else (older manifests) the recorded paths themselves."""
    from hub_msif.artifacts.local_folders import lookup

    found = lookup(recorded["source_sha256"]) if recorded.get("source_sha256") else None
    return [str(f) for f in found] if found is not None else recorded.get("data")


def curvature_sequences(stage: StageFactors, tokenizer, given=None, size: int = DEFAULT_CURVATURE_SEQUENCES,
                        seed: int = 0) -> list[dict]:
    """The curvature sample of one stage: at most ``size`` sequences of its fitting data.

    ``given``: token sequences (dicts with ``input_ids`` and ``labels``) used as they are, or
    local file(s) read and tokenized as the stage's fit recorded (columns, template, maximum
    length); None: the files the stage's manifest ``data`` names, when they are local and still
    exist. Files are sampled at random (``seed``) among the rows the fit read, before
    tokenization. docs/design.md, "Refined queries".
    """
    from hub_msif.data import CorpusSpec, load_rows, tokenize_corpus

    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise MsifValueError(f"the curvature sample size must be a positive integer, got {size!r}")
    if isinstance(given, (list, tuple)) and given and all(isinstance(s, Mapping) for s in given):
        bad = [i for i, s in enumerate(given) if len(s.get("input_ids", ())) < 2 or
               len(s.get("labels", ())) != len(s["input_ids"])]
        if bad:
            raise MsifValueError(f"curvature sequence {bad[0]} needs input_ids of at least 2 tokens and labels "
                                 "of the same length")
        return list(given)[:size]
    recorded = dict(stage.info.get("data") or {})
    files = given if given is not None else _recorded_files(recorded)
    items = [files] if isinstance(files, (str, Path)) else list(files or [])
    if not items or not all(Path(str(f)).exists() for f in items):
        where = "the given curvature data" if given is not None else \
            f"the {stage.stage} factors record no local data file ({recorded.get('data')!r})"
        raise MsifValueError(f"no curvature sample for the {stage.stage} stage: {where} does not exist; give a local "
                             f"file of its fitting data (curvature_data={{{stage.stage!r}: FILE}}, "
                             f"--refine-data {stage.stage}=FILE)")
    spec = CorpusSpec(data=[str(f) for f in items], text_column=recorded.get("text_column"),
                      prompt_column=recorded.get("prompt_column"), response_column=recorded.get("response_column"),
                      template=recorded.get("template") or DEFAULT_TEMPLATE,
                      max_length=recorded.get("max_length") or 512)
    rows = load_rows(spec)
    available = min(len(rows), recorded.get("max_sequences") or len(rows))
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:size]
    sequences, _ = tokenize_corpus(rows.select(sorted(order.tolist())), tokenizer, spec)
    return sequences
