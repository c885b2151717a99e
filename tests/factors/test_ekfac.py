"""ModuleFactors.precondition against dense float64 references (docs/design.md, "Preconditioning and damping").

The dense reference builds the full ``(d_out * d_in)``-square matrix
``(Q_S kron Q_A) (diag(Lambda) + damping)^-1 (Q_S kron Q_A)^T`` (``Q_S`` block-diagonal over the
module's output blocks) and applies it to ``vec(V)``, the row-major flattening of a
``d_out x d_in`` gradient, so the factored implementation is checked against a form that shares
none of its reshapes or batched matmuls.
"""

import pytest
import torch

from hub_msif.factors.architectures import TrackedModule
from hub_msif.factors.ekfac import ModuleFactors, precondition_twice

DTYPE = torch.float64


def _orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=DTYPE, generator=generator))
    return q * torch.sign(torch.diagonal(r))  # a proper Haar sample, not just any Q


def _factors(d_out: int, d_in: int, num_blocks: int, seed: int = 0, name: str = "layers.0.mlp.fc") -> ModuleFactors:
    """Random factors: orthogonal Q_A and Q_S blocks, positive Lambda spread over 4 decades."""
    g = torch.Generator().manual_seed(seed)
    labels = ("all",) if num_blocks == 1 else tuple(f"h{i}" for i in range(num_blocks))
    role = "mlp" if num_blocks == 1 else "attn_qkv"
    spec = TrackedModule(name, role, d_in, d_out, True, False, labels)
    bs = d_out // num_blocks
    q_a = _orthogonal(d_in, g)
    q_s = torch.stack([_orthogonal(bs, g) for _ in range(num_blocks)])
    lam = 10 ** (4 * torch.rand(num_blocks, bs, d_in, dtype=DTYPE, generator=g) - 3)
    eig_a = 10 ** (2 * torch.rand(d_in, dtype=DTYPE, generator=g) - 1)
    eig_s = 10 ** (2 * torch.rand(num_blocks, bs, dtype=DTYPE, generator=g) - 1)
    return ModuleFactors(spec, q_a, q_s, lam, eig_a, eig_s)


def _dense_basis(f: ModuleFactors) -> torch.Tensor:
    """``Q_S kron Q_A`` with ``Q_S`` the block-diagonal matrix of the per-block eigenvectors."""
    q_s = torch.block_diag(*f.q_s.unbind(0))
    return torch.kron(q_s, f.q_a.contiguous())


def _dense_preconditioner(f: ModuleFactors, eigenvalues: torch.Tensor, damping: float) -> torch.Tensor:
    """The dense damped inverse; ``eigenvalues`` is the row-major ``[d_out * d_in]`` diagonal."""
    basis = _dense_basis(f)
    return basis @ torch.diag(1.0 / (eigenvalues + damping)) @ basis.T


def _apply_dense(matrix: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return (matrix @ v.reshape(-1)).reshape(v.shape)


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


SHAPES = [
    pytest.param(6, 5, 1, id="whole-module"),
    pytest.param(12, 7, 4, id="per-head-4-blocks"),
    pytest.param(12, 7, 12, id="per-head-12-blocks-of-1"),
]


@pytest.mark.parametrize("d_out,d_in,num_blocks", SHAPES)
@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.5])
def test_precondition_matches_dense_reference_absolute_damping(d_out, d_in, num_blocks, damping):
    f = _factors(d_out, d_in, num_blocks)
    dense = _dense_preconditioner(f, f.lam.reshape(-1), damping)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(d_out, d_in, dtype=DTYPE, generator=g)
        assert _rel_err(f.precondition(v, damping), _apply_dense(dense, v)) < 1e-10


@pytest.mark.parametrize("d_out,d_in,num_blocks", SHAPES)
@pytest.mark.parametrize("factor", [0.1, 1.0])
def test_precondition_matches_dense_reference_relative_damping(d_out, d_in, num_blocks, factor):
    f = _factors(d_out, d_in, num_blocks, seed=3)
    damping = factor * float(f.lam.mean())
    assert f.damping_value(factor, relative=True) == pytest.approx(damping, rel=1e-14)
    dense = _dense_preconditioner(f, f.lam.reshape(-1), damping)
    v = torch.randn(d_out, d_in, dtype=DTYPE, generator=torch.Generator().manual_seed(2))
    got = f.precondition(v, factor, relative=True)
    assert _rel_err(got, _apply_dense(dense, v)) < 1e-10
    # Discriminates: the same number taken as absolute damping is a different operator.
    absolute = _apply_dense(_dense_preconditioner(f, f.lam.reshape(-1), factor), v)
    assert _rel_err(got, absolute) > 1e-3


def test_precondition_inverts_the_ekfac_ggn_without_damping():
    """``P`` with zero damping undoes ``F = (Q_S kron Q_A) diag(Lambda) (Q_S kron Q_A)^T``."""
    f = _factors(12, 7, 4, seed=5)
    basis = _dense_basis(f)
    ggn = basis @ torch.diag(f.lam.reshape(-1)) @ basis.T
    v = torch.randn(12, 7, dtype=DTYPE, generator=torch.Generator().manual_seed(4))
    assert _rel_err(f.precondition(_apply_dense(ggn, v), 0.0), v) < 1e-10


def test_blocks_are_independent():
    """A gradient living in one block stays in that block (block-diagonal ``Q_S``)."""
    f = _factors(12, 7, 4, seed=6)
    v = torch.zeros(12, 7, dtype=DTYPE)
    v[3:6] = torch.randn(3, 7, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    out = f.precondition(v, 0.01)
    assert out[3:6].abs().max() > 0
    assert torch.equal(out[:3], torch.zeros(3, 7, dtype=DTYPE))
    assert torch.equal(out[6:], torch.zeros(6, 7, dtype=DTYPE))


@pytest.mark.parametrize("relative", [False, True])
def test_precondition_is_repeatable_and_never_changes_stored_tensors(relative):
    """The reference code added damping to Lambda in place, so each call damped more."""
    f = _factors(12, 7, 4, seed=7)
    before = {k: v.clone() for k, v in f.tensors().items()}
    v = torch.randn(12, 7, dtype=DTYPE, generator=torch.Generator().manual_seed(8))
    first = f.precondition(v, 0.1, relative=relative)
    second = f.precondition(v, 0.1, relative=relative)
    f.precondition(v, 5.0, relative=not relative)
    f.precondition(v.float(), 0.3, relative=relative)
    f.precondition(v, 0.2, relative=relative, eigenvalues="kfac")
    third = f.precondition(v, 0.1, relative=relative)
    assert torch.equal(first, second)
    assert torch.equal(first, third)
    for key, value in f.tensors().items():
        assert torch.equal(value, before[key]), f"precondition changed stored {key}"
    assert not torch.equal(v, first)  # the input is not returned untouched either
    damping = f.damping_value(0.1, relative)
    dense = _dense_preconditioner(f, before["lam"].reshape(-1), damping)
    assert _rel_err(third, _apply_dense(dense, v)) < 1e-10


def test_precondition_does_not_modify_its_input():
    f = _factors(12, 7, 4, seed=9)
    v = torch.randn(12, 7, dtype=DTYPE, generator=torch.Generator().manual_seed(9))
    kept = v.clone()
    f.precondition(v, 0.1)
    assert torch.equal(v, kept)


@pytest.mark.parametrize("d_out,d_in,num_blocks", SHAPES)
def test_batched_input_matches_one_by_one_and_dense(d_out, d_in, num_blocks):
    f = _factors(d_out, d_in, num_blocks, seed=10)
    dense = _dense_preconditioner(f, f.lam.reshape(-1), 0.05)
    v = torch.randn(2, 3, d_out, d_in, dtype=DTYPE, generator=torch.Generator().manual_seed(11))
    out = f.precondition(v, 0.05)
    assert out.shape == v.shape
    for i in range(2):
        for j in range(3):
            assert _rel_err(out[i, j], _apply_dense(dense, v[i, j])) < 1e-10
            assert torch.allclose(out[i, j], f.precondition(v[i, j], 0.05), rtol=1e-12, atol=0)
    # Batched with a non-contiguous view (a transposed stack) gives the same.
    vt = v.transpose(0, 1)
    assert torch.allclose(f.precondition(vt, 0.05), out.transpose(0, 1), rtol=1e-12, atol=0)


@pytest.mark.parametrize("d_out,d_in,num_blocks", SHAPES)
@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_kfac_eigenvalues_match_dense_reference(d_out, d_in, num_blocks, damping):
    f = _factors(d_out, d_in, num_blocks, seed=12)
    kron_eigs = torch.kron(f.eig_s.reshape(-1), f.eig_a)  # row-major [d_out * d_in]
    dense = _dense_preconditioner(f, kron_eigs, damping)
    v = torch.randn(d_out, d_in, dtype=DTYPE, generator=torch.Generator().manual_seed(13))
    got = f.precondition(v, damping, eigenvalues="kfac")
    assert _rel_err(got, _apply_dense(dense, v)) < 1e-10
    # Discriminates from the EK-FAC eigenvalues.
    assert _rel_err(got, f.precondition(v, damping)) > 1e-3
    if damping == 0.0:
        # Undamped K-FAC is the inverse of (block-diagonal S) kron A.
        s = torch.block_diag(*[q @ torch.diag(e) @ q.T for q, e in zip(f.q_s, f.eig_s)])
        a = f.q_a @ torch.diag(f.eig_a) @ f.q_a.T
        inverse = torch.linalg.inv(torch.kron(s, a))
        assert _rel_err(got, _apply_dense(inverse, v)) < 1e-10


@pytest.mark.parametrize("d_out,d_in,num_blocks", SHAPES)
def test_kfac_relative_damping_is_relative_to_the_kfac_eigenvalues(d_out, d_in, num_blocks):
    """The fit stores eig_a and eig_s as raw sums over tokens (about N x tokens times the scale of
    Lambda), so relative damping must use the mean of the eigenvalues in use, not of Lambda."""
    f = _factors(d_out, d_in, num_blocks, seed=15)
    f.eig_a *= 1e3  # K-FAC eigenvalues on another scale than Lambda, as in a real fit
    kron_eigs = torch.kron(f.eig_s.reshape(-1), f.eig_a)
    v = torch.randn(d_out, d_in, dtype=DTYPE, generator=torch.Generator().manual_seed(16))
    got = f.precondition(v, 0.1, relative=True, eigenvalues="kfac")
    dense = _dense_preconditioner(f, kron_eigs, 0.1 * float(kron_eigs.mean()))
    assert _rel_err(got, _apply_dense(dense, v)) < 1e-10
    # Hence invariant (up to the overall factor) to the normalisation of A and S.
    scaled = ModuleFactors(f.spec, f.q_a, f.q_s, f.lam, f.eig_a * 7.0, f.eig_s / 3.0)
    rescaled = scaled.precondition(v, 0.1, relative=True, eigenvalues="kfac") * (7.0 / 3.0)
    assert _rel_err(rescaled, got) < 1e-12
    # The EK-FAC mode is unaffected by the K-FAC eigenvalues.
    assert torch.equal(scaled.precondition(v, 0.1, relative=True), f.precondition(v, 0.1, relative=True))


def test_unknown_eigenvalue_mode_and_negative_damping_raise():
    f = _factors(6, 5, 1)
    v = torch.zeros(6, 5, dtype=DTYPE)
    with pytest.raises(ValueError, match="eigenvalues"):
        f.precondition(v, 0.1, eigenvalues="diag")
    with pytest.raises(ValueError, match="non-negative"):
        f.precondition(v, -0.1)


@pytest.mark.parametrize("shape", [(7, 12), (12, 8), (12,), (2, 11, 7)])
def test_shape_mismatch_raises_value_error_naming_the_module(shape):
    f = _factors(12, 7, 4, name="gpt_neox.layers.1.attention.query_key_value")
    with pytest.raises(ValueError, match=r"gpt_neox\.layers\.1\.attention\.query_key_value"):
        f.precondition(torch.zeros(shape, dtype=DTYPE), 0.1)


def test_float32_gradients_with_float64_factors():
    """Gradients keep their dtype; the result agrees with the float64 computation to float32 precision."""
    f = _factors(12, 7, 4, seed=14)
    v = torch.randn(12, 7, dtype=DTYPE, generator=torch.Generator().manual_seed(14))
    out32 = f.precondition(v.float(), 0.1)
    assert out32.dtype == torch.float32
    assert _rel_err(out32.double(), f.precondition(v, 0.1)) < 1e-5


@pytest.mark.parametrize("d_out, d_in, num_blocks", [(6, 5, 1), (8, 5, 4)])
@pytest.mark.parametrize("relative", [False, True])
def test_precondition_twice_matches_dense_product(d_out, d_in, num_blocks, relative):
    """MS-IF's merged change of basis equals P_second(P_first(V)) built densely."""
    first, second = _factors(d_out, d_in, num_blocks, seed=1), _factors(d_out, d_in, num_blocks, seed=2)
    damping = 0.3
    dense = [
        _dense_preconditioner(f, f.lam.reshape(-1), f.damping_value(damping, relative)) for f in (first, second)
    ]
    v = torch.randn(3, d_out, d_in, dtype=DTYPE, generator=torch.Generator().manual_seed(5))
    expected = torch.stack([_apply_dense(dense[1] @ dense[0], x) for x in v])
    assert _rel_err(precondition_twice(first, second, v, damping, relative), expected) < 1e-10
    # The order matters (the two preconditioners do not commute), so the test can tell them apart.
    swapped = torch.stack([_apply_dense(dense[0] @ dense[1], x) for x in v])
    assert _rel_err(swapped, expected) > 1e-3
