"""Scale on paper: factor sizes, fitting memory, passes and partitions of real model pairs.

Nothing here downloads a model. The published ``config.json`` values of each model are written
below as data; every number comes from ``hub_msif.factors.memory_plan.plan_fit`` (what ``hub-msif fit
--plan`` prints), which builds the model on the meta device from a folder holding only that
config and finds its tracked modules with ``find_modules``. For each model and pair:

1. the factor artifact (one stage and a pair) in float32 and bfloat16, all modules and MLP only;
2. the memory of one fitting process as the fit was before module partitions (one process, one
   partition, float64 accumulation), by component of its peak phase;
3. on paper: each pair on 1 and 8 processes of 80 GB, with the fewest module partitions that fit,
   and at the issues' targets (dolly-v2-3b pair <= 40 GB and Llama-3-8B pair <= 50 GB per process
   on 8 processes): per-process peak, passes over the data, pair artifact, launch command.

The artifact size is cross-checked against real files: tiny GPT-NeoX and Llama models are fitted
with ``fit_factors`` and saved in float32 and bfloat16, and the plan must equal, byte for byte,
the tensor data of the saved safetensors files. The plan's memory is checked against measured
fits in tests/factors/test_plan.py.

    .venv/bin/python -m bench.scale [--batch-size 8 --seq-len 512 --out bench/out/scale.json]
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

# Published config.json values (only what shapes the model) of each pair's two models; a pair's
# fine-tuned model has the same modules (dolly-v2-3b differs from Pythia-2.8b in vocabulary and dtype).
PYTHIA = {"model_type": "gpt_neox", "hidden_act": "gelu", "rotary_pct": 0.25, "rotary_emb_base": 10000,
          "use_parallel_residual": True, "tie_word_embeddings": False, "vocab_size": 50304, "torch_dtype": "float16",
          "max_position_embeddings": 2048}
CONFIGS = {
    "EleutherAI/pythia-410m": PYTHIA | {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                                        "intermediate_size": 4096},
    "EleutherAI/pythia-2.8b": PYTHIA | {"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32,
                                        "intermediate_size": 10240},
    "databricks/dolly-v2-3b": PYTHIA | {"hidden_size": 2560, "num_hidden_layers": 32, "num_attention_heads": 32,
                                        "intermediate_size": 10240, "vocab_size": 50280, "torch_dtype": "bfloat16"},
    "bigscience/bloom-560m": {"model_type": "bloom", "hidden_size": 1024, "n_layer": 24, "n_head": 16,
                              "vocab_size": 250880, "torch_dtype": "float16"},
    "meta-llama/Meta-Llama-3-8B": {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
                                   "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
                                   "vocab_size": 128256, "rope_theta": 500000.0, "tie_word_embeddings": False,
                                   "torch_dtype": "bfloat16", "max_position_embeddings": 8192},
    "Qwen/Qwen2.5-7B": {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
                        "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
                        "vocab_size": 152064, "rope_theta": 1000000.0, "tie_word_embeddings": False,
                        "torch_dtype": "bfloat16", "max_position_embeddings": 131072},
}
CONFIGS["bigscience/bloomz-560m"] = CONFIGS["bigscience/bloom-560m"]
CONFIGS["meta-llama/Meta-Llama-3-8B-Instruct"] = CONFIGS["meta-llama/Meta-Llama-3-8B"]
CONFIGS["Qwen/Qwen2.5-7B-Instruct"] = CONFIGS["Qwen/Qwen2.5-7B"]
# (pre-trained, fine-tuned); pythia-410m's fine-tune: any of its shape (e.g. the paper's own).
PAIRS = {
    "Pythia-410m": ("EleutherAI/pythia-410m", "EleutherAI/pythia-410m"),
    "BLOOM-560m": ("bigscience/bloom-560m", "bigscience/bloomz-560m"),
    "Pythia-2.8b / dolly-v2-3b": ("EleutherAI/pythia-2.8b", "databricks/dolly-v2-3b"),
    "Llama-3-8B": ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct"),
    "Qwen2.5-7B": ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"),
}
# The targets: per-process peak on 8 processes.
TARGETS = {"Pythia-2.8b / dolly-v2-3b": 40 * GB, "Llama-3-8B": 50 * GB}  # issue 22: Llama-3-8B <= 50 GB
MODELS = ["EleutherAI/pythia-410m", "EleutherAI/pythia-2.8b", "bigscience/bloom-560m", "meta-llama/Meta-Llama-3-8B",
          "Qwen/Qwen2.5-7B"]
GPUS = {"A100/H100 80GB": 80 * GB, "H200 141GB": 141 * GB}
COMPONENTS = ("model_weights", "activations", "covariance_accumulators", "eigenbases_float64", "eigenbasis_copies",
              "lambda_accumulators", "other")


def config_folder(root: Path, model_id: str) -> Path:
    """A folder holding only the model's config.json (what ``hub-msif fit --plan --model`` reads)."""
    folder = root / model_id.replace("/", "--")
    if not folder.is_dir():
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(CONFIGS[model_id]))
    return folder


def fit_memory(plan) -> dict:
    """The peak phase's components of a plan's largest process, on a fixed set of keys."""
    peak = plan.peak_process
    parts = dict.fromkeys(COMPONENTS, 0)
    for name, value in peak.phases[peak.peak_phase].items():
        parts[name if name in parts else "other"] += value
    total = plan.per_process_peak_bytes
    return {"model_dtype": plan.model_dtype, "batch_size": plan.batch_size, "seq_len": plan.max_length,
            "peak_phase": peak.peak_phase, "components_bytes": parts, "total_bytes": total,
            "total_gb": round(total / GB, 2), "fits_on": {gpu: total <= cap for gpu, cap in GPUS.items()}}


def launch_command(model_id: str, stage: str, processes: int, batch_size: int, seq_len: int, budget_gb: int) -> str:
    return (
        f"accelerate launch --multi_gpu --num_processes {processes} -m hub_msif fit --model {model_id} "
        f"--stage {stage} --data <dataset id or files> --max-length {seq_len} --batch-size {batch_size} "
        f"--max-memory {budget_gb}GB --out factors/"
    )


# ----------------------------------------------------------------------------------------------
# Cross-check against real files


def safetensors_data_bytes(path: Path) -> int:
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header_len


def cross_check() -> list[dict]:
    """The plan's artifact size against the tensor bytes of factor files fitted and saved for real."""
    import torch

    from hub_msif.factors.fit import FitConfig, fit_factors
    from hub_msif.factors.memory_plan import plan_fit
    from hub_msif.factors.storage import load_stage, save_stage
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
                    predicted = plan_fit(model, FitConfig(modules=which, storage_dtype=dtype)).artifact_bytes
                    assert actual == predicted, f"{arch} {dtype} {which}: plan {predicted} B, files {actual} B"
                    rows.append({"arch": arch, "dtype": dtype, "modules": which, "files": len(files),
                                 "formula_bytes": predicted, "file_tensor_bytes": actual, "equal": actual == predicted})
    return rows


# ----------------------------------------------------------------------------------------------


def on_paper(root: Path, batch_size: int, seq_len: int) -> list[dict]:
    """Each pair on 1 and 8 processes of 80 GB (fewest partitions that fit), and at the issue's targets."""
    from hub_msif.errors import MsifValueError
    from hub_msif.factors.config import FitConfig
    from hub_msif.factors.memory_plan import plan_fit

    rows = []
    for pair, (base, tuned) in PAIRS.items():
        budgets = [(1, 80 * GB), (8, 80 * GB)] + ([(8, TARGETS[pair])] if pair in TARGETS else [])
        for processes, budget in budgets:
            row = {"pair": pair, "models": [base, tuned], "processes": processes, "budget_bytes": budget,
                   "batch_size": batch_size, "seq_len": seq_len}
            stages = {}
            for stage, model_id in (("pretrained", base), ("finetuned", tuned)):
                try:
                    plan = plan_fit(config_folder(root, model_id), FitConfig(stage=stage, batch_size=batch_size),
                                    num_processes=processes, max_memory=budget, max_length=seq_len)
                except MsifValueError as err:
                    stages[stage] = {"fits": False, "message": str(err)}
                    continue
                stages[stage] = {"fits": True, "module_partitions": plan.module_partitions, "passes": plan.passes,
                                 "per_process_peak_bytes": plan.per_process_peak_bytes, "peak_phase":
                                 plan.peak_process.peak_phase, "artifact_bytes": plan.artifact_bytes,
                                 "model_dtype": plan.model_dtype, "note": plan.note,
                                 "launch": launch_command(model_id, stage, processes, batch_size, seq_len,
                                                          int(budget // GB))}
            row["stages"] = stages
            row["fits"] = all(s["fits"] for s in stages.values())
            if row["fits"]:
                row["per_process_peak_bytes"] = max(s["per_process_peak_bytes"] for s in stages.values())
                row["passes"] = sum(s["passes"] for s in stages.values())
                row["pair_artifact_bytes"] = sum(s["artifact_bytes"] for s in stages.values())
            if pair in TARGETS and processes == 8 and budget == TARGETS[pair]:
                row["target_bytes"] = TARGETS[pair]
                row["target_met"] = row["fits"] and row["per_process_peak_bytes"] <= TARGETS[pair]
            rows.append(row)
    return rows


def main(argv=None) -> int:
    from hub_msif.factors.config import FitConfig
    from hub_msif.factors.memory_plan import ASSUMPTIONS, plan_fit

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch and process (default 8)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--no-check", action="store_true", help="skip the cross-check against fitted files")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "scale.json"))
    args = parser.parse_args(argv)

    check = [] if args.no_check else cross_check()
    for row in check:
        print(f"cross-check {row['arch']:<8} {row['dtype']:<8} {row['modules']:<3}: plan {row['formula_bytes']:>8} B"
              f" = tensor bytes of {row['files']} saved files {row['file_tensor_bytes']:>8} B: "
              f"{'OK' if row['equal'] else 'MISMATCH'}")

    root = Path(tempfile.mkdtemp(prefix="scale-configs-"))
    models = {}
    for model_id in MODELS:
        folder = config_folder(root, model_id)
        sizes, memory = {}, {}
        for which in ("all", "mlp"):
            for dtype in ("float32", "bfloat16"):
                stage = plan_fit(folder, FitConfig(modules=which, storage_dtype=dtype)).artifact_bytes
                sizes[f"{which}_{dtype}"] = {"stage_bytes": stage, "pair_bytes": 2 * stage,
                                             "stage_gb": round(stage / GB, 3), "pair_gb": round(2 * stage / GB, 3)}
                memory[f"{which}_{dtype}"] = fit_memory(plan_fit(folder, FitConfig(modules=which, model_dtype=dtype,
                                                                           batch_size=args.batch_size),
                                                                 max_length=args.seq_len))
        plan = plan_fit(folder)
        c = CONFIGS[model_id]
        models[model_id] = {
            "config": {"arch": c["model_type"], "layers": c.get("num_hidden_layers", c.get("n_layer")),
                       "hidden": c["hidden_size"], "heads": c.get("num_attention_heads", c.get("n_head")),
                       "kv_heads": c.get("num_key_value_heads", c.get("num_attention_heads", c.get("n_head"))),
                       "ffn": c.get("intermediate_size", 4 * c["hidden_size"]), "vocab": c["vocab_size"],
                       "checkpoint_dtype": c["torch_dtype"]},
            "parameters": plan.parameters, "tracked_modules": len(plan.tracked_modules),
            "tracked_mlp_modules": sum(1 for m in plan.tracked_modules if m.role == "mlp"),
            "sizes": sizes, "fit_memory": memory,
            "launch": {"all": launch_command(model_id, "pretrained", 8, args.batch_size, args.seq_len, 80),
                       "mlp": launch_command(model_id, "pretrained", 8, args.batch_size, args.seq_len, 80)
                       + " --modules mlp"},
        }
    paper = on_paper(root, args.batch_size, args.seq_len)

    print(f"\none process, one partition, float64 accumulation (today's fit), batch {args.batch_size} x {args.seq_len}:")
    print(f"{'model':<28} {'params':>7} {'stage f32':>10} {'pair f32':>9} {'pair bf16':>10} {'fit peak bf16':>14}")
    for model_id, r in models.items():
        s, m = r["sizes"], r["fit_memory"]
        print(f"{model_id:<28} {r['parameters'] / 1e9:>6.2f}B {s['all_float32']['stage_gb']:>8.2f}GB "
              f"{s['all_float32']['pair_gb']:>7.2f}GB {s['all_bfloat16']['pair_gb']:>8.2f}GB "
              f"{m['all_bfloat16']['total_gb']:>12.1f}GB")
    print(f"\non paper: fewest module partitions K that fit the budget per process (batch {args.batch_size} x "
          f"{args.seq_len}, float64 accumulation, published model dtype):")
    print(f"{'pair':<26} {'procs':>5} {'budget':>7} {'K pre/ft':>9} {'passes':>6} {'peak/process':>13} "
          f"{'pair artifact':>14} {'target':>8}")
    for row in paper:
        ks = "/".join(str(s.get("module_partitions", "-")) for s in row["stages"].values())
        peak = f"{row['per_process_peak_bytes'] / GB:.1f} GB" if row["fits"] else "no fit"
        size = f"{row['pair_artifact_bytes'] / GB:.1f} GB" if row["fits"] else "-"
        target = ("met" if row["target_met"] else "MISSED") if "target_met" in row else ""
        print(f"{row['pair']:<26} {row['processes']:>5} {row['budget_bytes'] / GB:>5.0f}GB {ks:>9} "
              f"{row.get('passes', '-'):>6} {peak:>13} {size:>14} {target:>8}")

    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count()},
        "command": "python -m bench.scale " + " ".join(sys.argv[1:] if argv is None else argv),
        "assumptions": {
            "sizes": "bytes of the tensors one stage stores (q_a, q_s, lam, eig_a, eig_s per module, per-head "
                     "blocks for attention q/k/v, +1 input row for a bias); a pair is both stages; safetensors "
                     "headers and msif.json (a few kB) excluded; 1 GB = 1e9 bytes",
            "memory": "hub_msif.factors.memory_plan (plan_fit, the same arithmetic as hub-msif fit --plan): " + ASSUMPTIONS,
            "model_dtype_note": "fit_memory: one process, one module partition, float64 accumulation (the fit "
                                "before module partitions); the model in the dtype named in the key",
            "gpus": {k: v / GB for k, v in GPUS.items()},
        },
        "batch_size": args.batch_size, "seq_len": args.seq_len,
        "cross_check": check,
        "models": models,
        "on_paper": paper,
        "targets_bytes": TARGETS,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
