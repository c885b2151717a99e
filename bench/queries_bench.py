"""``hub-msif attribute --queries``: the cost per query of many queries in one run, on the demo pair.

Runs the command line as a process twice on the demo's fact world (cached factors and index, 100
retrieved candidates per query): with the first query only, and with all ``--queries`` (default
100: the 45 held-out questions with their answers generated, then fine-tuning prompts with their
answers given). The cost per query after the first is ``(T_all - T_1) / (N - 1)``; target: at most
0.5 s (issue 10). For comparison, in one process with the models loaded: ``attribute`` once per
query against ``attribute_many`` over all of them.

    PYTHONPATH=. OMP_NUM_THREADS=1 .venv/bin/python -m bench.queries_bench [--queries 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_SECONDS_PER_QUERY = 0.5


def _queries(world, n: int) -> list[dict]:
    rows = [{"id": f"held-out-{i}", "prompt": q.prompt} for i, q in enumerate(world.queries)]
    rows += [{"id": f"fine-tune-{i}", "prompt": r["prompt"], "answer": r["response"]} for i, r in enumerate(world.finetune)]
    if len(rows) < n:
        raise SystemExit(f"the fact world has only {len(rows)} prompts")
    return rows[:n]


def _run(argv: list[str], threads: int) -> tuple[float, list[dict]]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "hub_msif", *argv], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"hub-msif {' '.join(argv)} failed:\n{result.stderr}")
    return seconds, [json.loads(line) for line in result.stdout.splitlines()]


def main() -> None:
    from hub_msif.toy.demo import default_cache, prepare

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(default_cache()))
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="bench/out/queries_bench.json")
    args = parser.parse_args()
    artifacts = prepare(args.cache)
    rows = _queries(artifacts["world"], args.queries)
    common = ["attribute", "--factors", str(artifacts["factors"]), "--index", str(artifacts["index_folder"]),
              "--candidates", str(args.candidates), "--top", "10", "--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one.jsonl", Path(tmp) / "many.jsonl"
        one.write_text(json.dumps(rows[0]) + "\n")
        many.write_text("".join(json.dumps(r) + "\n" for r in rows))
        _run([*common, "--queries", str(one)], args.threads)  # warm the file cache: both runs start alike
        t_one, _ = _run([*common, "--queries", str(one)], args.threads)
        t_many, results = _run([*common, "--queries", str(many)], args.threads)
    assert [r["id"] for r in results] == [r["id"] for r in rows]
    per_query = (t_many - t_one) / (len(rows) - 1)
    print(f"hub-msif attribute --queries, {args.candidates} candidates per query, --threads {args.threads}:")
    print(f"  1 query: {t_one:.1f}s   {len(rows)} queries: {t_many:.1f}s   "
          f"per query after the first: {per_query:.3f}s (target <= {TARGET_SECONDS_PER_QUERY}s: "
          f"{'met' if per_query <= TARGET_SECONDS_PER_QUERY else 'MISSED'})")
    print(f"  {len(rows)} separate one-query runs would take about {len(rows) * t_one:.0f}s "
          f"({len(rows) * t_one / t_many:.1f}x the one run)")

    import torch

    from bench.common import machine_info
    from hub_msif.attribution.attributor import Attributor

    torch.set_num_threads(args.threads)
    attributor = Attributor(artifacts["factors"], index=artifacts["index"])
    queries = [(r["prompt"], r.get("answer")) for r in rows]
    attributor.attribute(*queries[0], candidates=args.candidates)  # warm-up
    started = time.perf_counter()
    for prompt, answer in queries:
        attributor.attribute(prompt, answer, candidates=args.candidates)
    t_loop = time.perf_counter() - started
    started = time.perf_counter()
    attributor.attribute_many(queries, candidates=args.candidates)
    t_batch = time.perf_counter() - started
    print(f"  in one process: attribute per query {t_loop / len(rows):.3f}s, attribute_many "
          f"{t_batch / len(rows):.3f}s per query ({t_loop / t_batch:.1f}x faster)")
    out = {"queries": len(rows), "candidates": args.candidates, "threads": args.threads,
           "cli_seconds_one_query": t_one, "cli_seconds_all_queries": t_many,
           "cli_seconds_per_query_after_first": per_query, "target_seconds_per_query": TARGET_SECONDS_PER_QUERY,
           "target_met": per_query <= TARGET_SECONDS_PER_QUERY,
           "in_process_seconds_per_query_attribute": t_loop / len(rows),
           "in_process_seconds_per_query_attribute_many": t_batch / len(rows),
           "machine": machine_info()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
