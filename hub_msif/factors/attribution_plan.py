"""The memory plan of an attribution, before any weights or factors are read (docs/design.md,
"Device and attribution plan").

``plan_attribution`` takes the two stages' manifest entries (``msif.json``'s ``stages[s]``: module
shapes and storage dtype) and the two models' configs, builds each model on the meta device
(``hub_msif.factors.memory_plan.meta_model``: shapes, no memory) and adds up what ``Attributor`` holds on
its device in each phase of one attribution (MS-IF, the default; SS-IF and GDP hold no more):

1. the query gradient pass: both models' weights, both stages' factors, one query's forward and
   activation-only backward under the fine-tuned model, and its per-module gradients ``G_q``;
2. preconditioning: the weights, the factors, ``G_q``, the preconditioned query ``W_q`` and one
   module's temporaries of ``precondition_twice``;
3. the candidates: the weights, the factors, ``W_q``, one candidate batch's forward and
   activation-only backward under the pre-trained model and its per-candidate gradient chunk with
   its blockwise partial products (``scoring.py``'s fast path).

The total is the largest phase. Exact (from shapes and the code): weights, factors (in their
storage dtype, as they are loaded onto the device), ``G_q``, ``W_q``, the gradient chunk, the
score matrix. Estimated: activations, logits and the loss, temporaries (the
same per-layer terms as the fit's plan, ``hub_msif.factors.memory_plan``). Not included: the runtime
(Python, torch, a CUDA context), allocator caching and fragmentation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import SimpleNamespace

from hub_msif.artifacts.manifest import STAGES as STAGE_NAMES
from hub_msif.errors import MsifValueError
from hub_msif.factors.memory_plan import (
    DTYPE_BYTES,
    GB,
    MODEL_DTYPES,
    dtype_name,
    format_bytes,
    meta_model,
    model_shape,
)

PHASES = ("query gradients", "preconditioning", "candidates")
CHUNK_ELEMENTS = 32 * 1024 * 1024  # scoring.py's _MAX_CHUNK_ELEMENTS: per-candidate gradients formed at once
PRODUCT_BLOCK = 256  # scoring.py's _BLOCK: elements of d_out * d_in per partial product
DEFAULT_BATCH = 8  # Attributor.score_methods' candidate batch
EXACT = ("pretrained weights", "finetuned weights", "pretrained factors", "finetuned factors", "preconditioned query",
         "query gradients", "candidate gradient chunk", "scores")
NOT_INCLUDED = ("the Python/torch runtime (a few hundred MB on the CPU), a CUDA context (about 0.5-1 GB), "
                "the tokenizer and documents, allocator caching and fragmentation")


@dataclass(frozen=True)
class AttributionPlan:
    """Bytes of each part of one attribution and of each phase (``parts`` and ``phases`` in bytes);
    ``total_bytes`` is the largest phase."""

    models: dict[str, str]
    model_types: dict[str, str]
    parameters: dict[str, int]
    model_dtypes: dict[str, str]
    factor_dtypes: dict[str, str]
    compute_dtype: str
    modules: str
    tracked_modules: int
    query_rank: int | None
    queries: int
    candidates: int
    batch_size: int
    query_length: int
    candidate_length: int
    parts: dict[str, int]
    phases: dict[str, dict[str, int]]

    @property
    def total_bytes(self) -> int:
        return max(sum(p.values()) for p in self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: sum(self.phases[name].values()))

    @property
    def weight_bytes(self) -> int:
        return self.parts["pretrained weights"] + self.parts["finetuned weights"]

    @property
    def factor_bytes(self) -> int:
        return self.parts["pretrained factors"] + self.parts["finetuned factors"]

    def to_json(self) -> dict:
        out = asdict(self)
        out.update(total_bytes=self.total_bytes, peak_phase=self.peak_phase, weight_bytes=self.weight_bytes,
                   factor_bytes=self.factor_bytes, phase_bytes={n: sum(p.values()) for n, p in self.phases.items()},
                   exact=[p for p in EXACT if p in self.parts], not_included=NOT_INCLUDED, unit="bytes (GB = 10**9)")
        return out


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MsifValueError(f"{name} must be a whole number of at least 1, got {value!r}")
    return value


def _entries(stage_info: Mapping, stage: str, modules: str) -> list[dict]:
    entries = stage_info.get("modules") if isinstance(stage_info, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise MsifValueError(f"the {stage} stage's manifest entry lists no modules")
    if modules == "mlp":
        entries = [e for e in entries if e.get("role") == "mlp"]
    elif modules != "all":
        raise MsifValueError(f"modules must be 'all' or 'mlp', not {modules!r}")
    if not entries:
        raise MsifValueError(f"the {stage} stage's factors track no {modules} modules")
    for e in entries:
        if e.get("dtype", "float32") not in DTYPE_BYTES:
            raise MsifValueError(f"module {e.get('name')!r} of the {stage} stage has storage dtype {e.get('dtype')!r}")
    return entries


def stored_bytes(entry: Mapping) -> int:
    """Bytes of one module's stored factors (``q_a``, ``q_s``, ``lam``, ``eig_a``, ``eig_s``) in its storage dtype."""
    d_in, d_out, bs = int(entry["d_in"]), int(entry["d_out"]), int(entry.get("block_size") or entry["d_out"])
    blocks = d_out // bs
    elements = d_in * d_in + blocks * bs * bs + d_out * d_in + d_in + d_out
    return elements * DTYPE_BYTES[entry.get("dtype", "float32")]


def _weights(model, dtype: str) -> int:
    """Parameters and buffers, floating ones in ``dtype`` (what ``model.to(dtype)`` leaves); tied ones once."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * (DTYPE_BYTES[dtype] if tensor.is_floating_point() else tensor.element_size())
    return total


def _pass_bytes(shape: dict, d_in_sum: int, batch: int, length: int, e: int, c: int) -> int:
    """Estimated peak of one forward and activation-only backward over ``batch`` x ``length`` tokens
    with frozen parameters and gradient capture hooks (model dtype ``e`` bytes, compute ``c``):
    what autograd saves per layer (as in the fit's plan: the residual, q|k|v and the rotated q and k,
    the attention output, the MLP activation's input; sdpa attention), the hooks' captured inputs of
    every tracked module (compute dtype, with the bias column), the logits with the loss's float32
    copy, log-softmax and their gradients, and one layer's forward temporaries."""
    tokens = batch * length
    h, q, kv, f = shape["hidden"], shape["q_dim"], shape["kv_dim"], shape["ffn"]
    residual = h if shape["fused_qkv"] else 2 * h
    attn = 6 * q if shape["fused_qkv"] else 2 * q + 2 * kv
    per_layer = tokens * (residual + attn + (3 * f if shape["gated"] else f)) * e
    saved = shape["layers"] * per_layer + 2 * tokens * h * e
    hooks = tokens * d_in_sum * c
    logits = tokens * shape["vocab"] * (e + 4 * 4)
    return saved + hooks + logits + per_layer


def plan_attribution(stages: Mapping[str, Mapping], configs: Mapping[str, object], query_rank: int | None = None,
                     candidates: int = 100, model_dtype: str | None = None, modules: str = "all",
                     length: int | None = None, query_length: int | None = None, batch_size: int = DEFAULT_BATCH,
                     queries: int = 1, names: Mapping[str, str] | None = None) -> AttributionPlan:
    """The memory plan of attributing ``queries`` queries (default 1) over ``candidates`` candidates.

    ``stages``: ``{stage: manifest entry}`` for ``pretrained`` and ``finetuned`` (``msif.json``'s
    ``stages[stage]``, possibly from two manifests); ``configs``: ``{stage: config}`` of the two
    models (a transformers config, a Hub id or folder, a dict with ``model_type``: anything
    ``hub_msif.factors.memory_plan.load_config`` takes). ``model_dtype``: the models' dtype (default: each
    config's published dtype, else float32). ``length``: tokens per candidate (default: the model's
    maximum, where documents are cut); ``query_length``: tokens of the query (default ``length``).
    ``names``: how to call each model in the plan (default: what the config says).
    """
    from hub_msif.factors.memory_plan import load_config

    missing = [s for s in STAGE_NAMES if s not in stages or s not in configs]
    if missing:
        raise MsifValueError(f"the attribution plan needs both stages' factors and models; {missing[0]} is missing")
    if query_rank is not None:
        _positive("the query rank", query_rank)
    _positive("the number of candidates", candidates)
    _positive("the number of queries", queries)
    _positive("the batch size", batch_size)
    if model_dtype is not None and model_dtype not in MODEL_DTYPES:
        raise MsifValueError(f"model dtype must be one of {', '.join(MODEL_DTYPES)}, not {model_dtype!r}")
    entries = {s: _entries(stages[s], s, modules) for s in STAGE_NAMES}
    shapes = {s: [(e["name"], int(e["d_out"]), int(e["d_in"])) for e in entries[s]] for s in STAGE_NAMES}
    if shapes["pretrained"] != shapes["finetuned"]:
        raise MsifValueError("the two stages' factors track different modules or shapes")
    loaded = {s: load_config(configs[s]) for s in STAGE_NAMES}
    dtypes, weights, parameters, models, types = {}, {}, {}, {}, {}
    for s in STAGE_NAMES:
        config = loaded[s]
        published = dtype_name(getattr(config, "dtype", None)) or dtype_name(config.to_dict().get("torch_dtype"))
        dtypes[s] = model_dtype or published or "float32"
        if dtypes[s] not in MODEL_DTYPES:
            raise MsifValueError(f"the {s} model's dtype {dtypes[s]!r} is not one of {', '.join(MODEL_DTYPES)}")
        model = meta_model(config)
        weights[s] = _weights(model, dtypes[s])
        parameters[s] = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        models[s] = (names or {}).get(s) or str(getattr(config, "_name_or_path", "") or type(model).__name__)
        types[s] = str(getattr(config, "model_type", ""))
    # Gradients and preconditioning run in the compute dtype: float64 for float64 models, else float32.
    c = 8 if "float64" in dtypes.values() else 4
    compute = "float64" if c == 8 else "float32"
    tracked = entries["pretrained"]
    full = sum(int(m["d_out"]) * int(m["d_in"]) for m in tracked)
    if query_rank is None:
        query_elements = full
    else:
        query_elements = sum(min(int(m["d_out"]) * int(m["d_in"]), query_rank * (int(m["d_out"]) + int(m["d_in"])))
                             for m in tracked)
    d_in_sum = sum(int(m["d_in"]) for m in tracked)
    max_length = {s: int(getattr(_text(loaded[s]), "max_position_embeddings", 0) or 2048) for s in STAGE_NAMES}
    length = _positive("the number of tokens", length) if length is not None else max_length["pretrained"]
    query_length = _positive("the query's tokens", query_length) if query_length is not None else length
    length, query_length = min(length, max_length["pretrained"]), min(query_length, max_length["finetuned"])
    batch = min(batch_size, candidates)

    def shape_of(stage):
        return model_shape(loaded[stage], [SimpleNamespace(name=m["name"]) for m in tracked])

    parts = {
        "pretrained weights": weights["pretrained"],
        "finetuned weights": weights["finetuned"],
        "pretrained factors": sum(stored_bytes(e) for e in entries["pretrained"]),
        "finetuned factors": sum(stored_bytes(e) for e in entries["finetuned"]),
        "preconditioned query": queries * query_elements * c,
        "query gradients": queries * full * c,
        "query pass activations": _pass_bytes(shape_of("finetuned"), d_in_sum, min(queries, DEFAULT_BATCH),
                                              query_length, DTYPE_BYTES[dtypes["finetuned"]], c),
        "preconditioning temporaries": max(_precondition_temporaries(m, queries, c, query_rank) for m in tracked),
        "candidate batch activations": _pass_bytes(shape_of("pretrained"), d_in_sum, batch, length,
                                                   DTYPE_BYTES[dtypes["pretrained"]], c),
        "candidate gradient chunk": max(_chunk_bytes(m, batch, c, queries, query_rank) for m in tracked),
        "scores": len(tracked) * candidates * queries * c,
    }
    resident = ("pretrained weights", "finetuned weights", "pretrained factors", "finetuned factors")
    phases = {
        "query gradients": [*resident, "query gradients", "query pass activations"],
        "preconditioning": [*resident, "query gradients", "preconditioned query", "preconditioning temporaries"],
        "candidates": [*resident, "preconditioned query", "candidate batch activations",
                       "candidate gradient chunk", "scores"],
    }
    return AttributionPlan(
        models=models, model_types=types, parameters=parameters, model_dtypes=dtypes,
        factor_dtypes={s: ",".join(sorted({e.get("dtype", "float32") for e in entries[s]})) for s in STAGE_NAMES},
        compute_dtype=compute, modules=modules, tracked_modules=len(tracked), query_rank=query_rank, queries=queries,
        candidates=candidates, batch_size=batch, query_length=query_length, candidate_length=length, parts=parts,
        phases={name: {p: parts[p] for p in members} for name, members in phases.items()},
    )


def _text(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _precondition_temporaries(m: Mapping, queries: int, c: int, rank: int | None) -> int:
    """One module's temporaries in ``precondition_twice`` (or the low-rank coefficients): both stages'
    ``Lambda + damping`` and the rotated query with its intermediate product ([Q, d_out, d_in] each),
    the two changes of basis ``Q_S2^T Q_S1`` and ``Q_A1^T Q_A2``."""
    d_out, d_in, bs = int(m["d_out"]), int(m["d_in"]), int(m.get("block_size") or m["d_out"])
    full = d_out * d_in
    base = (2 * full + 2 * queries * full + d_in * d_in + (d_out // bs) * bs * bs) * c
    return base + (queries * full * c if rank is not None else 0)  # the dense coefficients before truncation


def _chunk_bytes(m: Mapping, batch: int, c: int, queries: int, rank: int | None) -> int:
    """Per-candidate gradients ``G_c`` of one module formed at once (at most 32 Mi elements, at least
    one candidate) in the compute dtype and, for full-rank queries, their partial products with the
    queries, one per block of ``PRODUCT_BLOCK`` elements."""
    full = int(m["d_out"]) * int(m["d_in"])
    chunk = min(batch, max(1, CHUNK_ELEMENTS // full))
    return chunk * full * c + (chunk * (full // PRODUCT_BLOCK) * queries * c if rank is None else 0)


_LABELS = {
    "preconditioned query": "one preconditioned query W_q",
    "query gradients": "query gradients G_q",
}


def format_attribution_plan(plan: AttributionPlan) -> str:
    """The plan as text (``hub-msif attribute --plan``): every part, every phase, the total; GB = 10**9 bytes."""
    rank = "full rank" if plan.query_rank is None else f"rank {plan.query_rank}"
    lines = [
        f"attribution plan (MS-IF): {plan.queries} quer{'y' if plan.queries == 1 else 'ies'} ({rank}) x "
        f"{plan.candidates} candidates in batches of {plan.batch_size}, {plan.candidate_length} tokens per candidate, "
        f"{plan.query_length} per query; {plan.tracked_modules} tracked modules ({plan.modules}); compute "
        f"{plan.compute_dtype}",
    ]
    for s in STAGE_NAMES:
        lines.append(f"  {s} model: {plan.models[s]} ({plan.model_types[s]}, {plan.parameters[s]:,} parameters, "
                     f"{plan.model_dtypes[s]}); factors stored in {plan.factor_dtypes[s]}")
    lines += ["", f"  {'part':<48} {'bytes':>16} {'GB':>9}"]
    for name, value in plan.parts.items():
        label = _LABELS.get(name, name) + (" (exact)" if name in EXACT else " (estimate)")
        lines.append(f"  {label:<48} {value:>16,} {value / GB:>9.3f}")
    lines += ["", "  phases (everything held at once):"]
    for name, members in plan.phases.items():
        lines.append(f"    {name:<46} {sum(members.values()):>16,} {sum(members.values()) / GB:>9.3f}")
    lines += ["", f"  total: {plan.total_bytes / GB:.3f} GB ({plan.total_bytes:,} bytes; GB = 10**9 bytes), "
                  f"the {plan.peak_phase} phase; weights {format_bytes(plan.weight_bytes)}, factors "
                  f"{format_bytes(plan.factor_bytes)}",
              f"  not included: {NOT_INCLUDED}"]
    return "\n".join(lines)


def plan_stages(manifest: Mapping, configs: Mapping[str, object], **options) -> AttributionPlan:
    """``plan_attribution`` from one pair manifest (``msif.json``, both stages)."""
    stages = manifest.get("stages") if isinstance(manifest, Mapping) else None
    if not isinstance(stages, Mapping) or any(s not in stages for s in STAGE_NAMES):
        raise MsifValueError("the factor manifest does not hold both stages (pretrained and finetuned)")
    return plan_attribution({s: stages[s] for s in STAGE_NAMES}, configs, **options)
