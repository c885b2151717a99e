"""How close low-rank queries score to full-rank ones, by query rank (docs/design.md, "Low-rank queries").

On the demo's fact world (``hub-msif demo`` builds it in ``~/.cache/hub_msif/demo``; the test
fixture ``fact_world`` uses the same cache): the first ``--queries`` held-out questions score the
first ``--documents`` pre-training documents under MS-IF (relative damping 0.1 and 1e-3), SS-IF
(0.1) and GDP, at full rank and at each ``--ranks`` value. Reports, per method and rank, the
minimum and mean over queries of the Spearman correlation with the full-rank scores, the overlap
of the top 10, and the query memory per query as a share of the model's parameter bytes.
``--plain`` truncates in the plain Frobenius norm instead of the candidates' metric, for
comparison. Writes ``bench/out/query_rank_accuracy.json`` (``--out``). Run with
``OMP_NUM_THREADS=1 .venv/bin/python -m bench.query_rank_accuracy [--plain]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from scipy.stats import spearmanr

from hub_msif.attribution.attributor import Attributor
from hub_msif.attribution.scoring import (
    LowRankQueries,
    per_example_gradients,
    precondition_queries,
    score_candidates,
    truncate,
)
from hub_msif.toy.demo import default_cache, prepare

SETTINGS = (("ms-if", 0.1), ("ms-if", 1e-3), ("ss-if", 0.1), ("gdp", None))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=8)
    parser.add_argument("--documents", type=int, default=200)
    parser.add_argument("--ranks", default="4,8,16,32,48,64")
    parser.add_argument("--plain", action="store_true",
                        help="truncate in the plain Frobenius norm instead of the candidates' metric (for comparison)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "query_rank_accuracy.json"))
    args = parser.parse_args(argv)
    ranks = [int(r) for r in args.ranks.split(",")]
    torch.set_num_threads(1)
    artifacts = prepare(default_cache())
    world = artifacts["world"]
    models = artifacts["models"]
    att = Attributor(artifacts["factors"], str(models / "pretrained"), str(models / "finetuned"))
    queries = [att.query_sequence(q.prompt, q.answer) for q in world.queries[: args.queries]]
    candidates = [att.document_sequence(d["text"]) for d in world.documents[: args.documents]]
    grads = per_example_gradients(att.models["finetuned"], att.specs, queries, att.pad_id)
    parameter_bytes = sum(p.numel() * p.element_size() for p in att.models["pretrained"].parameters())
    report = {"setup": {"truncation": "plain" if args.plain else "metric", "queries": len(queries), "documents": len(candidates), "parameter_bytes": parameter_bytes,
                        "modules": {s.name: [s.d_out, s.d_in] for s in att.specs}}, "results": {}}
    for method, damping in SETTINGS:
        key = f"{method}@{damping:g}" if damping is not None else method
        model = att.models["finetuned" if method == "ss-if" else "pretrained"]
        args_ = (method, att.factors["finetuned"], att.factors["pretrained"], damping or 0.1)
        full = score_candidates(model, att.specs, precondition_queries(grads, *args_), candidates, att.pad_id).total
        rows = {}
        for rank in ranks:
            if args.plain:
                dense = precondition_queries(grads, *args_)
                factors = {name: truncate(w, rank) for name, w in dense.items()}
                low_rank = LowRankQueries({n: f[0] for n, f in factors.items()}, {n: f[1] for n, f in factors.items()})
            else:
                low_rank = precondition_queries(grads, *args_, rank=rank)
            scores = score_candidates(model, att.specs, low_rank, candidates, att.pad_id).total
            rho = [float(spearmanr(full[:, q], scores[:, q])[0]) for q in range(full.shape[1])]
            top = [len(set(full[:, q].topk(10).indices.tolist()) & set(scores[:, q].topk(10).indices.tolist())) / 10
                   for q in range(full.shape[1])]
            rows[rank] = {"spearman_min": min(rho), "spearman_mean": statistics.fmean(rho),
                          "top10_overlap_mean": statistics.fmean(top),
                          "query_bytes_over_parameter_bytes": low_rank.bytes_per_query() / parameter_bytes}
            print(f"{key:<12} rank {rank:>4}: Spearman min {min(rho):.4f} mean {statistics.fmean(rho):.4f}, "
                  f"top-10 overlap {statistics.fmean(top):.2f}, query memory "
                  f"{100 * low_rank.bytes_per_query() / parameter_bytes:.2f}% of the parameters", flush=True)
        report["results"][key] = rows
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
