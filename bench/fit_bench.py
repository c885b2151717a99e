"""Fit-time and factor-size benchmark: hub_msif against kronfluence 1.0.1 and a two-pass floor.

One run measures, on the same randomly initialised GPT-NeoX (the paper's scalability size: 2
layers, hidden 256, 2 heads, FFN 1024), the same token sequences and the same batch size:

a. hub_msif's fit (covariance pass, float64 eigendecomposition, eigenvalue-correction pass,
   saving): sampled labels with per-head blocks (the default), and empirical labels without the
   head split (like for like with kronfluence's structure);
b. kronfluence's EK-FAC fit (covariance matrices, eigendecomposition, Lambda matrices) with sampled
   labels, over the same modules (all linear layers of the decoder blocks);
c. the floor: two plain forward+backward passes over the data (``loss.backward()`` with parameter
   gradients), which any two-pass EK-FAC fit has to pay;
d. the size on disk of hub_msif's factor folder (float32 and bfloat16) and kronfluence's;
e. where hub_msif's fit spends its time, per phase (the manifest's ``fit.phase_seconds``): forward and
   backward with the capture hooks, label sampling and loss, covariance updates, eigendecomposition,
   Lambda updates, writing; with ``--phases`` also for a Pythia-410m-shaped model (hidden 1024, 16
   heads, FFN 4096; ``--phase-layers`` of its 24 layers and the bench's vocabulary, to fit this CPU).

Prints a table and writes the same numbers to ``bench/out/fit_bench.json``. Run with
``make bench`` or ``.venv/bin/python -m bench.fit_bench [--sequences 256 --threads 2 --phases]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

# OpenMP threads that spin while waiting make 2 threads on a 2-CPU machine shared with other work
# about 10x slower (measured: 19.7 s instead of 1.7 s for the same passes); sleeping waiters avoid it.
# It applies to every measurement alike and must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import PAD_ID, Clock, batches, machine_info, make_sequences  # noqa: E402
from hub_msif.factors.architectures import find_modules  # noqa: E402
from hub_msif.factors.fit import FitConfig, fit_factors  # noqa: E402
from hub_msif.factors.storage import load_stage, save_stage  # noqa: E402
from hub_msif.toy.examples import tiny_model  # noqa: E402

TARGETS = {"hub_msif_over_kronfluence": 0.7, "hub_msif_over_floor": 1.5, "size_over_kronfluence": 0.55}  # issue 22


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=256, help="number of sequences (default 256)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch, for every method (default 8)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default 1024)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each measurement; the fastest counts")
    parser.add_argument("--no-empirical", action="store_true", help="skip the hub_msif empirical/no-split fit")
    parser.add_argument("--phases", action="store_true",
                        help="also time the fit's phases on a Pythia-410m-shaped model (hidden 1024, 16 heads, FFN 4096)")
    parser.add_argument("--phase-layers", type=int, default=2, help="layers of the Pythia-410m-shaped model (default 2)")
    parser.add_argument("--phase-sequences", type=int, default=32,
                        help="sequences of --seq-len tokens for the Pythia-410m-shaped fit (default 32)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "fit_bench.json"))
    parser.add_argument("--keep", default=None, help="keep the factor folders in this directory")
    return parser.parse_args(argv)


def summed_loss(model, batch, sample: bool = False) -> torch.Tensor:
    """Summed next-token cross-entropy; with ``sample`` the labels are drawn from the model."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logits = logits[:, :-1]
    targets = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    if sample:
        with torch.no_grad():
            probs = torch.softmax(logits.detach().float(), dim=-1)
            drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(targets.shape)
            targets = torch.where(targets == -100, targets, drawn)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                           reduction="sum")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file())


def time_floor(model, sequences, batch_size: int) -> float:
    """Two plain passes: forward, summed loss, backward with parameter gradients."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(True)
    clock = Clock()
    for _ in range(2):
        for batch in batches(sequences, batch_size):
            model.zero_grad(set_to_none=True)
            summed_loss(model, batch).backward()
    return clock.read()


def time_hub_msif(model, sequences, batch_size: int, folder: Path, label_mode: str, split_heads: bool) -> dict:
    config = FitConfig(batch_size=batch_size, modules="all", split_heads=split_heads, label_mode=label_mode,
                       storage_dtype="float32", checkpoint_every=0)
    clock = Clock()
    factors = fit_factors(copy.deepcopy(model), sequences, folder, config, pad_id=PAD_ID, info={},
                          show_progress=False)
    return {**clock.read(), "loop_seconds": factors.info["fit"]["seconds"], "bytes": folder_bytes(folder),
            "phase_seconds": factors.info["fit"]["phase_seconds"]}


def time_phases(args, work: Path) -> dict:
    """One fit (sampled labels, per-head blocks) of a Pythia-410m-shaped model: where its time goes."""
    model = tiny_model("gpt_neox", vocab_size=args.vocab, hidden=1024, layers=args.phase_layers, heads=16, ffn=4096,
                       seed=0, dtype=torch.float32)
    sequences = make_sequences(args.phase_sequences, args.seq_len, args.vocab)
    result = time_hub_msif(model, sequences, args.batch_size, work / "phases", "sampled", True)
    return {"model": f"Pythia-410m-shaped: {args.phase_layers} of 24 layers (hidden 1024, 16 heads, FFN 4096), "
                     f"vocab {args.vocab}", "sequences": args.phase_sequences, "seq_len": args.seq_len,
            "batch_size": args.batch_size, **result}


def time_kronfluence(model, sequences, batch_size: int, folder: Path, module_names: list[str]) -> dict:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from bench.kronfluence_task import LanguageModelTask, collator

    task = LanguageModelTask(module_names, summed_loss)
    prepared = prepare_model(copy.deepcopy(model), task)
    args = FactorArguments(strategy="ekfac", use_empirical_fisher=False)  # sampled labels, default dtypes
    loader = DataLoaderKwargs(num_workers=0, collate_fn=collator(PAD_ID))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyzer = Analyzer("bench", prepared, task, cpu=True, disable_tqdm=True, disable_model_save=True,
                            output_dir=str(folder), log_level=logging.WARNING)
        common = dict(factors_name="ekfac", factor_args=args)
        total, phases = Clock(), {}
        clock = Clock()
        analyzer.fit_covariance_matrices(dataset=sequences, per_device_batch_size=batch_size,
                                         dataloader_kwargs=loader, **common)
        phases["covariance"], clock = clock.read(), Clock()
        analyzer.perform_eigendecomposition(**common)
        phases["eigendecomposition"], clock = clock.read(), Clock()
        analyzer.fit_lambda_matrices(dataset=sequences, per_device_batch_size=batch_size,
                                     dataloader_kwargs=loader, **common)
        phases["lambda"] = clock.read()
        result = total.read()
    return {**result, "phases": phases, "bytes": folder_bytes(analyzer.factors_output_dir("ekfac"))}


def _best(runs: list[dict]) -> dict:
    """The run with the least wall time, plus every run's times."""
    best = dict(min(runs, key=lambda r: r["seconds"]))
    if len(runs) > 1:
        best["all_runs"] = [{k: r[k] for k in ("seconds", "cpu_seconds")} for r in runs]
    return best


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    model = tiny_model("gpt_neox", vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                       ffn=args.ffn, seed=0, dtype=torch.float32)
    sequences = make_sequences(args.sequences, args.seq_len, args.vocab)
    module_names = [t.name for t in find_modules(model, "all", split_heads=False)]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="fit_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info["load_average_start"] = os.getloadavg()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"GPT-NeoX {args.layers} layers, hidden {args.hidden}, {args.heads} heads, FFN {args.ffn}, vocab "
          f"{args.vocab} ({parameters / 1e6:.2f}M parameters); {args.sequences} x {args.seq_len} tokens, "
          f"batch {args.batch_size}; {len(module_names)} modules", flush=True)
    print(f"machine: {info['cpu']}, {info['cpu_count']} CPUs, load average {info['load_average_start'][0]:.1f}; "
          f"torch {info['torch']}, {info['torch_threads']} threads, OMP_WAIT_POLICY={info['omp_wait_policy']}", flush=True)

    time_floor(model, sequences[: args.batch_size], args.batch_size)  # warm-up (allocator, kernels)
    runs: dict[str, list[dict]] = {"floor": [], "hub_msif": [], "kronfluence": []}
    if not args.no_empirical:
        runs["hub_msif_empirical"] = []
    for repeat in range(args.repeats):
        suffix = f" (repeat {repeat + 1}/{args.repeats})" if args.repeats > 1 else ""
        print(f"floor: two forward+backward passes{suffix} ...", flush=True)
        runs["floor"].append(time_floor(model, sequences, args.batch_size))
        print(f"hub_msif: sampled labels, per-head blocks{suffix} ...", flush=True)
        runs["hub_msif"].append(time_hub_msif(model, sequences, args.batch_size, work / f"hub_msif{repeat}",
                                              "sampled", True))
        print(f"kronfluence EK-FAC: sampled labels{suffix} ...", flush=True)
        runs["kronfluence"].append(time_kronfluence(model, sequences, args.batch_size, work / f"kronfluence{repeat}",
                                                    module_names))
        if not args.no_empirical:
            print(f"hub_msif: empirical labels, no head split{suffix} ...", flush=True)
            runs["hub_msif_empirical"].append(time_hub_msif(model, sequences, args.batch_size,
                                                            work / f"hub_msif_empirical{repeat}", "empirical", False))
    phases = None
    if args.phases:
        print(f"hub_msif phases: Pythia-410m-shaped, {args.phase_layers} layers ...", flush=True)
        phases = time_phases(args, work)
    print("floor, again (drift check) ...", flush=True)
    runs["floor"].append(time_floor(model, sequences, args.batch_size))
    info["load_average_end"] = os.getloadavg()

    results = {name: _best(r) for name, r in runs.items()}
    bf16 = work / "hub_msif_bf16"
    save_stage(bf16, "pretrained", load_stage(work / "hub_msif0", "pretrained").modules, {}, "bfloat16")
    results["hub_msif_bf16"] = {"bytes": folder_bytes(bf16)}

    floor, kron, ours = results["floor"], results["kronfluence"], results["hub_msif"]
    ratios = {
        "hub_msif_over_kronfluence": ours["seconds"] / kron["seconds"],
        "hub_msif_over_floor": ours["seconds"] / floor["seconds"],
        "kronfluence_over_floor": kron["seconds"] / floor["seconds"],
        "size_over_kronfluence": ours["bytes"] / kron["bytes"],
        "size_bf16_over_kronfluence": results["hub_msif_bf16"]["bytes"] / kron["bytes"],
    }
    cpu_ratios = {
        "hub_msif_over_kronfluence": ours["cpu_seconds"] / kron["cpu_seconds"],
        "hub_msif_over_floor": ours["cpu_seconds"] / floor["cpu_seconds"],
        "kronfluence_over_floor": kron["cpu_seconds"] / floor["cpu_seconds"],
    }
    if "hub_msif_empirical" in results:
        like = results["hub_msif_empirical"]
        ratios["hub_msif_empirical_over_kronfluence"] = like["seconds"] / kron["seconds"]
        ratios["hub_msif_empirical_over_floor"] = like["seconds"] / floor["seconds"]
        cpu_ratios["hub_msif_empirical_over_kronfluence"] = like["cpu_seconds"] / kron["cpu_seconds"]
        cpu_ratios["hub_msif_empirical_over_floor"] = like["cpu_seconds"] / floor["cpu_seconds"]
    met = {key: ratios[key] <= bound for key, bound in TARGETS.items()}

    rows = [("floor: 2 x (forward + backward with parameter gradients)", floor),
            ("hub_msif fit: sampled labels, per-head blocks (float32)", ours)]
    if "hub_msif_empirical" in results:
        rows.append(("hub_msif fit: empirical labels, no head split (float32)", results["hub_msif_empirical"]))
    rows += [("hub_msif factors saved as bfloat16", results["hub_msif_bf16"]),
             ("kronfluence EK-FAC fit: sampled labels (total)", kron)]
    rows += [(f"  kronfluence {phase}", times) for phase, times in kron["phases"].items()]

    def cell(value, fmt, width):
        return format(value, fmt) if value is not None else " " * width

    print()
    print(f"{'measurement':<58} {'wall s':>8} {'CPU s':>8} {'MB on disk':>11}")
    for label, row in rows:
        size = row.get("bytes")
        print(f"{label:<58} {cell(row.get('seconds'), '8.2f', 8)} {cell(row.get('cpu_seconds'), '8.2f', 8)} "
              f"{cell(size / 1e6 if size else None, '11.2f', 11)}")
    print()
    print(f"{'ratio':<44} {'wall':>7} {'CPU':>7}   target (wall)")
    for key, value in ratios.items():
        target = f"<= {TARGETS[key]:.2f}: {'met' if met[key] else 'MISSED'}" if key in TARGETS else ""
        print(f"{key:<44} {value:7.3f} {cell(cpu_ratios.get(key), '7.3f', 7)}   {target}")
    phase_rows = {"bench model": ours["phase_seconds"]}
    if phases is not None:
        phase_rows[phases["model"]] = phases["phase_seconds"]
    print(f"\n{'where the fit time goes (s, main process)':<44} " + " ".join(f"{k[:12]:>12}" for k in ours["phase_seconds"]))
    for label, row in phase_rows.items():
        print(f"{label[:44]:<44} " + " ".join(f"{v:12.2f}" for v in row.values()))
    floors = ", ".join(f"{r['seconds']:.2f}" for r in runs["floor"])
    print(f"\nwall time is the best of the runs (floor runs: {floors} s); torch threads {info['torch_threads']}, "
          f"{info['cpu_count']} CPUs, load average {info['load_average_start'][0]:.1f} at the start and "
          f"{info['load_average_end'][0]:.1f} at the end")
    if max(info["load_average_start"][0], info["load_average_end"][0]) > (info["cpu_count"] or 1):
        print("warning: the machine was busy with other work; times (and ratios) are noisy")

    report = {
        "command": "python -m bench.fit_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "setup": {"model": "gpt_neox", "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "ffn": args.ffn, "vocab": args.vocab, "sequences": args.sequences, "seq_len": args.seq_len,
                  "batch_size": args.batch_size, "repeats": args.repeats, "modules": module_names,
                  "parameters": parameters},
        "machine": info, "results": results, "ratios": ratios, "cpu_ratios": cpu_ratios,
        "targets": TARGETS, "targets_met": met,
    }
    if phases is not None:
        report["phases"] = phases
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
