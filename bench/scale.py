"""Scale on paper: factor sizes and fitting memory of real model sizes, from published shapes.

Nothing here downloads a model. The shapes of each architecture are written below as data (from
the models' published ``config.json``), and the tracked modules, roles and per-head blocks are
derived exactly as ``hub_msif.factors.tracking.find_modules`` derives them for that architecture. For each
model the script computes:

1. the factor artifact: bytes of the tensors one stage stores (``q_a [d_in, d_in]``,
   ``q_s [nb, bs, bs]``, ``lam [nb, bs, d_in]``, ``eig_a [d_in]``, ``eig_s [nb, bs]`` per module,
   ``d_in`` counting the bias column) and a pair (both stages), for all modules and MLP only, in
   float32 and bfloat16; safetensors headers and the manifest (a few kB) are not counted;
2. the memory one fitting process needs (see ``fit_memory`` for every assumption): the model
   weights (float32 or bfloat16), the float64 covariance accumulators ``A`` and ``S``, the float64
   eigenbases, the rotation copies in the model's dtype, the float64 Lambda accumulator and its
   final normalised copy, and an estimate of one batch's activations;
3. the ``accelerate launch`` command of a multi-GPU fit.

The size formula is cross-checked against real files: tiny GPT-NeoX and Llama models
(``hub_msif.toy.examples.tiny_model``) are fitted with ``hub_msif.factors.fit.fit_factors`` and saved in
float32 and bfloat16, and the formula must equal, byte for byte, the tensor data of every saved
safetensors file (file size minus the 8-byte length and the JSON header); the module list the
formula derives from the config must equal ``find_modules`` on the instantiated model.

    .venv/bin/python bench/scale.py [--batch-size 4 --seq-len 512 --out bench/out/scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

GB = 1e9
GIB = 2**30
BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}

# Published architecture shapes (config.json of each model). ``checkpoint_dtype`` is the dtype the
# weights are published in, which is what ``hub-msif fit`` loads them as (``dtype="auto"``).
MODELS = {
    "EleutherAI/pythia-410m": {
        "arch": "gpt_neox", "layers": 24, "hidden": 1024, "heads": 16, "kv_heads": 16, "head_dim": 64,
        "ffn": 4096, "vocab": 50304, "bias": True, "tied_embeddings": False, "checkpoint_dtype": "float16",
    },
    "EleutherAI/pythia-2.8b": {
        "arch": "gpt_neox", "layers": 32, "hidden": 2560, "heads": 32, "kv_heads": 32, "head_dim": 80,
        "ffn": 10240, "vocab": 50304, "bias": True, "tied_embeddings": False, "checkpoint_dtype": "float16",
    },
    "bigscience/bloom-560m": {
        "arch": "bloom", "layers": 24, "hidden": 1024, "heads": 16, "kv_heads": 16, "head_dim": 64,
        "ffn": 4096, "vocab": 250880, "bias": True, "tied_embeddings": True, "checkpoint_dtype": "float16",
    },
    "meta-llama/Meta-Llama-3-8B": {
        "arch": "llama", "layers": 32, "hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128,
        "ffn": 14336, "vocab": 128256, "bias": False, "tied_embeddings": False, "checkpoint_dtype": "bfloat16",
    },
}
GPUS = {"A100/H100 80GB": 80 * GB, "H200 141GB": 141 * GB}


# ----------------------------------------------------------------------------------------------
# Modules and sizes


def tracked_modules(cfg: dict, split_heads: bool = True) -> list[dict]:
    """The modules ``find_modules`` tracks for this architecture: name, role, d_in (+1 bias), d_out, blocks."""
    h, f, heads, kv, hd = cfg["hidden"], cfg["ffn"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    b = int(cfg["bias"])
    out = []

    def add(name, role, d_in, d_out, blocks=1):
        out.append({"name": name, "role": role, "d_in": d_in + b, "d_out": d_out, "blocks": blocks})

    for i in range(cfg["layers"]):
        if cfg["arch"] in ("gpt_neox", "bloom"):
            base, attn = (f"gpt_neox.layers.{i}", "attention") if cfg["arch"] == "gpt_neox" else (f"transformer.h.{i}", "self_attention")
            add(f"{base}.{attn}.query_key_value", "attn_qkv", h, 3 * heads * hd, 3 * heads if split_heads else 1)
            add(f"{base}.{attn}.dense", "attn_out", heads * hd, h)
            add(f"{base}.mlp.dense_h_to_4h", "mlp", h, f)
            add(f"{base}.mlp.dense_4h_to_h", "mlp", f, h)
        elif cfg["arch"] == "llama":
            base = f"model.layers.{i}"
            add(f"{base}.self_attn.q_proj", "attn_qkv", h, heads * hd, heads if split_heads else 1)
            add(f"{base}.self_attn.k_proj", "attn_qkv", h, kv * hd, kv if split_heads else 1)
            add(f"{base}.self_attn.v_proj", "attn_qkv", h, kv * hd, kv if split_heads else 1)
            add(f"{base}.self_attn.o_proj", "attn_out", heads * hd, h)
            add(f"{base}.mlp.gate_proj", "mlp", h, f)
            add(f"{base}.mlp.up_proj", "mlp", h, f)
            add(f"{base}.mlp.down_proj", "mlp", f, h)
        else:
            raise ValueError(f"unknown architecture {cfg['arch']!r}")
    return out


def module_elements(m: dict) -> dict[str, int]:
    """Elements of each stored tensor of one module (storage.py's layout)."""
    d_in, d_out, nb = m["d_in"], m["d_out"], m["blocks"]
    bs = d_out // nb
    return {"q_a": d_in * d_in, "q_s": nb * bs * bs, "lam": nb * bs * d_in, "eig_a": d_in, "eig_s": nb * bs}


def stage_elements(modules: list[dict], which: str = "all") -> int:
    return sum(sum(module_elements(m).values()) for m in modules if which == "all" or m["role"] == "mlp")


def parameter_count(cfg: dict) -> int:
    h, f, heads, kv, hd, v, layers = (cfg[k] for k in ("hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab", "layers"))
    if cfg["arch"] in ("gpt_neox", "bloom"):
        per_layer = 2 * 2 * h + (h * 3 * heads * hd + 3 * heads * hd) + (heads * hd * h + h) + (h * f + f) + (f * h + h)
        extra = 2 * h + (2 * h if cfg["arch"] == "bloom" else 0)  # final LayerNorm (+ BLOOM's embedding LayerNorm)
    else:
        per_layer = 2 * h + h * heads * hd + 2 * h * kv * hd + heads * hd * h + 3 * h * f
        extra = h  # final RMSNorm
    embeddings = v * h * (1 if cfg["tied_embeddings"] else 2)
    return layers * per_layer + extra + embeddings


# ----------------------------------------------------------------------------------------------
# Fitting memory


def fit_memory(cfg: dict, modules: list[dict], model_dtype: str, batch_size: int, seq_len: int) -> dict:
    """Bytes one fitting process holds at its peak, by component (estimates are marked as such).

    Exact from the code (hub_msif/fit.py, ekfac.py): during the covariance pass every module's
    ``CovarianceAccumulator`` holds ``A [d_in, d_in]`` and ``S [nb, bs, bs]`` in float64; at the
    phase boundary each module's A and S are freed right after their float64 eigendecomposition,
    so from then on a process holds the eigenbases (``q_a``, ``q_s``, ``eig_a``, ``eig_s``, float64),
    ``LambdaAccumulator``'s copies of ``q_a`` and ``q_s`` in the compute dtype (float32 for float32,
    bfloat16 and float16 models) and its float64 ``lam [nb, bs, d_in]`` (divided in place at the
    end). The peak is the larger of the two phases. Every process holds all of it (the sums are
    all-reduced, not sharded), so more GPUs make the fit faster but not smaller per GPU. No
    parameter gradients and no optimizer state exist (``input_gradients_only``).

    Estimated: one batch's activations saved for backward in the model's dtype, eager attention,
    per layer and token: the inputs of the norms (2h), of every tracked linear layer (their
    captured copies with the bias column are counted once more), q/k/v (and GQA's k/v repeated
    to all heads), the attention context, the MLP intermediates (GELU: 2 x ffn; SwiGLU: 4 x ffn),
    and softmax probabilities plus their input (2 x heads x T); the logits with three float32
    copies (logits, softmax for the label draw, log-softmax of the loss); the backward's working
    set as one more layer's activations; and the Lambda pass's largest per-sequence rotated
    gradient chunk (``_MAX_CHUNK_ELEMENTS`` = 64M elements: rotated, squared, summed in the
    model's dtype and their float64 sum). Allocator fragmentation and the CUDA context (~0.5-1 GB)
    are not included.
    """
    e = BYTES[model_dtype]
    h, f, heads, kv, hd, v = (cfg[k] for k in ("hidden", "ffn", "heads", "kv_heads", "head_dim", "vocab"))
    tokens = batch_size * seq_len
    a_s = sum(m["d_in"] ** 2 + m["d_out"] * (m["d_out"] // m["blocks"]) for m in modules)
    vecs = sum(m["d_in"] + m["d_out"] for m in modules)
    lam = sum(m["d_out"] * m["d_in"] for m in modules)
    per_layer = modules[: len(modules) // cfg["layers"]]  # one layer's tracked modules
    captured_inputs = sum(m["d_in"] for m in per_layer)
    if cfg["arch"] == "llama":
        body = 2 * h + h + heads * hd + 2 * heads * hd + heads * hd + h + 4 * f  # norms, q,k,v (repeated), ctx, mlp
    else:
        body = 2 * h + h + 3 * heads * hd + heads * hd + h + 2 * f
    per_layer_act = tokens * (body + captured_inputs) * e + batch_size * 2 * heads * seq_len * seq_len * e
    chunk = 64 * 1024 * 1024
    biggest = max(m["d_out"] * m["d_in"] for m in modules)
    per_chunk = max(1, chunk // biggest) * biggest
    covariance_pass = {"covariances_A_S_float64": 8 * a_s}
    correction_pass = {
        "eigenbases_float64": 8 * (a_s + vecs),
        "rotation_copies_float32": 4 * a_s,
        "lambda_accumulator_float64": 8 * lam,
    }
    peak_phase = max(covariance_pass, correction_pass, key=lambda c: sum(c.values()))
    components = {
        "model_weights": parameter_count(cfg) * e,
        **peak_phase,
        "activations_estimate": cfg["layers"] * per_layer_act + per_layer_act + 3 * 4 * tokens * v
        + per_chunk * (3 * e + 8),
    }
    total = sum(components.values())
    return {
        "model_dtype": model_dtype, "batch_size": batch_size, "seq_len": seq_len,
        "components_bytes": components, "total_bytes": total, "total_gb": round(total / GB, 2),
        "factor_state_gb": round(sum(v for k, v in components.items() if k not in ("model_weights", "activations_estimate")) / GB, 2),
        "fits_on": {gpu: total <= cap for gpu, cap in GPUS.items()},
    }


def launch_command(model_id: str, processes: int, batch_size: int, seq_len: int, modules: str = "all") -> str:
    return (
        f"accelerate launch --multi_gpu --num_processes {processes} -m hub_msif fit --model {model_id} "
        f"--stage pretrained --data <dataset id or files> --max-length {seq_len} --batch-size {batch_size} "
        f"--modules {modules} --dtype bfloat16 --out factors/"
    )


# ----------------------------------------------------------------------------------------------
# Cross-check against real files


def safetensors_data_bytes(path: Path) -> int:
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header_len


def cross_check() -> list[dict]:
    import torch

    from hub_msif.factors.fit import FitConfig, fit_factors
    from hub_msif.factors.storage import load_stage, save_stage
    from hub_msif.factors.tracking import find_modules
    from hub_msif.toy.examples import tiny_model

    torch.set_num_threads(1)
    rows = []
    shapes = {
        "gpt_neox": dict(hidden=32, layers=2, heads=4, ffn=64),
        "llama": dict(hidden=32, layers=2, heads=4, kv_heads=2, ffn=64),
    }
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 64, (16, 24), generator=gen)
    sequences = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    for arch, kw in shapes.items():
        model = tiny_model(arch, vocab_size=64, **kw)
        c = model.config
        cfg = {
            "arch": arch, "layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
            "kv_heads": getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            "head_dim": c.hidden_size // c.num_attention_heads, "ffn": c.intermediate_size, "vocab": c.vocab_size,
            "bias": arch == "gpt_neox", "tied_embeddings": bool(getattr(c, "tie_word_embeddings", False)),
        }
        formula = tracked_modules(cfg)
        real = [{"name": t.name, "role": t.role, "d_in": t.d_in, "d_out": t.d_out, "blocks": t.num_blocks}
                for t in find_modules(model)]
        assert formula == real, f"{arch}: module list from the config differs from find_modules:\n{formula}\n{real}"
        with tempfile.TemporaryDirectory() as tmp:
            f32, bf16 = Path(tmp) / "f32", Path(tmp) / "bf16"
            fit_factors(model, sequences, f32, FitConfig(batch_size=4, checkpoint_every=0), pad_id=0, info={},
                        show_progress=False)
            loaded = load_stage(f32, "pretrained")
            save_stage(bf16, "pretrained", loaded.modules, {}, dtype="bfloat16")
            for dtype, folder in (("float32", f32), ("bfloat16", bf16)):
                for which in ("all", "mlp"):
                    files = [p for p in (folder / "pretrained").rglob("*.safetensors")
                             if which == "all" or p.parent.name == "mlp"]
                    actual = sum(safetensors_data_bytes(p) for p in files)
                    predicted = stage_elements(formula, which) * BYTES[dtype]
                    assert actual == predicted, f"{arch} {dtype} {which}: formula {predicted} B, files {actual} B"
                    rows.append({"arch": arch, "dtype": dtype, "modules": which, "files": len(files),
                                 "formula_bytes": predicted, "file_tensor_bytes": actual, "equal": actual == predicted})
    return rows


# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch and process (default 4)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--processes", type=int, default=8, help="GPUs in the launch command (default 8)")
    parser.add_argument("--no-check", action="store_true", help="skip the cross-check against fitted files")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "scale.json"))
    args = parser.parse_args(argv)

    check = [] if args.no_check else cross_check()
    for row in check:
        print(f"cross-check {row['arch']:<8} {row['dtype']:<8} {row['modules']:<3}: formula {row['formula_bytes']:>8} B"
              f" = tensor bytes of {row['files']} saved files {row['file_tensor_bytes']:>8} B: "
              f"{'OK' if row['equal'] else 'MISMATCH'}")

    models = {}
    for model_id, cfg in MODELS.items():
        mods = tracked_modules(cfg)
        mlp = [m for m in mods if m["role"] == "mlp"]
        sizes = {}
        for which in ("all", "mlp"):
            elements = stage_elements(mods, which)
            for dtype in ("float32", "bfloat16"):
                stage = elements * BYTES[dtype]
                sizes[f"{which}_{dtype}"] = {"stage_bytes": stage, "pair_bytes": 2 * stage,
                                             "stage_gb": round(stage / GB, 3), "pair_gb": round(2 * stage / GB, 3)}
        memory = {f"{which}_{md}": fit_memory(cfg, m, md, args.batch_size, args.seq_len)
                  for which, m in (("all", mods), ("mlp", mlp)) for md in ("float32", "bfloat16")}
        models[model_id] = {
            "config": cfg, "parameters": parameter_count(cfg), "tracked_modules": len(mods),
            "tracked_mlp_modules": len(mlp), "stage_elements": stage_elements(mods),
            "sizes": sizes, "fit_memory": memory,
            "launch": {"all": launch_command(model_id, args.processes, args.batch_size, args.seq_len, "all"),
                       "mlp": launch_command(model_id, args.processes, args.batch_size, args.seq_len, "mlp")},
        }

    print(f"\n{'model':<28} {'params':>7} {'stage f32':>10} {'pair f32':>9} {'pair bf16':>10} "
          f"{'MLP pair bf16':>13} {'fit mem bf16 all':>16} {'fit mem bf16 MLP':>16}")
    for model_id, r in models.items():
        s, m = r["sizes"], r["fit_memory"]
        print(f"{model_id:<28} {r['parameters'] / 1e9:>6.2f}B {s['all_float32']['stage_gb']:>8.2f}GB "
              f"{s['all_float32']['pair_gb']:>7.2f}GB {s['all_bfloat16']['pair_gb']:>8.2f}GB "
              f"{s['mlp_bfloat16']['pair_gb']:>11.2f}GB {m['all_bfloat16']['total_gb']:>14.1f}GB "
              f"{m['mlp_bfloat16']['total_gb']:>14.1f}GB")
    print(f"\nmulti-GPU fit: {models['meta-llama/Meta-Llama-3-8B']['launch']['all']}")

    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "command": "python bench/scale.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "assumptions": {
            "sizes": "bytes of the tensors one stage stores (q_a, q_s, lam, eig_a, eig_s per module, per-head "
                     "blocks for attention q/k/v, +1 input row for a bias); a pair is both stages; safetensors "
                     "headers and msif.json (a few kB) excluded; 1 GB = 1e9 bytes",
            "memory": " ".join(fit_memory.__doc__.split()),
            "model_dtype_note": "hub-msif fit loads the weights in their published dtype (dtype='auto'); "
                                "its --dtype flag is the storage dtype of the factors",
            "gpus": {k: v / GB for k, v in GPUS.items()},
        },
        "batch_size": args.batch_size, "seq_len": args.seq_len,
        "cross_check": check,
        "models": models,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
