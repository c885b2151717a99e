"""fit_factors against for-loop references that run every sequence alone (docs/design.md, "Fitting EK-FAC", "Per-sequence Lambda").

The fit pads batches, masks padding, captures activations and output gradients with hooks and
never forms a per-sequence gradient. The references here do the opposite: each sequence goes
through the float64 model on its own (no padding at all), ``A`` and ``S_b`` are summed from
plainly hooked inputs and ``torch.autograd.grad`` output gradients, and ``Lambda`` is built from
the parameter gradients ``.grad`` of each sequence's own summed loss, with the same labels the fit
used (true labels, or the per-sequence samples of hub_msif.factors.objectives for the pass at hand).
"""

import copy

import pytest
import torch
from conftest import random_sequences
from torch import nn

from hub_msif.factors.architectures import find_modules
from hub_msif.factors.fit import FitConfig, fit_factors
from hub_msif.factors.objectives import sample_targets
from hub_msif.toy.examples import tiny_model

VOCAB = 64
BATCH = 4
SEED = 7  # the fit's label seed; sampled labels depend on it


pytestmark = pytest.mark.usefixtures("one_thread")


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


def _fit(model, sequences, folder, label_mode="sampled", seed=SEED):
    config = FitConfig(batch_size=BATCH, label_mode=label_mode, seed=seed, checkpoint_every=0,
                       storage_dtype="float64")
    return fit_factors(model, sequences, folder, config, pad_id=0, info={}, show_progress=False)


def _sequence_targets(logits, seq, index, label_mode, seed, pass_index):
    """Targets aligned with ``logits[0, :-1]`` and their validity, as the fit draws them."""
    targets = torch.tensor([seq["labels"][1:]])
    valid = targets != -100
    if label_mode == "sampled":
        targets = sample_targets(logits[:, :-1].detach(), valid, torch.tensor([index]), seed, pass_index)
    return targets[0], valid[0]


def _run_alone(model, tracked, seq, index, label_mode, seed, pass_index):
    """One sequence by itself (batch of 1, no padding).

    Returns, per module name, ``a`` ``[T, d_in]`` (1 appended for a bias), ``g = dLoss/d(output)``
    ``[T, d_out]`` and the parameter gradient ``G`` ``[d_out, d_in]``, plus the targets used.
    """
    inputs, outputs, handles = {}, {}, []
    for spec in tracked:
        def hook(module, args, output, name=spec.name):
            inputs[name], outputs[name] = args[0], output
        handles.append(model.get_submodule(spec.name).register_forward_hook(hook))
    try:
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([seq["input_ids"]])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    finally:
        for h in handles:
            h.remove()
    targets, valid = _sequence_targets(logits, seq, index, label_mode, seed, pass_index)
    log_probs = torch.log_softmax(logits[0, :-1], dim=-1)
    picked = log_probs.gather(1, targets.clamp(min=0).unsqueeze(1)).squeeze(1)
    loss = -(picked * valid).sum()  # stays in the graph even without any valid position
    out_grads = torch.autograd.grad(loss, [outputs[s.name] for s in tracked], retain_graph=True)
    loss.backward()
    result = {}
    for spec, g in zip(tracked, out_grads):
        a = inputs[spec.name][0].detach()
        if spec.has_bias:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        grad = spec.weight_gradient(model.get_submodule(spec.name)).detach().clone()
        result[spec.name] = (a, g[0].detach(), grad)
    model.zero_grad(set_to_none=True)
    return result, targets.where(valid, torch.full_like(targets, -100))


def _reference(model, tracked, sequences, label_mode, seed):
    """Per-sequence references: A, S blocks (pass 0 labels) and per-sequence G_n (pass 1 labels)."""
    model.eval()
    cov = {s.name: [torch.zeros(s.d_in, s.d_in, dtype=torch.float64),
                    torch.zeros(s.num_blocks, s.block_size, s.block_size, dtype=torch.float64)]
           for s in tracked}
    grads = {s.name: [] for s in tracked}
    labels = {0: [], 1: []}
    for index, seq in enumerate(sequences):
        captured, used = _run_alone(model, tracked, seq, index, label_mode, seed, 0)
        labels[0].append(used)
        for spec in tracked:
            a, g, grad = captured[spec.name]
            # The reference's own consistency: the parameter gradient is sum_t g_t a_t^T.
            assert torch.allclose(grad, g.T @ a, rtol=1e-10, atol=1e-12 * float(grad.abs().max()) + 1e-300)
            gb = g.reshape(-1, spec.num_blocks, spec.block_size)
            cov[spec.name][0] += a.T @ a
            cov[spec.name][1] += torch.einsum("tbi,tbj->bij", gb, gb)
        captured, used = _run_alone(model, tracked, seq, index, label_mode, seed, 1)
        labels[1].append(used)
        for spec in tracked:
            grads[spec.name].append(captured[spec.name][2])
    return cov, grads, labels


def _rotated_squares(factors, grad):
    """``(Q_S,b^T G[b] Q_A) ** 2`` per block, from the fitted eigenvectors."""
    spec = factors.spec
    blocks = grad.reshape(spec.num_blocks, spec.block_size, spec.d_in)
    return (factors.q_s.transpose(-1, -2) @ blocks @ factors.q_a) ** 2


def _lambda_from(factors, grads):
    return torch.stack([_rotated_squares(factors, g) for g in grads]).mean(0)


def _reconstruct(q, eig):
    return q @ torch.diag_embed(eig) @ q.transpose(-1, -2)


def _padded_batches(sequences):
    lengths = [len(s["input_ids"]) for s in sequences]
    return [lengths[i:i + BATCH] for i in range(0, len(lengths), BATCH)]


CASES = [
    pytest.param("gpt_neox", "empirical", 0, id="gpt_neox-empirical"),
    pytest.param("gpt_neox", "sampled", 0, id="gpt_neox-sampled"),
    pytest.param("gpt_neox", "empirical", 3, id="gpt_neox-empirical-prompt"),
    pytest.param("gpt_neox", "sampled", 3, id="gpt_neox-sampled-prompt"),
    pytest.param("gpt2", "sampled", 0, id="gpt2-conv1d-sampled"),
    pytest.param("llama", "sampled", 2, id="llama-gqa-sampled-prompt"),
]


@pytest.mark.parametrize("arch,label_mode,prompt_len", CASES)
def test_fit_matches_per_sequence_reference(tmp_path, arch, label_mode, prompt_len):
    model = tiny_model(arch, vocab_size=VOCAB, dtype=torch.float64, seed=1)
    sequences = random_sequences(14, VOCAB, min_len=3, max_len=12, seed=11, prompt_len=prompt_len)
    assert any(len(set(b)) > 1 for b in _padded_batches(sequences)), "batches must carry padding"
    tracked = find_modules(model)
    if arch == "gpt_neox":
        qkv = [s for s in tracked if s.name.endswith("query_key_value")]
        assert qkv and all(s.num_blocks == 3 * model.config.num_attention_heads for s in qkv)

    fitted = _fit(model, sequences, tmp_path / "factors", label_mode)
    cov, grads, labels = _reference(model, tracked, sequences, label_mode, SEED)

    assert set(fitted.modules) == {s.name for s in tracked}
    fit_info = fitted.info["fit"]
    assert fit_info["num_sequences"] == len(sequences)
    assert fit_info["num_tokens"] == sum(len(s["input_ids"]) for s in sequences)

    per_batch_errors = []
    for spec in tracked:
        f = fitted.modules[spec.name]
        assert f.lam.dtype == torch.float64 and f.q_a.dtype == torch.float64
        a_ref, s_ref = cov[spec.name]
        # Stored K-FAC eigenvalues are normalised: A by the token count, S by the sequence count.
        num_tokens, num_sequences = fit_info["num_tokens"], fit_info["num_sequences"]
        assert _rel_err(_reconstruct(f.q_a, f.eig_a), a_ref / num_tokens) < 1e-10, spec.name
        for b in range(spec.num_blocks):
            assert _rel_err(_reconstruct(f.q_s[b], f.eig_s[b]), s_ref[b] / num_sequences) < 1e-10, (spec.name, b)
        # Orthonormal eigenvectors, so Q diag Q^T is the eigendecomposition and not just any factorisation.
        assert torch.allclose(f.q_a.T @ f.q_a, torch.eye(spec.d_in, dtype=torch.float64), atol=1e-12)

        lam_ref = _lambda_from(f, grads[spec.name])
        assert _rel_err(f.lam, lam_ref) < 1e-10, spec.name
        assert torch.allclose(f.lam, lam_ref, rtol=1e-8, atol=1e-10 * float(lam_ref.max())), spec.name

        # The per-batch variant (square of each batch's summed gradient) is a different quantity.
        batch_grads = [torch.stack(grads[spec.name][i:i + BATCH]).sum(0)
                       for i in range(0, len(sequences), BATCH)]
        lam_batch = torch.stack([_rotated_squares(f, g) for g in batch_grads]).sum(0) / len(sequences)
        per_batch_errors.append(_rel_err(lam_batch, f.lam))
    assert min(per_batch_errors) > 0.05, per_batch_errors

    if label_mode == "sampled":
        # The sampled labels are not the true ones and are drawn afresh in the correction pass,
        # so a reference with the wrong labels (true ones, or the covariance pass's) fails.
        true = [torch.tensor(s["labels"][1:]) for s in sequences]
        differs_from_true = sum(int((l != t).sum()) for l, t in zip(labels[1], true))
        differs_between_passes = sum(int((l0 != l1).sum()) for l0, l1 in zip(labels[0], labels[1]))
        assert differs_from_true > 10 and differs_between_passes > 10
        for l0, l1, t in zip(labels[0], labels[1], true):
            assert torch.equal(l0 == -100, t == -100) and torch.equal(l1 == -100, t == -100)
        _, wrong_grads, _ = _reference(model, tracked, sequences, "empirical", SEED)
        spec = tracked[0]
        assert _rel_err(_lambda_from(fitted.modules[spec.name], wrong_grads[spec.name]),
                        fitted.modules[spec.name].lam) > 0.05


def test_sampled_labels_depend_on_the_seed(tmp_path):
    """Discriminates the seeded sampling: another seed gives other S and Lambda."""
    model = tiny_model("gpt_neox", vocab_size=VOCAB, dtype=torch.float64, seed=1)
    sequences = random_sequences(8, VOCAB, seed=3)
    one = _fit(model, sequences, tmp_path / "one", seed=1)
    two = _fit(model, sequences, tmp_path / "two", seed=2)
    again = _fit(model, sequences, tmp_path / "again", seed=1)
    name = "gpt_neox.layers.1.mlp.dense_4h_to_h"
    for key in ("q_a", "eig_a", "q_s", "eig_s", "lam"):
        assert torch.equal(one.modules[name].tensors()[key], again.modules[name].tensors()[key]), key
    assert torch.equal(one.modules[name].eig_a, two.modules[name].eig_a)  # A does not see labels
    assert _rel_err(two.modules[name].eig_s, one.modules[name].eig_s) > 1e-3
    assert _rel_err(two.modules[name].lam, one.modules[name].lam) > 1e-3


def _conv1d_to_linear(model: nn.Module) -> nn.Module:
    """A copy of a GPT-2 model with every transformers Conv1D replaced by the same nn.Linear."""
    from transformers.pytorch_utils import Conv1D

    model = copy.deepcopy(model)
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            d_in, d_out = module.weight.shape
            linear = nn.Linear(d_in, d_out, bias=module.bias is not None, dtype=module.weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(module.weight.t())
                linear.bias.copy_(module.bias)
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name), leaf, linear)
            replaced += 1
    assert replaced and not any(isinstance(m, Conv1D) for m in model.modules())
    return model


def test_gpt2_conv1d_and_equivalent_linear_give_the_same_factors(tmp_path):
    conv_model = tiny_model("gpt2", vocab_size=VOCAB, dtype=torch.float64, seed=2)
    linear_model = _conv1d_to_linear(conv_model)
    sequences = random_sequences(16, VOCAB, min_len=6, max_len=12, seed=5)
    ids = torch.tensor([sequences[0]["input_ids"]])
    assert torch.allclose(conv_model(ids).logits, linear_model(ids).logits, rtol=1e-12, atol=1e-12)

    conv_specs, linear_specs = find_modules(conv_model), find_modules(linear_model)
    assert [s.name for s in conv_specs] == [s.name for s in linear_specs]
    assert all(s.transposed for s in conv_specs) and not any(s.transposed for s in linear_specs)
    for c, l in zip(conv_specs, linear_specs):
        assert (c.d_in, c.d_out, c.has_bias, c.block_labels) == (l.d_in, l.d_out, l.has_bias, l.block_labels)
    assert conv_specs[0].name.endswith("attn.c_attn") and conv_specs[0].num_blocks == 3 * conv_model.config.n_head

    conv = _fit(conv_model, sequences, tmp_path / "conv")
    linear = _fit(linear_model, sequences, tmp_path / "linear")
    generator = torch.Generator().manual_seed(0)
    for spec in conv_specs:
        fc, fl = conv.modules[spec.name], linear.modules[spec.name]
        assert _rel_err(_reconstruct(fl.q_a, fl.eig_a), _reconstruct(fc.q_a, fc.eig_a)) < 1e-10
        assert _rel_err(_reconstruct(fl.q_s, fl.eig_s), _reconstruct(fc.q_s, fc.eig_s)) < 1e-10
        v = torch.randn(4, spec.d_out, spec.d_in, dtype=torch.float64, generator=generator)
        for damping, relative in ((0.1, True), (1e-3, False)):
            pc = fc.precondition(v, damping, relative)
            pl = fl.precondition(v, damping, relative)
            assert _rel_err(pl, pc) < 1e-10, (spec.name, damping, relative)
        # Not vacuous: the preconditioner is far from a multiple of the identity.
        pc = fc.precondition(v, 0.1, True)
        assert _rel_err(pc / pc.norm(), v / v.norm()) > 0.1
