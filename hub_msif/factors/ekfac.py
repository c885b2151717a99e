"""EK-FAC factors of one module: accumulation, eigendecomposition and preconditioning.

Math (docs/design.md, "Fitting EK-FAC" to "Preconditioning and damping"), per module with blocks b of its output rows:

- covariance pass: ``A = sum_t a_t a_t^T``, ``S_b = sum_t g_t[b] g_t[b]^T`` over real tokens;
- float64 eigendecomposition ``A = Q_A diag(eig_a) Q_A^T``, ``S_b = Q_S,b diag(eig_s,b) Q_S,b^T``;
- correction pass: ``Lambda_b = mean_n (Q_S,b^T G_n[b] Q_A) ** 2`` over sequences n;
- preconditioning: ``P(V)_b = Q_S,b [(Q_S,b^T V_b Q_A) / (Lambda_b + damping)] Q_A^T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hub_msif.errors import MsifValueError
from hub_msif.factors.architectures import TrackedModule

# Largest number of elements of per-sequence rotated gradients formed at once (~256 MB float32).
_MAX_CHUNK_ELEMENTS = 64 * 1024 * 1024
# Gram matrices at least this wide are formed block by block, upper triangle only (see _gram).
_GRAM_BLOCK = 256


def _gram(x: torch.Tensor) -> torch.Tensor:
    """``x^T x`` for ``x`` of shape ``[n, d]``, computing only the blocks on and above the diagonal.

    The lower blocks are the transposes of the upper ones, so wide matrices (``d >= 2 * _GRAM_BLOCK``)
    cost about 5/8 of the multiply-adds of one ``x.t() @ x`` (the fit's covariance pass spends most of
    its time here for 1024-wide layers). Each entry is the same dot product over ``n`` as before.
    """
    d = x.shape[1]
    if d < 2 * _GRAM_BLOCK:
        return x.t() @ x
    blocks = max(2, round(d / _GRAM_BLOCK))
    edges = [d * i // blocks for i in range(blocks + 1)]
    out = x.new_empty(d, d)
    for i in range(blocks):
        rows = slice(edges[i], edges[i + 1])
        left = x[:, rows].t()
        for j in range(i, blocks):
            cols = slice(edges[j], edges[j + 1])
            block = left @ x[:, cols]
            out[rows, cols] = block
            if j != i:
                out[cols, rows] = block.t()
    return out


@dataclass
class ModuleFactors:
    """Stored factors of one module.

    ``q_a``: ``[d_in, d_in]``, ``q_s``: ``[num_blocks, block_size, block_size]``,
    ``lam``: ``[num_blocks, block_size, d_in]`` (corrected eigenvalues), ``eig_a``: ``[d_in]`` and
    ``eig_s``: ``[num_blocks, block_size]``: eigenvalues of ``A / num_tokens`` and ``S / num_sequences``,
    so that ``eig_s (x) eig_a`` is the K-FAC approximation (uncorrected eigenvalues, kept for
    comparisons) of the same mean-over-sequences GGN as ``lam``: with T tokens over N sequences,
    ``E_n[vec G_n vec G_n^T] ~ (T/N) E_t[a a^T] (x) E_t[g g^T] = (A/T) (x) (S/N)``.
    """

    spec: TrackedModule
    q_a: torch.Tensor
    q_s: torch.Tensor
    lam: torch.Tensor
    eig_a: torch.Tensor
    eig_s: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"q_a": self.q_a, "q_s": self.q_s, "lam": self.lam, "eig_a": self.eig_a, "eig_s": self.eig_s}

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ModuleFactors:
        moved = {k: v.to(device=device, dtype=dtype) for k, v in self.tensors().items()}
        return ModuleFactors(self.spec, **moved)

    def damping_value(self, damping: float, relative: bool = False) -> float:
        """Absolute damping, or ``damping * mean(Lambda)`` when ``relative``."""
        if damping < 0:
            raise MsifValueError(f"damping must be non-negative, got {damping}")
        return float(damping * self.lam.double().mean()) if relative else float(damping)

    def operands(
        self, grads: torch.Tensor, damping: float, relative: bool = False, eigenvalues: str = "ekfac"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q_a, q_s, Lambda + damping)`` in the dtype and on the device of ``grads``, after
        checking that ``grads`` (``[..., d_out, d_in]``) fits this module."""
        spec = self.spec
        if grads.shape[-2:] != (spec.d_out, spec.d_in):
            raise MsifValueError(
                f"module {spec.name!r}: gradient shape {tuple(grads.shape[-2:])} does not match "
                f"the factors' ({spec.d_out}, {spec.d_in})"
            )
        if eigenvalues == "ekfac":
            lam = self.lam
        elif eigenvalues == "kfac":
            lam = self.eig_s.unsqueeze(-1) * self.eig_a
        else:
            raise MsifValueError(f"eigenvalues must be 'ekfac' or 'kfac', not {eigenvalues!r}")
        scale = float(lam.double().mean()) if relative else 1.0  # mean of the eigenvalues in use
        q_a, q_s, lam = (t.to(device=grads.device, dtype=grads.dtype) for t in (self.q_a, self.q_s, lam))
        return q_a, q_s, lam + self.damping_value(damping) * scale

    def blocks(self, grads: torch.Tensor) -> torch.Tensor:
        """``[..., d_out, d_in]`` viewed as ``[..., num_blocks, block_size, d_in]``."""
        return grads.reshape(*grads.shape[:-2], self.spec.num_blocks, self.spec.block_size, self.spec.d_in)

    def precondition(
        self, grads: torch.Tensor, damping: float, relative: bool = False, eigenvalues: str = "ekfac"
    ) -> torch.Tensor:
        """``P(V)`` for gradients ``grads`` of shape ``[..., d_out, d_in]``; stored tensors never change.

        ``eigenvalues="kfac"`` uses the uncorrected Kronecker eigenvalues ``eig_s (x) eig_a``.
        Relative damping is ``damping`` times the mean of the eigenvalues in use.
        """
        q_a, q_s, denominator = self.operands(grads, damping, relative, eigenvalues)
        rotated = q_s.transpose(-1, -2) @ self.blocks(grads) @ q_a
        back = q_s @ (rotated / denominator) @ q_a.transpose(-1, -2)
        return back.reshape(grads.shape)


def precondition_twice(
    first: ModuleFactors, second: ModuleFactors, grads: torch.Tensor, damping: float, relative: bool = False,
    second_damping: float | None = None,
) -> torch.Tensor:
    """``P_second(P_first(V))`` with six matrix products per gradient instead of eight.

    The rotation back out of the first eigenbasis and into the second is merged into one change
    of basis, ``Q_S2^T Q_S1`` and ``Q_A1^T Q_A2``, formed once for all gradients.
    ``second_damping`` (default: ``damping``) damps the second stage on its own
    (docs/design.md, "Per-stage damping").
    """
    if first.spec.block_labels != second.spec.block_labels:
        raise MsifValueError(f"module {first.spec.name!r}: the two stages split the output into different blocks")
    qa1, qs1, den1 = first.operands(grads, damping, relative)
    qa2, qs2, den2 = second.operands(grads, damping if second_damping is None else second_damping, relative)
    basis_s, basis_a = qs2.transpose(-1, -2) @ qs1, qa1.transpose(-1, -2) @ qa2
    inner = qs1.transpose(-1, -2) @ first.blocks(grads) @ qa1 / den1
    inner = basis_s @ inner @ basis_a / den2
    return (qs2 @ inner @ qa2.transpose(-1, -2)).reshape(grads.shape)


class CovarianceAccumulator:
    """Sums ``A`` and the ``S_b`` blocks of one module in ``dtype`` (float64 by default; float32
    halves the memory, see docs/design.md, "Precision")."""

    def __init__(self, spec: TrackedModule, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        self.spec = spec
        self.a = torch.zeros(spec.d_in, spec.d_in, dtype=dtype, device=device)
        self.s = torch.zeros(
            spec.num_blocks, spec.block_size, spec.block_size, dtype=dtype, device=device
        )

    def update(self, a: torch.Tensor, g: torch.Tensor) -> None:
        """Adds one batch: ``a`` ``[B, T, d_in]``, ``g`` ``[B, T, d_out]`` (zero on padding)."""
        # One Gram matrix per batch in the compute dtype, added into the (wider) sum without a converted copy.
        self.a += _gram(a.reshape(-1, self.spec.d_in))
        if self.spec.num_blocks == 1:
            self.s[0] += _gram(g.reshape(-1, self.spec.d_out))
        else:
            g = g.reshape(-1, self.spec.num_blocks, self.spec.block_size)
            self.s += torch.einsum("nbi,nbj->bij", g, g)

    def state(self) -> dict[str, torch.Tensor]:
        return {"a": self.a, "s": self.s}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.a.copy_(state["a"])
        self.s.copy_(state["s"])

    def eigendecompose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(eig_a, q_a, eig_s, q_s) from float64 ``eigh`` of the symmetrised sums (whatever the
        accumulation dtype), contiguous."""
        a, s = self.a.double(), self.s.double()
        eig_a, q_a = torch.linalg.eigh(0.5 * (a + a.t()))
        eig_s, q_s = torch.linalg.eigh(0.5 * (s + s.transpose(-1, -2)))
        return eig_a, q_a, eig_s, q_s


class LambdaAccumulator:
    """Sums per-sequence ``(Q_S^T G_n Q_A) ** 2`` of one module in ``accumulate_dtype`` (float64
    by default)."""

    def __init__(self, spec: TrackedModule, q_a: torch.Tensor, q_s: torch.Tensor, dtype: torch.dtype,
                 accumulate_dtype: torch.dtype = torch.float64):
        self.spec = spec
        self.q_a = q_a.to(dtype)
        self.q_s = q_s.to(dtype)
        self.lam = torch.zeros(
            spec.num_blocks, spec.block_size, spec.d_in, dtype=accumulate_dtype, device=q_a.device
        )

    def update(self, a: torch.Tensor, g: torch.Tensor) -> None:
        """Adds each sequence of one batch: ``a`` ``[B, T, d_in]``, ``g`` ``[B, T, d_out]``.

        Per token, ``a`` and ``g`` are rotated once (``T d_in^2 + T d_out bs``); each sequence's
        rotated gradient is then one batched matrix product over its tokens, squared in place and
        summed over the batch in the compute dtype before the addition into ``lam``."""
        spec = self.spec
        a_rot = a @ self.q_a  # [B, T, d_in]
        if spec.num_blocks == 1:
            g_rot = g @ self.q_s[0]  # [B, T, d_out]
        else:
            g_rot = torch.einsum(
                "btni,nij->btnj", g.reshape(*g.shape[:2], spec.num_blocks, spec.block_size), self.q_s
            ).reshape(g.shape)
        lam = self.lam.view(spec.d_out, spec.d_in)
        chunk = max(1, _MAX_CHUNK_ELEMENTS // (spec.d_out * spec.d_in))
        for start in range(0, a.shape[0], chunk):
            # [b, d_out, d_in]: each sequence's rotated gradient, squared in place
            rotated = torch.bmm(g_rot[start : start + chunk].transpose(1, 2), a_rot[start : start + chunk])
            lam += rotated.square_().sum(0)

    def state(self) -> dict[str, torch.Tensor]:
        return {"lam": self.lam}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.lam.copy_(state["lam"])
