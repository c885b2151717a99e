"""Which modules are tracked, their roles and per-head blocks (docs/design.md, "Modules and roles", "Per-head blocks").

The per-head row layouts are checked behaviourally, not against the layout tables: each block
of a first-layer q/k/v projection is perturbed on its own and the effect on the attention
probabilities and on the per-head context (the input of the attention output projection) tells
which head's query, key or value those rows are.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from hub_msif.factors import architectures
from hub_msif.factors.architectures import (
    ROLES,
    UnsupportedArchitectureError,
    find_modules,
    parse_module_specs,
)
from hub_msif.toy.examples import tiny_model

HIDDEN, HEADS, SEQ_LEN = 32, 4, 8

# name -> (tiny_model kwargs, number of query heads, number of kv heads, qkv module names of layer 0,
#          attention output projection of layer 0)
ARCHS = {
    "gpt_neox": (dict(arch="gpt_neox"), HEADS, HEADS,
                 ["gpt_neox.layers.0.attention.query_key_value"], "gpt_neox.layers.0.attention.dense"),
    "bloom": (dict(arch="bloom"), HEADS, HEADS,
              ["transformer.h.0.self_attention.query_key_value"], "transformer.h.0.self_attention.dense"),
    "gpt2": (dict(arch="gpt2"), HEADS, HEADS, ["transformer.h.0.attn.c_attn"], "transformer.h.0.attn.c_proj"),
    "llama_gqa": (dict(arch="llama", heads=4, kv_heads=2), 4, 2,
                  [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"], "model.layers.0.self_attn.o_proj"),
    "llama_gqa3": (dict(arch="llama", hidden=48, heads=6, kv_heads=2), 6, 2,
                   [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"], "model.layers.0.self_attn.o_proj"),
}

CHANGED = 1e-6  # float64: an untouched quantity moves by ~1e-15, a touched one by far more than this


def _model(name: str, layers: int = 1, dtype=torch.float64):
    kwargs = dict(ARCHS[name][0])
    kwargs.setdefault("hidden", HIDDEN)
    kwargs.setdefault("heads", HEADS)
    return tiny_model(layers=layers, dtype=dtype, **kwargs)


def _ids(seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(4, 64, (1, SEQ_LEN), generator=gen)


def _forward(model, ids, qkv_name: str, out_name: str):
    """(attention probabilities [H, T, T] of layer 0, context [T, H*hd], qkv input [T, d_in])."""
    seen = {}

    def keep(key):
        def hook(_module, args):
            seen[key] = args[0].detach().clone()
        return hook

    handles = [model.get_submodule(out_name).register_forward_pre_hook(keep("ctx")),
               model.get_submodule(qkv_name).register_forward_pre_hook(keep("x"))]
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    return out.attentions[0][0].clone(), seen["ctx"][0], seen["x"][0]


def _perturb_block(module: nn.Module, spec, block: int, x_last: torch.Tensor, gen: torch.Generator) -> None:
    """Adds R P to the output rows of ``block`` (weight and bias), P projecting out [x_T, 1].

    The perturbation leaves the block's output at the last position T unchanged, and changes it
    at every other position: a query block then leaves attention row T alone, a key block changes
    it. Conv1D stores its weight as [in, out], so there the rows of the output are columns.
    """
    rows = slice(block * spec.block_size, (block + 1) * spec.block_size)
    x_aug = torch.cat([x_last, torch.ones(1, dtype=x_last.dtype)]) if spec.has_bias else x_last
    assert x_aug.numel() == spec.d_in
    unit = x_aug / x_aug.norm()
    project = torch.eye(spec.d_in, dtype=x_aug.dtype) - torch.outer(unit, unit)
    delta = 0.3 * torch.randn(spec.block_size, spec.d_in, generator=gen, dtype=x_aug.dtype) @ project
    assert (delta @ x_aug).abs().max() < 1e-12
    d_w = delta[:, : spec.d_in - int(spec.has_bias)]
    with torch.no_grad():
        if spec.transposed:
            module.weight[:, rows] += d_w.t()
        else:
            module.weight[rows] += d_w
        if spec.has_bias:
            module.bias[rows] += delta[:, -1]


def _classify(base, pert, num_heads: int):
    """What a perturbation did, from behaviour only: (kind, heads) with kind q, k or v."""
    attn_diff = (pert[0] - base[0]).abs()  # [H, T, T]
    ctx_diff = (pert[1] - base[1]).abs()
    head_dim = ctx_diff.shape[-1] // num_heads
    ctx_diff = ctx_diff.view(ctx_diff.shape[0], num_heads, head_dim)
    attn_heads = frozenset(h for h in range(num_heads) if attn_diff[h].max() > CHANGED)
    ctx_heads = frozenset(h for h in range(num_heads) if ctx_diff[:, h].max() > CHANGED)
    if not attn_heads:
        return ("v", ctx_heads)
    if ctx_heads != attn_heads:
        return ("attention and context changed in different heads", attn_heads, ctx_heads)
    last_row = frozenset(h for h in attn_heads if attn_diff[h, -1].max() > CHANGED)
    if not last_row:
        return ("q", attn_heads)
    if last_row == attn_heads:
        return ("k", attn_heads)
    return ("mixed q and k", attn_heads, last_row)


def _expected(label: str, group: int):
    """The effect a block labelled ``label`` must have; ``group`` query heads share a kv head."""
    match = re.fullmatch(r"h(\d+)\.([qkv])", label)
    assert match, f"bad block label {label!r}"
    head, part = int(match[1]), match[2]
    if part == "q":
        return ("q", frozenset({head}))
    return (part, frozenset(range(head * group, (head + 1) * group)))


_OBSERVED: dict[str, list] = {}


def _observe(name: str):
    """[(module name, block labels, [observed effect of each block])] for layer 0 of ``name``."""
    if name in _OBSERVED:
        return _OBSERVED[name]
    _, num_heads, _, qkv_names, out_name = ARCHS[name]
    model = _model(name)
    ids = _ids()
    specs = {t.name: t for t in find_modules(model)}
    gen = torch.Generator().manual_seed(0)
    result = []
    for qkv_name in qkv_names:
        spec = specs[qkv_name]
        module = model.get_submodule(qkv_name)
        base = _forward(model, ids, qkv_name, out_name)
        x_last = base[2][-1]
        effects = []
        for block in range(spec.num_blocks):
            saved = {k: v.clone() for k, v in module.state_dict().items()}
            _perturb_block(module, spec, block, x_last, gen)
            effects.append(_classify(base, _forward(model, ids, qkv_name, out_name), num_heads))
            module.load_state_dict(saved)
        assert _forward(model, ids, qkv_name, out_name)[0].equal(base[0])  # restored
        result.append((qkv_name, spec.block_labels, effects))
    _OBSERVED[name] = result
    return result


# ---------------------------------------------------------------------------------------------
# 1. Per-head blocks


@pytest.mark.parametrize("name", list(ARCHS))
def test_block_labels_are_complete_and_head_sized(name):
    _, num_heads, num_kv, qkv_names, _ = ARCHS[name]
    model = _model(name, layers=2)
    tracked = find_modules(model)
    head_dim = ARCHS[name][0].get("hidden", HIDDEN) // num_heads
    qkv = [t for t in tracked if t.role == "attn_qkv"]
    assert [t.name for t in qkv if ".0." in t.name] == qkv_names
    labels = []
    for spec in qkv:
        assert spec.block_size == head_dim
        assert spec.num_blocks * spec.block_size == spec.d_out
        assert len(set(spec.block_labels)) == spec.num_blocks
        if ".0." in spec.name:
            labels += spec.block_labels
    want = {f"h{h}.q" for h in range(num_heads)} | {f"h{h}.{p}" for h in range(num_kv) for p in "kv"}
    assert sorted(labels) == sorted(want)


@pytest.mark.parametrize("name", list(ARCHS))
def test_every_block_holds_the_labelled_head(name):
    group = ARCHS[name][1] // ARCHS[name][2]
    for qkv_name, labels, effects in _observe(name):
        for block, (label, effect) in enumerate(zip(labels, effects, strict=True)):
            assert effect == _expected(label, group), (
                f"{qkv_name} block {block} is labelled {label!r} but behaves like {effect}"
            )


def _mismatches(name, labels_for_module, group: int | None = None) -> int:
    group = group or ARCHS[name][1] // ARCHS[name][2]
    wrong = 0
    for qkv_name, labels, effects in _observe(name):
        for label, effect in zip(labels_for_module(qkv_name, labels), effects, strict=True):
            wrong += effect != _expected(label, group)
    return wrong


@pytest.mark.parametrize("name,wrong_layout", [
    ("gpt_neox", architectures._head_labels_stacked),
    ("bloom", architectures._head_labels_stacked),
    ("gpt2", architectures._head_labels_interleaved),
])
def test_behavioural_check_rejects_the_other_fused_layout(name, wrong_layout):
    """The check above is discriminating: the other fused layout's labels fail it."""
    assert _mismatches(name, lambda _n, _labels: wrong_layout(HEADS)) > 0
    assert _mismatches(name, lambda _n, labels: labels) == 0


@pytest.mark.parametrize("name", ["llama_gqa", "llama_gqa3"])
def test_behavioural_check_rejects_wrong_gqa_labels(name):
    """Reading kv head j as query head j (no grouping), or swapping q and k labels, fails it."""

    def swap_qk(_qkv_name, labels):
        return [label.replace(".q", ".K").replace(".k", ".q").replace(".K", ".k") for label in labels]

    assert _mismatches(name, lambda _n, labels: labels) == 0
    assert _mismatches(name, lambda _n, labels: labels, group=1) > 0
    assert _mismatches(name, swap_qk) > 0


@pytest.mark.parametrize("name", list(ARCHS))
def test_gradient_of_one_heads_context_lives_in_its_blocks(name):
    """d(loss on head h's context)/dW is zero outside the blocks h.q, (h//group).k, (h//group).v."""
    _, num_heads, num_kv, qkv_names, out_name = ARCHS[name]
    group = num_heads // num_kv
    model = _model(name)
    specs = {t.name: t for t in find_modules(model)}
    ids = _ids()
    seen = {}
    handle = model.get_submodule(out_name).register_forward_pre_hook(lambda _m, args: seen.update(ctx=args[0]))
    gen = torch.Generator().manual_seed(3)
    try:
        for head in range(num_heads):
            model.zero_grad(set_to_none=True)
            model(input_ids=ids)
            ctx = seen["ctx"][0]
            head_dim = ctx.shape[-1] // num_heads
            part = ctx[:, head * head_dim:(head + 1) * head_dim]
            (part * torch.randn(part.shape, generator=gen, dtype=part.dtype)).sum().backward()
            nonzero = set()
            for qkv_name in qkv_names:
                spec = specs[qkv_name]
                grad = spec.weight_gradient(model.get_submodule(qkv_name))
                assert grad.shape == (spec.d_out, spec.d_in)
                blocks = grad.view(spec.num_blocks, spec.block_size, spec.d_in)
                for label, block in zip(spec.block_labels, blocks, strict=True):
                    if block.abs().max() > 0:
                        nonzero.add(label)
            want = {f"h{head}.q", f"h{head // group}.k", f"h{head // group}.v"}
            assert nonzero == want, f"head {head}: gradient in blocks {sorted(nonzero)}"
    finally:
        handle.remove()


def test_weight_gradient_is_the_linear_gradient_with_bias_column():
    model = _model("gpt2")
    spec = next(t for t in find_modules(model) if t.name.endswith("c_attn"))
    module = model.get_submodule(spec.name)
    with pytest.raises(ValueError, match="c_attn"):
        spec.weight_gradient(module)
    model(input_ids=_ids()).logits.sum().backward()
    grad = spec.weight_gradient(module)
    assert spec.transposed and spec.has_bias and grad.shape == (spec.d_out, spec.d_in)
    assert torch.equal(grad[:, :-1], module.weight.grad.t())
    assert torch.equal(grad[:, -1], module.bias.grad)


# ---------------------------------------------------------------------------------------------
# 2. Selection and roles


def _expected_roles(name: str, layers: int) -> dict[str, str]:
    out = {}
    for i in range(layers):
        if name == "gpt_neox":
            base = f"gpt_neox.layers.{i}"
            out |= {f"{base}.attention.query_key_value": "attn_qkv", f"{base}.attention.dense": "attn_out",
                    f"{base}.mlp.dense_h_to_4h": "mlp", f"{base}.mlp.dense_4h_to_h": "mlp"}
        elif name == "bloom":
            base = f"transformer.h.{i}"
            out |= {f"{base}.self_attention.query_key_value": "attn_qkv", f"{base}.self_attention.dense": "attn_out",
                    f"{base}.mlp.dense_h_to_4h": "mlp", f"{base}.mlp.dense_4h_to_h": "mlp"}
        elif name == "gpt2":
            base = f"transformer.h.{i}"
            out |= {f"{base}.attn.c_attn": "attn_qkv", f"{base}.attn.c_proj": "attn_out",
                    f"{base}.mlp.c_fc": "mlp", f"{base}.mlp.c_proj": "mlp"}
        else:
            base = f"model.layers.{i}"
            out |= {f"{base}.self_attn.{p}_proj": "attn_qkv" for p in "qkv"}
            out |= {f"{base}.self_attn.o_proj": "attn_out"}
            out |= {f"{base}.mlp.{p}_proj": "mlp" for p in ("gate", "up", "down")}
    return out


def _is_linear(module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


ROLE_ARCHS = ["gpt_neox", "bloom", "gpt2", "llama_gqa"]


@pytest.mark.parametrize("name", ROLE_ARCHS)
def test_roles_and_shapes(name):
    model = _model(name, layers=2, dtype=torch.float32)
    tracked = find_modules(model)
    names = [t.name for t in tracked]
    assert len(names) == len(set(names))
    assert {t.name: t.role for t in tracked} == _expected_roles(name, 2)
    # every linear layer of the decoder blocks is tracked, nothing else is
    decoder_linears = {n for n, m in model.named_modules() if _is_linear(m) and re.search(r"\.(h|layers)\.\d+\.", n)}
    assert set(names) == decoder_linears
    for spec in tracked:
        module = model.get_submodule(spec.name)
        assert _is_linear(module)
        assert not re.search(r"lm_head|embed|wte|wpe|norm|ln_", spec.name)
        weight = module.weight.t() if spec.transposed else module.weight
        assert spec.transposed == (name == "gpt2")
        assert spec.has_bias == (module.bias is not None)
        assert (spec.d_out, spec.d_in) == (weight.shape[0], weight.shape[1] + int(spec.has_bias))
        if spec.role != "attn_qkv":
            assert spec.block_labels == ("all",) and spec.block_size == spec.d_out


@pytest.mark.parametrize("name", ROLE_ARCHS)
def test_mlp_only_and_unsplit_heads(name):
    model = _model(name, layers=2, dtype=torch.float32)
    full = find_modules(model)
    mlp = find_modules(model, "mlp")
    assert mlp and all(t.role == "mlp" for t in mlp)
    assert mlp == [t for t in full if t.role == "mlp"]
    unsplit = find_modules(model, split_heads=False)
    assert [(t.name, t.role) for t in unsplit] == [(t.name, t.role) for t in full]
    for spec in unsplit:
        assert spec.num_blocks == 1 and spec.block_labels == ("all",) and spec.block_size == spec.d_out
    assert any(t.num_blocks > 1 for t in full if t.role == "attn_qkv")
    assert find_modules(model, "mlp", split_heads=False) == mlp
    with pytest.raises(ValueError, match="attn"):
        find_modules(model, "attn")


# ---------------------------------------------------------------------------------------------
# 3. Unsupported architectures and explicit modules


def _opt():
    from transformers import AutoModelForCausalLM, OPTConfig

    config = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       word_embed_proj_dim=16, max_position_embeddings=32)
    return AutoModelForCausalLM.from_config(config)


class _Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8, bias=False)
        self.norm = nn.LayerNorm(8)


class _PlainLlamaNames(nn.Module):
    """Llama-like module names but no config: cannot know the number of heads."""

    def __init__(self):
        super().__init__()
        for p in ("q", "k", "v", "o"):
            setattr(self, f"{p}_proj", nn.Linear(8, 8))


@pytest.mark.parametrize("build,class_name", [(_opt, "OPTForCausalLM"), (_Plain, "_Plain"),
                                              (_PlainLlamaNames, "_PlainLlamaNames")])
def test_unsupported_architecture_error(build, class_name):
    model = build()
    for modules in ("all", "mlp"):
        with pytest.raises(UnsupportedArchitectureError) as info:
            find_modules(model, modules)
        message = str(info.value)
        assert class_name in message
        assert "modules=" in message and "--module" in message  # how to pass modules explicitly
    assert issubclass(UnsupportedArchitectureError, ValueError)


def test_mlp_selection_that_finds_nothing_is_an_error():
    """A Llama-like MoE model whose experts are fused parameters has no MLP linear layers."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2, num_experts_per_tok=1)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match="MixtralForCausalLM") as info:
        find_modules(model, "mlp")
    assert "modules=" in str(info.value) and "--module" in str(info.value)
    assert {t.role for t in find_modules(model)} == {"attn_qkv", "attn_out"}


def test_explicit_modules_for_an_unmapped_model():
    model = _opt()
    base = "model.decoder.layers.0"
    mapping = {f"{base}.fc1": "mlp", f"{base}.fc2": "mlp", f"{base}.self_attn.q_proj": "attn_qkv",
               f"{base}.self_attn.out_proj": "attn_out"}
    tracked = find_modules(model, mapping)
    assert [(t.name, t.role) for t in tracked] == list(mapping.items())
    for spec in tracked:
        module = model.get_submodule(spec.name)
        assert spec.block_labels == ("all",) and not spec.transposed
        assert (spec.d_out, spec.d_in) == (module.out_features, module.in_features + 1)
    plain = find_modules(_Plain(), {"fc1": "mlp", "fc2": "attn_out"})
    assert [(t.name, t.role, t.d_out, t.d_in, t.has_bias) for t in plain] == [
        ("fc1", "mlp", 16, 9, True), ("fc2", "attn_out", 8, 16, False)]


def test_explicit_modules_errors():
    model = _Plain()
    with pytest.raises(ValueError) as info:
        find_modules(model, {"fc1": "ffn"})
    assert "ffn" in str(info.value) and "fc1" in str(info.value)
    with pytest.raises(ValueError, match="fc3") as info:
        find_modules(model, {"fc1": "mlp", "fc3": "mlp"})
    assert not isinstance(info.value, UnsupportedArchitectureError)
    for not_linear in ("embed", "norm"):  # a ValueError (one line from the CLI), naming the module
        with pytest.raises(ValueError, match=not_linear):
            find_modules(model, {not_linear: "mlp"})
    with pytest.raises(ValueError, match="empty"):
        find_modules(model, {})


def test_parse_module_specs():
    assert parse_module_specs([]) == {}
    assert parse_module_specs(["a.b.fc1=mlp", "x.q=attn_qkv", "x.o=attn_out"]) == {
        "a.b.fc1": "mlp", "x.q": "attn_qkv", "x.o": "attn_out"}
    assert set(ROLES) == {"mlp", "attn_qkv", "attn_out"}
    for bad in ["fc1", "fc1=", "=mlp", "fc1=MLP", "fc1=ffn", "fc1:mlp", "fc1=mlp=x"]:
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_module_specs([bad])
