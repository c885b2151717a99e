"""Peak resident memory and time of a fit per process: 1, 2 and 4 processes, and module partitions K = 1, 4.

The paper's scalability model (GPT-NeoX, 2 layers, hidden 256, 2 heads, FFN 1024, vocabulary 1024,
random initialisation, float32) is fitted on the same random token sequences in a fresh process for
each setting (``accelerate launch`` on CPU with gloo for two processes), with float64 accumulation
(the default). Each process records:

- ``baseline_mib``: resident memory just before the fit (Python, torch, transformers, model, data);
- ``peak_mib``: the peak resident memory of the process (``VmHWM``; a fresh ``exec`` starts it anew);
- ``fit_peak_mib``: the peak during the fit alone (``VmHWM`` reset through ``/proc/self/clear_refs``
  just before the fit, where the kernel allows it), and ``fit_increase_mib = fit_peak - baseline``;
- ``seconds``: wall time of ``fit_factors``; ``cpu_seconds``: its CPU time (one thread per process),
  which a loaded shared machine disturbs much less than the wall time.

Also written: the accumulator bytes the partitions and owners should leave per process
(``hub_msif.factors.partition``), and each rank's memory plan (``plan_fit``: its peak less the model
weights, which the baseline already holds) next to its measured increase. Writes ``bench/out/fit_memory.json``.
Run: ``nice -n 10 .venv/bin/python -m bench.fit_memory`` (a few minutes on 2 cores); issue 22's
measurement, where the accumulators dominate: ``--hidden 512 --heads 4 --ffn 2048 --sequences 32 --seq-len 64``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
SETTINGS = [(1, 1), (2, 1), (4, 1), (1, 4)]  # (processes, module partitions)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--out", default=str(HERE / "out" / "fit_memory.json"))
    parser.add_argument("--worker", nargs=2, metavar=("PARTITIONS", "RECORD"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def worker(args) -> None:
    """One process of one setting: build model and data, fit, record memory and time."""
    import torch

    from hub_msif.factors.fit import FitConfig, fit_factors
    from hub_msif.toy.examples import tiny_model

    torch.set_num_threads(1)
    partitions, record = int(args.worker[0]), args.worker[1]
    model = tiny_model("gpt_neox", vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                       ffn=args.ffn, dtype=torch.float32, max_positions=max(256, args.seq_len))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, args.vocab, (args.sequences, args.seq_len), generator=generator)
    sequences = [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]
    config = FitConfig(batch_size=args.batch_size, checkpoint_every=0, module_partitions=partitions)
    # The process group (gloo's buffers and threads) is set up before the baseline: not the fit's memory.
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=int(os.environ.get("WORLD_SIZE", "1")) > 1)
    baseline = _status_kib("VmRSS")
    reset = _reset_peak()
    start, cpu_start = time.perf_counter(), time.process_time()
    # Every process writes into the same folder (the owners' module files, rank 0's manifest).
    fitted = fit_factors(model, sequences, Path(f"{record}-factors"), config, pad_id=0, info={}, show_progress=False,
                         load_result=False, accelerator=accelerator)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    fit_peak = _status_kib("VmHWM")
    rank = int(os.environ.get("RANK", "0"))
    result = {"rank": rank, "baseline_mib": baseline / 1024, "fit_peak_mib": fit_peak / 1024 if reset else None,
              "fit_increase_mib": (fit_peak - baseline) / 1024 if reset else None, "seconds": seconds,
              "cpu_seconds": cpu_seconds,
              "num_processes": json.loads(Path(f"{record}-factors/msif.json").read_text())["stages"]["pretrained"]["fit"]["num_processes"]}
    assert fitted is None
    result["peak_mib"] = _status_kib("VmHWM") / 1024 if not reset else None  # with a reset, fit_peak_mib is it
    Path(f"{record}-rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setting(args, processes: int, partitions: int, folder: Path) -> dict:
    record = folder / f"p{processes}-k{partitions}"
    passthrough = ["--sequences", str(args.sequences), "--seq-len", str(args.seq_len), "--batch-size",
                   str(args.batch_size), "--hidden", str(args.hidden), "--layers", str(args.layers), "--heads",
                   str(args.heads), "--ffn", str(args.ffn), "--vocab", str(args.vocab),
                   "--worker", str(partitions), str(record)]
    # A fixed mmap threshold returns freed tensors to the system (as in tests/factors/test_memory_plan.py).
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "MALLOC_MMAP_THRESHOLD_": "65536"}
    if processes == 1:
        command = [sys.executable, __file__, *passthrough]
    else:
        accelerate = Path(sys.executable).with_name("accelerate")
        command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
                   __file__, *passthrough]
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode:
        raise SystemExit(f"setting {processes} process(es), K={partitions} failed:\n{result.stderr[-4000:]}")
    ranks = [json.loads(Path(f"{record}-rank{r}.json").read_text()) for r in range(processes)]
    assert all(r["num_processes"] == processes for r in ranks), ranks
    return {"processes": processes, "partitions": partitions, "passes": 2 * partitions,
            "wall_seconds_with_start": time.perf_counter() - start,
            "fit_seconds": max(r["seconds"] for r in ranks), "fit_cpu_seconds": sum(r["cpu_seconds"] for r in ranks),
            "per_process": ranks}


def expected_accumulators(args) -> dict:
    """Accumulator bytes (float64) of the largest group / owned share, from the partition functions."""
    import torch

    from hub_msif.factors.architectures import find_modules
    from hub_msif.factors.partition import accumulator_elements, group_loads, module_groups, module_owners
    from hub_msif.toy.examples import tiny_model

    with torch.device("meta"):
        model = tiny_model("gpt_neox", vocab_size=args.vocab, hidden=args.hidden, layers=args.layers,
                           heads=args.heads, ffn=args.ffn)
    specs = find_modules(model)
    out = {"all_modules_mib": sum(accumulator_elements(s) for s in specs) * 8 / 2**20}
    for _, k in SETTINGS:
        out[f"largest_group_k{k}_mib"] = max(group_loads(specs, module_groups(specs, k))) * 8 / 2**20
    owners = module_owners(specs, 2)
    out["owned_by_rank_mib"] = [sum(accumulator_elements(s) for s in specs if owners[s.name] == r) * 8 / 2**20
                                for r in (0, 1)]
    return out


def planned(args, processes: int, partitions: int) -> list[float]:
    """Each rank's planned peak less the model weights, MiB (what ``fit_increase_mib`` measures)."""
    import torch

    from hub_msif.factors.fit import FitConfig
    from hub_msif.factors.memory_plan import plan_fit
    from hub_msif.toy.examples import tiny_model

    with torch.device("meta"):
        model = tiny_model("gpt_neox", vocab_size=args.vocab, hidden=args.hidden, layers=args.layers,
                           heads=args.heads, ffn=args.ffn, dtype=torch.float32, max_positions=max(256, args.seq_len))
    plan = plan_fit(model, FitConfig(batch_size=args.batch_size, module_partitions=partitions),
                    num_processes=processes, max_length=args.seq_len)
    return [(p.peak_bytes - plan.model_bytes) / 2**20 for p in plan.processes]


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    from bench.common import machine_info

    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for processes, partitions in SETTINGS:
            run = run_setting(args, processes, partitions, Path(folder))
            run["planned_increase_mib"] = planned(args, processes, partitions)
            runs.append(run)
            increases = ", ".join(f"{p['fit_increase_mib']:.1f}" for p in run["per_process"])
            peaks = ", ".join(f"{p['fit_peak_mib']:.0f}" for p in run["per_process"])
            print(f"{processes} process(es), K={partitions}: fit {run['fit_seconds']:.1f}s "
                  f"(CPU {run['fit_cpu_seconds']:.1f}s, all processes), passes {run['passes']}, "
                  f"fit increase per process {increases} MiB (plan "
                  f"{', '.join(f'{x:.1f}' for x in run['planned_increase_mib'])}), peak {peaks} MiB", flush=True)
    base = runs[0]
    ratios = {f"p{r['processes']}_k{r['partitions']}": {
        "fit_increase_over_k1": max(p["fit_increase_mib"] for p in r["per_process"])
        / max(p["fit_increase_mib"] for p in base["per_process"]),
        "planned_increase_over_k1": max(r["planned_increase_mib"]) / max(base["planned_increase_mib"]),
        "time_over_k1": r["fit_seconds"] / base["fit_seconds"],
        "cpu_time_over_k1": r["fit_cpu_seconds"] / base["fit_cpu_seconds"]} for r in runs}
    report = {"command": "python -m bench.fit_memory " + " ".join(argv if argv is not None else sys.argv[1:]),
              "config": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
              "machine": machine_info(), "accumulators": expected_accumulators(args), "runs": runs, "ratios": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(ratios, indent=2))


if __name__ == "__main__":
    main()
