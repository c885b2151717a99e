"""Which linear modules of a causal LM are tracked, their roles and their per-head blocks.

Every tracked module is a linear map ``output = W a (+ b)`` with ``W`` of shape ``[d_out, d_in]``
(transformers' GPT-2 ``Conv1D`` stores ``W`` transposed; it is treated as the equivalent
``nn.Linear``). A module's output rows are split into ``num_blocks`` contiguous blocks of equal
size: one block for MLP and output projections, one block per head and per q/k/v for attention
input projections (docs/design.md, "Modules and roles", "Per-head blocks"). Every layout supported here keeps a head's q, k or v
rows contiguous, so a block is always ``rows[i * block_size : (i + 1) * block_size]``; only the
labels (which head and which of q, k, v a block is) differ between architectures.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch
from torch import nn

from hub_msif.errors import MsifValueError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

ROLES = ("mlp", "attn_qkv", "attn_out")



@dataclass(frozen=True)
class TrackedModule:
    """One tracked linear module.

    ``name`` is the module's qualified name in ``model.named_modules()``; ``d_in`` counts the
    trailing 1 appended to activations when the module has a bias. ``block_labels`` names each
    output block (for example ``h0.q``); its length is the number of blocks.
    """

    name: str
    role: str
    d_in: int
    d_out: int
    has_bias: bool
    transposed: bool  # True for transformers Conv1D (weight stored as [in, out])
    block_labels: tuple[str, ...] = field(default=("all",))

    @property
    def num_blocks(self) -> int:
        return len(self.block_labels)

    @property
    def block_size(self) -> int:
        return self.d_out // self.num_blocks

    def weight_gradient(self, module: nn.Module) -> torch.Tensor:
        """The module's parameter gradient as one ``[d_out, d_in]`` matrix (bias as last column)."""
        weight_grad = cast(torch.Tensor, module.weight).grad
        if weight_grad is None:
            raise MsifValueError(f"module {self.name!r} has no gradient; run backward first")
        grad = weight_grad.t() if self.transposed else weight_grad
        if self.has_bias:
            bias_grad = cast(torch.Tensor, module.bias).grad
            if bias_grad is None:
                raise MsifValueError(f"module {self.name!r} has no bias gradient; run backward first")
            grad = torch.cat([grad, bias_grad.unsqueeze(1)], dim=1)
        return grad


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int, bool, bool]:
    """Returns (d_out, d_in without bias, has_bias, transposed) of a Linear or Conv1D."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features, module.bias is not None, False
    if _is_conv1d(module):
        d_in, d_out = cast(torch.Tensor, module.weight).shape
        return d_out, d_in, module.bias is not None, True
    raise TypeError(f"{type(module).__name__} is not a linear layer (nn.Linear or Conv1D)")


def _make(model: nn.Module, name: str, role: str, labels: Iterable[str] = ("all",)) -> TrackedModule:
    if role not in ROLES:
        raise MsifValueError(f"unknown role {role!r} for module {name!r}; use one of {', '.join(ROLES)}")
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise MsifValueError(f"model {type(model).__name__} has no module named {name!r}") from err
    try:
        d_out, d_in, has_bias, transposed = linear_shape(module)
    except TypeError as err:
        raise MsifValueError(f"module {name!r} cannot be tracked: {err}") from err
    labels = tuple(labels)
    if d_out % len(labels):
        raise MsifValueError(f"module {name!r}: {d_out} output rows do not split into {len(labels)} blocks")
    return TrackedModule(name, role, d_in + int(has_bias), d_out, has_bias, transposed, labels)


def _head_labels_interleaved(num_heads: int) -> list[str]:
    """GPT-NeoX and BLOOM: row = h*3*hd + p*hd + d, so blocks go h0.q h0.k h0.v h1.q ..."""
    return [f"h{h}.{p}" for h in range(num_heads) for p in "qkv"]


def _head_labels_stacked(num_heads: int) -> list[str]:
    """GPT-2 c_attn: [Q | K | V], head h at h*hd within each part: blocks go h0.q h1.q ... h0.k ..."""
    return [f"h{h}.{p}" for p in "qkv" for h in range(num_heads)]


def _gpt_neox_like(model: nn.Module, prefix: str, num_heads: int, attn: str, split_heads: bool):
    layers = cast(nn.ModuleList, model.get_submodule(prefix))
    qkv_labels = _head_labels_interleaved(num_heads) if split_heads else ["all"]
    out = []
    for i in range(len(layers)):
        base = f"{prefix}.{i}"
        out.append(_make(model, f"{base}.{attn}.query_key_value", "attn_qkv", qkv_labels))
        out.append(_make(model, f"{base}.{attn}.dense", "attn_out"))
        out.append(_make(model, f"{base}.mlp.dense_h_to_4h", "mlp"))
        out.append(_make(model, f"{base}.mlp.dense_4h_to_h", "mlp"))
    return out


def _gpt2(model: nn.Module, split_heads: bool):
    num_heads = cast("PretrainedConfig", model.config).n_head
    layers = cast(nn.ModuleList, model.get_submodule("transformer.h"))
    qkv_labels = _head_labels_stacked(num_heads) if split_heads else ["all"]
    out = []
    for i in range(len(layers)):
        base = f"transformer.h.{i}"
        out.append(_make(model, f"{base}.attn.c_attn", "attn_qkv", qkv_labels))
        out.append(_make(model, f"{base}.attn.c_proj", "attn_out"))
        out.append(_make(model, f"{base}.mlp.c_fc", "mlp"))
        out.append(_make(model, f"{base}.mlp.c_proj", "mlp"))
    return out


def _llama_like(model: nn.Module, split_heads: bool):
    """Llama, Mistral, Qwen2 and kin: separate q/k/v projections, grouped-query attention."""
    config = cast("PretrainedConfig", model.config)
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    out = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("q_proj", "k_proj", "v_proj"):
            heads = num_heads if leaf == "q_proj" else num_kv_heads
            labels = [f"h{h}.{leaf[0]}" for h in range(heads)] if split_heads else ["all"]
            out.append(_make(model, name, "attn_qkv", labels))
        elif leaf == "o_proj":
            out.append(_make(model, name, "attn_out"))
        elif leaf in ("gate_proj", "up_proj", "down_proj") and isinstance(module, nn.Linear):
            out.append(_make(model, name, "mlp"))
    return out


def _auto_modules(model: nn.Module, split_heads: bool) -> list[TrackedModule]:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if model_type == "gpt_neox" and config is not None:
        return _gpt_neox_like(
            model, "gpt_neox.layers", config.num_attention_heads, "attention", split_heads
        )
    if model_type == "bloom" and config is not None:
        return _gpt_neox_like(model, "transformer.h", config.n_head, "self_attention", split_heads)
    if model_type == "gpt2":
        return _gpt2(model, split_heads)
    if {"q_proj", "k_proj", "v_proj", "o_proj"} <= names and getattr(config, "num_attention_heads", None):
        return _llama_like(model, split_heads)
    raise UnsupportedArchitectureError(
        f"hub_msif cannot map the modules of {type(model).__name__} (model_type={model_type!r}) "
        "to roles automatically; pass them explicitly, e.g. in Python "
        "modules={'model.layers.0.mlp.fc1': 'mlp', ...} or on the command line "
        "--module model.layers.0.mlp.fc1=mlp (roles: mlp, attn_qkv, attn_out)"
    )


def find_modules(
    model: nn.Module,
    modules: str | Mapping[str, str] = "all",
    split_heads: bool = True,
) -> list[TrackedModule]:
    """The tracked modules of ``model``.

    ``modules`` is ``"all"``, ``"mlp"`` (role ``mlp`` only) or an explicit mapping from module
    name to role (one block per module). ``split_heads`` gives attention q/k/v projections one
    block per head and per q, k, v (docs/design.md, "Per-head blocks"); turn it off to treat them as one block.
    """
    if isinstance(modules, Mapping):
        if not modules:
            raise MsifValueError("the explicit module list is empty")
        return [_make(model, name, role) for name, role in modules.items()]
    if modules not in ("all", "mlp"):
        raise MsifValueError(f"modules must be 'all', 'mlp' or a mapping of name to role, not {modules!r}")
    tracked = _auto_modules(model, split_heads)
    if modules == "mlp":
        tracked = [t for t in tracked if t.role == "mlp"]
    if not tracked:
        raise UnsupportedArchitectureError(
            f"found no {modules!r} linear modules in {type(model).__name__} (for example MoE experts stored "
            "as fused parameters); pass modules explicitly, e.g. in Python modules={'NAME': 'mlp', ...} "
            "or on the command line --module NAME=mlp (roles: mlp, attn_qkv, attn_out)"
        )
    return tracked


def parse_module_specs(specs: Iterable[str]) -> dict[str, str]:
    """Parses command-line ``NAME=ROLE`` items into a module mapping."""
    out = {}
    for spec in specs:
        name, sep, role = spec.partition("=")
        if not sep or not name or role not in ROLES:
            raise MsifValueError(f"bad module spec {spec!r}: expected NAME=ROLE with ROLE in {', '.join(ROLES)}")
        out[name] = role
    return out
