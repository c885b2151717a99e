"""The seeded projection of the gradient index (docs/design.md, "Gradient index").

Per tracked module, with the pre-trained stage's eigenbasis ``Q_S`` (block-diagonal over the
module's blocks), ``Q_A`` and ``M = 1 / (Lambda_pt + damping)``:

- side scales ``s`` [d_out], ``t`` [d_in]: the rank-1 log-space least-squares fit of ``M^balance``
  (``log s_i + log t_j ~ balance * log M_ij``), at the build's damping;
- ``P_S = Q_S diag(s)``, ``P_A = Q_A diag(t)``; seeded Gaussian ``R_S`` [d_out, k_s], ``R_A``
  [d_in, k_a], entries N(0, 1/k) (a side with ``k >= d`` keeps the identity);
- a candidate's module block is ``R_S^T P_S^T G_c P_A R_A`` [k_s, k_a], formed from the per-token
  ``(g_t P_S R_S)^T (a_t P_A R_A)`` inside the backward hook; the query's is
  ``R_S^T (X ⊙ M ⊘ (s t^T)) R_A`` with ``X = Q_S^T P_ft(G_q) Q_A`` at the query's damping;
- the blocks of all modules are mixed into ``dims`` numbers by seeded ``B_m`` [dims, k_s k_a]
  (N(0, 1/dims)), summed over modules.

The inner product of a query's and a candidate's vectors is MS-IF in expectation, and exactly MS-IF
with ``kind = "identity"`` (no ``R``, no mixing: each module's full scaled gradient, concatenated).
Every random matrix is drawn on the CPU in float64 from a ``torch.Generator`` seeded by
``(seed, module name, what)``, so a build and a query on other machines draw the same ones.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence

import torch

from hub_msif.attribution.checks import DEFAULT_DAMPING
from hub_msif.attribution.gradient_defaults import DEFAULT_BALANCE, DEFAULT_DIMS, DEFAULT_K, PROJECTION_KINDS
from hub_msif.attribution.scoring import finetuned_in_pretrained_basis
from hub_msif.data import collate
from hub_msif.errors import MsifValueError
from hub_msif.factors.architectures import TrackedModule
from hub_msif.factors.capture import GradientCapture, compute_dtype, input_gradients_only
from hub_msif.factors.ekfac import ModuleFactors
from hub_msif.factors.objectives import lm_loss
from hub_msif.factors.storage import StageFactors


def _seeded(seed: int, name: str, what: str) -> torch.Generator:
    digest = hashlib.sha256(f"hub_msif.gradindex/{seed}/{name}/{what}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def gaussian(rows: int, cols: int, variance_of: int, seed: int, name: str, what: str) -> torch.Tensor:
    """``[rows, cols]`` float64 on the CPU, entries N(0, 1 / variance_of), drawn from ``(seed, name, what)``."""
    generator = _seeded(seed, name, what)
    return torch.randn(rows, cols, generator=generator, dtype=torch.float64) / math.sqrt(variance_of)


def damped_inverse(factors: ModuleFactors, damping: float, relative: bool) -> torch.Tensor:
    """``M = 1 / (Lambda + damping)`` as ``[d_out, d_in]`` float64 (blocks as rows), damping as ``operands``."""
    lam = factors.lam.double().reshape(-1, factors.lam.shape[-1]).clamp_min(0)
    shift = factors.damping_value(damping) * (float(lam.mean()) if relative else 1.0)
    return 1.0 / (lam + max(shift, torch.finfo(torch.float64).tiny))


def side_scales(factors: ModuleFactors, balance: float, damping: float, relative: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, t)`` (float64, ``[d_out]``, ``[d_in]``): the rank-1 fit ``log s_i + log t_j`` of
    ``balance * log M_ij`` in least squares (row means; column means less the overall mean)."""
    log_m = balance * damped_inverse(factors, damping, relative).log()
    rows, cols = log_m.mean(1), log_m.mean(0) - log_m.mean()
    return rows.exp(), cols.exp()


def _check_settings(kind: str, dims: int, balance: float, seed: int, damping: float) -> None:
    if kind not in PROJECTION_KINDS:
        raise MsifValueError(f"projection must be one of {', '.join(PROJECTION_KINDS)}, not {kind!r}")
    if isinstance(dims, bool) or not isinstance(dims, int) or dims < 1:
        raise MsifValueError(f"dims must be a whole number of at least 1, got {dims!r}")
    if isinstance(balance, bool) or not isinstance(balance, (int, float)) or not 0 <= balance <= 1:
        raise MsifValueError(f"balance must be a number from 0 to 1, got {balance!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise MsifValueError(f"seed must be a non-negative whole number, got {seed!r}")
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise MsifValueError(f"damping must be a non-negative number, got {damping!r}")


class GradientProjection:
    """The projection of one pre-trained stage's modules (see the module docstring).

    ``k``: per side and module, an int for every module or ``{name: (k_s, k_a)}``; each side is
    capped at the module's dimension (``k >= d``: the identity on that side). ``kind="identity"``
    keeps every module whole (``k`` and ``dims`` are then set by the shapes). ``matrices``
    (``{name: (R_S, R_A)}``) replaces the seeded ``R`` of those modules (checks only).
    """

    def __init__(self, pretrained: StageFactors, kind: str = "kronecker", k: int | Mapping[str, Sequence[int]] = DEFAULT_K,
                 dims: int = DEFAULT_DIMS, balance: float = DEFAULT_BALANCE, seed: int = 0,
                 damping: float = DEFAULT_DAMPING, relative: bool = True,
                 matrices: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None):
        _check_settings(kind, dims, balance, seed, damping)
        if not pretrained.modules:
            raise MsifValueError("the pre-trained stage has no modules to project")
        self.pretrained, self.kind, self.balance, self.seed = pretrained, kind, float(balance), seed
        self.damping, self.relative = float(damping), bool(relative)
        self.k: dict[str, tuple[int, int]] = {}
        for name, factors in pretrained.modules.items():
            spec = factors.spec
            if kind == "identity":
                wanted: Sequence[int] = (spec.d_out, spec.d_in)
            elif isinstance(k, Mapping):
                if name not in k:
                    raise MsifValueError(f"no projection size k for module {name}")
                wanted = k[name]
            else:
                wanted = (k, k)
            sides = tuple(int(x) for x in wanted)
            if len(sides) != 2 or any(isinstance(x, bool) or x < 1 for x in wanted):
                raise MsifValueError(f"module {name}: k must be two whole numbers of at least 1, got {wanted!r}")
            self.k[name] = (min(sides[0], spec.d_out), min(sides[1], spec.d_in))
        self._matrices = dict(matrices or {})
        for name, (r_s, r_a) in self._matrices.items():
            spec = pretrained.modules[name].spec
            if r_s.shape[0] != spec.d_out or r_a.shape[0] != spec.d_in:
                raise MsifValueError(f"module {name}: R_S must have {spec.d_out} rows and R_A {spec.d_in}")
            self.k[name] = (int(r_s.shape[1]), int(r_a.shape[1]))
        self.dims = sum(ks * ka for ks, ka in self.k.values()) if kind == "identity" else int(dims)
        self._scales: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._operators: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mixing: dict[str, torch.Tensor] = {}

    # -- settings --------------------------------------------------------------------------------

    def to_json(self) -> dict:
        """The settings the manifest records; ``from_json`` with the same factors gives the same projection."""
        return {"kind": self.kind, "seed": self.seed, "k": {n: list(v) for n, v in self.k.items()}, "dims": self.dims,
                "balance": self.balance, "damping": self.damping, "relative": self.relative}

    @classmethod
    def from_json(cls, settings: Mapping, pretrained: StageFactors) -> GradientProjection:
        try:
            k = {str(n): tuple(v) for n, v in settings["k"].items()}
            projection = cls(pretrained, str(settings["kind"]), k, int(settings["dims"]), float(settings["balance"]),
                             int(settings["seed"]), float(settings["damping"]), bool(settings["relative"]))
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise MsifValueError(f"the projection settings are incomplete or malformed: {err!r}") from None
        if set(k) != set(pretrained.modules):
            raise MsifValueError("the projection settings name other modules than the pre-trained factors")
        return projection

    @property
    def names(self) -> list[str]:
        return list(self.k)

    @property
    def specs(self) -> list[TrackedModule]:
        return [self.pretrained.modules[n].spec for n in self.k]

    # -- the matrices --------------------------------------------------------------------------

    def scales(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s, t)`` of a module, float64 on the CPU."""
        if name not in self._scales:
            self._scales[name] = side_scales(self.pretrained.modules[name], self.balance, self.damping, self.relative)
        return self._scales[name]

    def random_sides(self, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(R_S, R_A)`` of a module, float64 on the CPU; None for a side kept whole."""
        if name in self._matrices:
            given_s, given_a = self._matrices[name]
            return given_s.double().cpu(), given_a.double().cpu()
        spec, (ks, ka) = self.pretrained.modules[name].spec, self.k[name]
        r_s = None if ks >= spec.d_out else gaussian(spec.d_out, ks, ks, self.seed, name, "R_S")
        r_a = None if ka >= spec.d_in else gaussian(spec.d_in, ka, ka, self.seed, name, "R_A")
        return r_s, r_a

    def operators(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P_S R_S [d_out, k_s], P_A R_A [d_in, k_a])`` of a module, float64 on the CPU."""
        if name not in self._operators:
            factors = self.pretrained.modules[name]
            s, t = self.scales(name)
            q_s = torch.block_diag(*factors.q_s.double())  # [d_out, d_out]
            p_s, p_a = q_s * s, factors.q_a.double() * t
            r_s, r_a = self.random_sides(name)
            self._operators[name] = (p_s if r_s is None else p_s @ r_s, p_a if r_a is None else p_a @ r_a)
        return self._operators[name]

    def mixing(self, name: str) -> torch.Tensor | None:
        """``B_m`` [dims, k_s k_a] (float64, CPU), or None for ``kind="identity"`` (concatenation)."""
        if self.kind == "identity":
            return None
        if name not in self._mixing:
            ks, ka = self.k[name]
            self._mixing[name] = gaussian(self.dims, ks * ka, self.dims, self.seed, name, "B")
        return self._mixing[name]

    def offsets(self) -> dict[str, int]:
        """Identity kind: where each module's block starts in a vector."""
        out, at = {}, 0
        for name, (ks, ka) in self.k.items():
            out[name], at = at, at + ks * ka
        return out

    def candidate_operators(self, device=None, dtype=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{name: (P_S R_S, P_A R_A)}`` on ``device`` in ``dtype`` (identity: ``P_S``, ``P_A`` whole)."""
        return {name: tuple(x.to(device=device, dtype=dtype) for x in self.operators(name))  # type: ignore[misc]
                for name in self.k}

    # -- vectors ---------------------------------------------------------------------------------

    def query_vectors(self, query_grads: Mapping[str, torch.Tensor], finetuned: StageFactors,
                      pretrained: StageFactors | None = None, damping: float = DEFAULT_DAMPING,
                      relative: bool = True, damping_pretrained: float | None = None) -> torch.Tensor:
        """``[Q, dims]`` (float64, on the gradients' device): each query's vector, whose inner product
        with a candidate's is MS-IF at ``damping`` (exactly for ``kind="identity"``); with
        ``damping_pretrained``, the pre-trained stage's ``M`` takes that damping instead (per-stage
        damping, docs/design.md "Per-stage damping").

        ``pretrained`` defaults to the stage the projection was made for (it must be that stage).
        """
        pretrained = pretrained if pretrained is not None else self.pretrained
        missing = [n for n in self.k if n not in query_grads]
        if missing:
            raise MsifValueError(f"no query gradients for module(s) {', '.join(missing)}")
        grads = {n: query_grads[n].double() for n in self.k}
        rotated = finetuned_in_pretrained_basis(grads, finetuned, pretrained, damping, relative)
        num_queries = next(iter(grads.values())).shape[0]
        device = next(iter(grads.values())).device
        out = torch.zeros(num_queries, self.dims, dtype=torch.float64, device=device)
        offsets = self.offsets()
        for name in self.k:
            s, t = (x.to(device) for x in self.scales(name))
            inverse = damped_inverse(pretrained.modules[name], damping if damping_pretrained is None
                                     else damping_pretrained, relative).to(device)
            y = rotated[name] * (inverse / (s.unsqueeze(1) * t))  # [Q, d_out, d_in]
            r_s, r_a = self.random_sides(name)
            if r_s is not None:
                y = r_s.to(device).T @ y
            if r_a is not None:
                y = y @ r_a.to(device)
            block = y.reshape(num_queries, -1)
            mixing = self.mixing(name)
            if mixing is None:
                out[:, offsets[name] : offsets[name] + block.shape[1]] = block
            else:
                out += block @ mixing.to(device).T
        return out


class _VectorSink:
    """Each module's projected gradients of a batch, laid side by side in ``blocks`` [B, sum k_s k_a]
    (inside the hook); ``end`` mixes them into ``out`` with one matrix product (``[sum k_s k_a, dims]``,
    the ``B_m^T`` stacked) or, for ``identity``, copies them."""

    def __init__(self, projection: GradientProjection, device, dtype):
        self.operators = projection.candidate_operators(device, dtype)
        self.offsets = projection.offsets()
        self.width = sum(ks * ka for ks, ka in projection.k.values())
        mixing = [projection.mixing(n) for n in projection.names]
        self.mixing = (None if projection.kind == "identity" else
                       torch.cat([m.T for m in mixing if m is not None]).to(device=device, dtype=dtype))
        self.device, self.dtype = device, dtype
        self.out = torch.zeros(0, projection.dims, dtype=dtype, device=device)
        self.blocks = torch.zeros(0, self.width, dtype=dtype, device=device)
        self.batch_start = 0

    def begin(self, batch_start: int, size: int) -> None:
        self.batch_start = batch_start
        self.blocks = torch.zeros(size, self.width, dtype=self.dtype, device=self.device)

    def consume(self, spec: TrackedModule, a: torch.Tensor, g: torch.Tensor) -> None:
        ps, pa = self.operators[spec.name]
        block = (g @ ps).transpose(1, 2) @ (a @ pa)  # [B, k_s, k_a] = sum_t (g_t P_S R_S)^T (a_t P_A R_A)
        start = self.offsets[spec.name]
        self.blocks[:, start : start + block.shape[1] * block.shape[2]] += block.reshape(block.shape[0], -1)  # module may run twice

    def end(self) -> None:
        rows = slice(self.batch_start, self.batch_start + self.blocks.shape[0])
        self.out[rows] = self.blocks if self.mixing is None else self.blocks @ self.mixing


class CandidateVectors:
    """Projected candidate gradients of ``model`` (the projection's stage), batch after batch: the
    operators are cast and placed once, the hooks are registered per call."""

    def __init__(self, model: torch.nn.Module, specs: Sequence[TrackedModule], projection: GradientProjection,
                 pad_id: int):
        if {s.name for s in specs} != set(projection.names):
            raise MsifValueError("the modules to capture are not the modules of the projection")
        self.model, self.specs, self.projection, self.pad_id = model, list(specs), projection, pad_id
        self.device = next(model.parameters()).device
        self.dtype = compute_dtype(model)
        self.sink = _VectorSink(projection, self.device, self.dtype)

    def __call__(self, sequences: Sequence[dict], batch_size: int = 8) -> torch.Tensor:
        """``[N, dims]`` on the model's device, in its compute dtype."""
        sink = self.sink
        sink.out = torch.zeros(len(sequences), self.projection.dims, dtype=self.dtype, device=self.device)
        capture = GradientCapture(self.model, self.specs, sink.consume)
        with input_gradients_only(self.model), capture:
            for start in range(0, len(sequences), batch_size):
                chunk = sequences[start : start + batch_size]
                batch = collate(chunk, range(start, start + len(chunk)), self.pad_id, self.device)
                capture.mask = batch["attention_mask"]
                sink.begin(start, len(chunk))
                outputs = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     use_cache=False)
                lm_loss(outputs.logits, batch, "empirical").backward()
                sink.end()
        out, sink.out = sink.out, sink.out[:0]
        return out


def candidate_vectors(model: torch.nn.Module, specs: Sequence[TrackedModule], projection: GradientProjection,
                      sequences: Sequence[dict], pad_id: int, batch_size: int = 8) -> torch.Tensor:
    """``[N, dims]`` on the CPU, in the model's compute dtype (float64 for float64 models, else
    float32): each sequence's projected pre-trained gradient (true labels, summed loss), from one
    forward and backward pass per batch; no ``d_out x d_in`` matrix is formed per document."""
    return CandidateVectors(model, specs, projection, pad_id)(sequences, batch_size).cpu()
