"""Fact tracing (paper section 5.3) on the toy fact world: MRR and Recall@10 over damping values.

For each trial t (seed t): a new fact world (``generate(seed=t)``), a newly trained model pair
(``train_pair`` with the demo's settings) and both stages' factors fitted as the demo does, all
cached under ``--cache/trial-<t>``. For each held-out query (prompt, true answer) the candidate
set is: its proponents + the BM25 top 100 of the whole pre-training corpus (query = prompt +
answer) + 100 random documents containing the answer word (all if fewer) + 100 random documents,
deduplicated (seeded). The candidates are reranked with MS-IF, SS-IF (relative damping sweep),
GDP, RepSim and BM25; MRR (1 / rank of the first proponent) and Recall@10 (share of proponents in
the top 10) are averaged over queries, then mean and std over trials are reported.

Speed: gradient and RepSim scores of a document for a query do not depend on the other
candidates, so each trial scores every pre-training document once against all queries x all
dampings (MS-IF + GDP columns in one pass under the pre-trained model, SS-IF columns in one pass
under the fine-tuned model), then ranks within each query's own candidate set. BM25 is computed
per query over its candidate set, exactly as ``Attributor.score`` does. A check compares the fast
path with ``Attributor.score`` on one query.

    .venv/bin/python -m bench.fact_tracing [--trials 3] [--dampings 1e-4,1e-3,1e-2,1e-1,1,10]
        [--max-queries N] [--cache DIR] [--out bench/out/fact_tracing.json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from pathlib import Path

import torch

from hub_msif.artifacts.local_folders import cache_root
from hub_msif.attribution.attributor import Attributor
from hub_msif.attribution.baselines import bm25_scores, words
from hub_msif.toy.demo import fitted_factors, trained_pair
from hub_msif.toy.factworld import generate, save_world

DAMPED = ("ms-if", "ss-if")
UNDAMPED = ("gdp", "repsim", "bm25")
QUERY_CHUNK = 8  # queries whose weights (x dampings) are scored together in one pass


def trial_artifacts(cache: Path, seed: int) -> dict:
    """World, model pair (trained with the demo's settings, seed = trial) and factors, cached."""
    folder = cache / f"trial-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    world = generate(seed=seed)
    paths = save_world(world, folder / "world")
    models = trained_pair(world, folder, seed=seed)
    started = time.perf_counter()
    factors = fitted_factors(models, paths, world, folder)  # reuses fresh factors, refits stale ones
    training = json.loads((models / "training.json").read_text())
    return {"world": world, "factors": factors, "training": training, "factor_seconds": time.perf_counter() - started}


def candidate_sets(world, seed: int, queries, k_bm25: int, k_answer: int, k_random: int) -> list[list[int]]:
    """Per query, indices into ``world.documents``: proponents + BM25 top k + answer-word docs + random docs."""
    texts = [d["text"] for d in world.documents]
    index_of = {d["id"]: i for i, d in enumerate(world.documents)}
    doc_words = [set(words(t)) for t in texts]
    sets = []
    for qi, q in enumerate(queries):
        rng = random.Random(f"{seed}-{qi}-{q.fact_id}")
        chosen = [index_of[p] for p in q.proponents]
        bm25 = bm25_scores(f"{q.prompt} {q.answer}", texts)
        chosen += sorted(range(len(texts)), key=lambda i: -bm25[i])[:k_bm25]
        sharing = [i for i, w in enumerate(doc_words) if q.answer in w]
        chosen += rng.sample(sharing, min(k_answer, len(sharing)))
        chosen += rng.sample(range(len(texts)), min(k_random, len(texts)))
        sets.append(list(dict.fromkeys(chosen)))  # deduplicated, first occurrence kept
    return sets


def all_scores(att: Attributor, world, queries, dampings: list[float]) -> dict[tuple, torch.Tensor]:
    """``{(method, damping): [D, Q]}`` scores of every pre-training document for every query
    (``Attributor.score_methods``: one candidate pass per model for all methods and dampings)."""
    texts = [d["text"] for d in world.documents]
    out: dict[tuple, list[torch.Tensor]] = {}
    for start in range(0, len(queries), QUERY_CHUNK):
        chunk = [(q.prompt, q.answer) for q in queries[start : start + QUERY_CHUNK]]
        for scores in att.score_methods(chunk, texts, ["ms-if", "ss-if", "gdp", "repsim"], dampings, batch_size=16):
            out.setdefault((scores.method, scores.damping), []).append(scores.total)
    return {k: torch.cat(v, dim=1) for k, v in out.items()}


def metrics(scores: list[float], cand_ids: list[str], proponents: list[str]) -> tuple[float, float]:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep candidate order
    ranks = [r + 1 for r, i in enumerate(order) if cand_ids[i] in proponents]
    return (1 / ranks[0] if ranks else 0.0), sum(r <= 10 for r in ranks) / len(proponents)


def run_trial(args, seed: int, dampings: list[float]) -> dict:
    started = time.perf_counter()
    art = trial_artifacts(Path(args.cache), seed)
    world = art["world"]
    prepared = time.perf_counter() - started
    queries = world.queries[: args.max_queries] if args.max_queries else world.queries
    att = Attributor(art["factors"])
    sets = candidate_sets(world, seed, queries, 100, 100, 100)
    t0 = time.perf_counter()
    scores = all_scores(att, world, queries, dampings)
    scoring = time.perf_counter() - t0
    # Check the fast path against the public API on the first query.
    q, cand = queries[0], sets[0]
    texts = [world.documents[i]["text"] for i in cand]
    ref, _ = att.score([(q.prompt, q.answer)], texts, "ms-if", dampings[0], True)
    fast = scores[("ms-if", dampings[0])][cand, 0]
    err = float((ref[:, 0].to(fast.dtype) - fast).abs().max() / fast.abs().max())
    assert err < 1e-3, f"fast path differs from Attributor.score by {err:.2e} (relative)"
    per_key: dict[tuple, list[tuple[float, float]]] = {}
    for qi, (q, cand) in enumerate(zip(queries, sets)):
        ids = [world.documents[i]["id"] for i in cand]
        for key, s in scores.items():
            per_key.setdefault(key, []).append(metrics(s[cand, qi].tolist(), ids, q.proponents))
        bm = bm25_scores(f"{q.prompt} {q.answer}", [world.documents[i]["text"] for i in cand])
        per_key.setdefault(("bm25", None), []).append(metrics(bm, ids, q.proponents))
    results = {f"{m}|{'' if d is None else d}": {"mrr": statistics.fmean(r[0] for r in v),
                                                  "recall_at_10": statistics.fmean(r[1] for r in v)}
               for (m, d), v in per_key.items()}
    sizes = [len(c) for c in sets]
    info = {"seed": seed, "queries": len(queries), "documents": len(world.documents),
            "candidates": {"mean": statistics.fmean(sizes), "min": min(sizes), "max": max(sizes)},
            "test_accuracy": art["training"]["test_accuracy"], "finetune_accuracy": art["training"]["finetune_accuracy"],
            "fast_path_check_rel_err": err, "seconds": {"prepare": prepared, "scoring": scoring,
                                                        "total": time.perf_counter() - started}}
    print(f"trial {seed}: {len(world.documents)} documents, {len(queries)} queries, candidates per query "
          f"mean {info['candidates']['mean']:.1f} (min {min(sizes)}, max {max(sizes)}); fine-tuned model answers "
          f"{info['test_accuracy']:.0%} of held-out queries ({info['finetune_accuracy']:.0%} of fine-tuning ones); "
          f"prepare {prepared:.0f}s, scoring {scoring:.0f}s; check vs Attributor.score rel. err {err:.1e}", flush=True)
    return {"info": info, "results": results}


def aggregate(trials: list[dict], dampings: list[float]) -> list[dict]:
    rows = []
    keys = [(m, d) for m in DAMPED for d in dampings] + [(m, None) for m in UNDAMPED]
    for m, d in keys:
        key = f"{m}|{'' if d is None else d}"
        row = {"method": m, "damping": d}
        for metric in ("mrr", "recall_at_10"):
            values = [t["results"][key][metric] for t in trials]
            row[metric] = statistics.fmean(values)
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            row[f"{metric}_per_trial"] = values
        rows.append(row)
    return rows


def plot(rows: list[dict], dampings: list[float], path: Path, title: str) -> None:
    """MRR against relative damping (log x): one line per damped method (error bars: std over trials),
    a dashed horizontal line per method without damping; written as a PNG to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # no display: render to files only
    import matplotlib.pyplot as plt

    labels = {"ms-if": "MS-IF", "ss-if": "SS-IF", "gdp": "GDP", "repsim": "RepSim", "bm25": "BM25"}
    colours = dict(zip(DAMPED + UNDAMPED, plt.get_cmap("tab10").colors, strict=False))
    fig, ax = plt.subplots(figsize=(9, 5.6), dpi=100, layout="constrained")
    for method in DAMPED:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["damping"])
        if mine:
            ax.errorbar([r["damping"] for r in mine], [r["mrr"] for r in mine], yerr=[r["mrr_std"] for r in mine],
                        color=colours[method], marker="o", linewidth=2, capsize=3, label=labels[method])
    for method in UNDAMPED:
        mine = [r for r in rows if r["method"] == method]
        if mine:
            ax.axhline(mine[0]["mrr"], color=colours[method], linestyle="--", linewidth=1.5, label=labels[method])
    ax.set_xscale("log")
    # A quarter decade of room on each side, so end points and error bars stay clear of the frame.
    ax.set_xlim(10 ** (math.log10(min(dampings)) - 0.25), 10 ** (math.log10(max(dampings)) + 0.25))
    top = max(r["mrr"] + r["mrr_std"] for r in rows)
    ax.set_ylim(0, min(1.05, max(0.05, top * 1.1)))
    ax.set_xlabel("damping (relative to mean eigenvalue)")
    ax.set_ylabel("MRR")
    ax.set_title(title, loc="left")
    ax.grid(True, which="major", color="0.9")
    handles, names = ax.get_legend_handles_labels()  # errorbar entries come last; list methods in table order
    order = sorted(range(len(names)), key=lambda i: list(labels.values()).index(names[i]))
    ax.legend([handles[i] for i in order], [names[i] for i in order], loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--dampings", default="1e-4,1e-3,1e-2,1e-1,1,10", help="relative damping values, comma-separated")
    parser.add_argument("--max-queries", type=int, default=0, help="0 = all held-out queries")
    parser.add_argument("--cache", default=str(cache_root() / "fact_tracing"))
    parser.add_argument("--out", default="bench/out/fact_tracing.json")
    parser.add_argument("--plot", default="bench/out/fact_tracing_mrr.png")
    args = parser.parse_args()
    torch.set_num_threads(2)
    dampings = [float(x) for x in args.dampings.split(",")]
    started = time.perf_counter()
    trials = [run_trial(args, t, dampings) for t in range(args.trials)]
    rows = aggregate(trials, dampings)
    print(f"\nmean (std) over {len(trials)} trial(s)")
    print(f"{'method':<8} {'damping':>8} {'MRR':>15} {'Recall@10':>15}")
    for r in rows:
        shown = "-" if r["damping"] is None else f"{r['damping']:g}"
        print(f"{r['method']:<8} {shown:>8} {r['mrr']:>8.3f} ({r['mrr_std']:.3f}) "
              f"{r['recall_at_10']:>8.3f} ({r['recall_at_10_std']:.3f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"trials": [t["info"] for t in trials], "dampings": dampings,
                                          "per_trial": [t["results"] for t in trials], "rows": rows,
                                          "seconds": time.perf_counter() - started}, indent=2))
    plot(rows, dampings, Path(args.plot), f"Fact tracing MRR, mean over {len(trials)} trial(s) (bars: std)")
    print(f"\nwrote {args.out} and {args.plot} in {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
