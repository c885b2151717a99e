"""Fact tracing on the demo's fact world: MRR and Recall@10 of each method over damping values.

Reranks, for every held-out question, the 100 documents the index retrieves for the question and
its true answer, and reports MRR (1 / rank of the first proponent) and Recall@10 (share of the
proponents in the top 10). Uses (and if needed builds) the demo's cached artifacts.

    .venv/bin/python -m bench.fact_tracing_demo [--cache DIR] [--candidates 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hub_msif.attribution.attributor import Attributor
from hub_msif.toy.demo import default_cache, prepare

SWEEP = [("ms-if", [1e-4, 1e-3, 1e-2, 1e-1, 1.0]), ("ss-if", [1e-3, 1e-1]), ("gdp", [None]), ("repsim", [None]),
         ("bm25", [None])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default=str(default_cache()))
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--out", default="bench/out/fact_tracing_demo.json")
    args = parser.parse_args()
    artifacts = prepare(args.cache)
    world, index = artifacts["world"], artifacts["index"]
    attributor = Attributor(artifacts["factors"], index=index)
    candidates = {q.prompt: attributor.candidates(q.prompt, q.answer, args.candidates) for q in world.queries}
    coverage = sum(any(d["id"] in q.proponents for d in candidates[q.prompt]) for q in world.queries) / len(world.queries)
    print(f"{len(world.queries)} questions, {args.candidates} retrieved candidates each; "
          f"a proponent is among them for {coverage:.0%}")
    print(f"{'method':<8} {'damping (relative)':>18} {'MRR':>6} {'R@10':>6} {'seconds':>8}")
    rows = []
    for method, dampings in SWEEP:
        for damping in dampings:
            started = time.perf_counter()
            mrr = recall = 0.0
            for q in world.queries:
                docs = candidates[q.prompt]
                total, _ = attributor.score([(q.prompt, q.answer)], [d["text"] for d in docs], method,
                                            damping if damping is not None else 0.1)
                order = torch.argsort(total[:, 0], descending=True).tolist()
                ranks = [k + 1 for k, i in enumerate(order) if docs[i]["id"] in q.proponents]
                mrr += 1 / ranks[0] if ranks else 0.0
                recall += sum(r <= 10 for r in ranks) / len(q.proponents)
            n = len(world.queries)
            row = {"method": method, "damping": damping, "mrr": mrr / n, "recall_at_10": recall / n,
                   "seconds": time.perf_counter() - started}
            rows.append(row)
            shown = "-" if damping is None else f"{damping:g}"
            print(f"{method:<8} {shown:>18} {row['mrr']:>6.3f} {row['recall_at_10']:>6.3f} {row['seconds']:>8.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"candidates": args.candidates, "coverage": coverage, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
