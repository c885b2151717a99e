"""The gradient index (issue 18; docs/design.md, "Gradient index"): recall, MRR, bytes, latency, build cost.

Four parts, one JSON (``bench/out/gradindex.json``):

1. **Fact worlds** (the demo's world and the harder world of ``bench.hardworld``): the pair trained
   with the demo's settings and both stages fitted (cached), a gradient index of every pre-training
   document at the default compression, and each held-out query (prompt, true answer):
   - exact whole-corpus MS-IF (every document scored);
   - recall@10: the share of the exact top 10 in the index's top 100;
   - MRR (1 / rank of the first proponent; 0 when the method's list misses every proponent) of exact
     whole-corpus MS-IF, of two-stage (the index's top 100 rescored exactly) and of embedding
     candidates (the sentence-embedding index's top 100 rescored exactly).
2. **Build cost**: the index build of a world's corpus against one plain forward+backward pass over the
   same documents under the same model, side by side in this run.
3. **Latency at 1M documents**: synthetic Gaussian vectors of the default dimension (the real
   vectors' dimension; their values do not change a flat scan's time), one query's top-100 search,
   exact (flat) and with the ``ivf,pq`` option (and its recall of the flat top 100).
4. **Scale on paper**: bytes per document at the default (the manifest's vector, norm and row bytes)
   against a Pythia-410m-shaped and a Llama-3-8B-shaped model's size, and the Pile (210M documents,
   about 300B tokens) on 8 GPUs: bytes, and build time from the pass's FLOPs (forward 2N, input-only
   backward 2N per token, N parameters from the config on the meta device) at a stated GPU throughput.

    .venv/bin/python -m bench.gradindex_bench [--worlds factworld,hardworld] [--sizes 1000000]
        [--out bench/out/gradindex.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from bench.common import ROOT, machine_info  # noqa: E402

PILE_DOCUMENTS = 210_000_000  # the figure
PILE_TOKENS = 300e9  # one epoch of the Pile in GPT-NeoX tokens (the Pythia paper's 300B-token runs)
GPU_PEAK_FLOPS = 989e12  # H100 SXM dense bf16
GPU_UTILISATION = 0.4  # an assumed model-FLOPs utilisation, stated with the result
GPUS = 8
# Compressions compared with the default on each world's documents (docs/design.md, "Gradient index").
SWEEP = ({"balance": 1.0}, {"balance": 0.0}, {"k": 32, "dims": 2000}, {"k": 64, "dims": 4000, "balance": 1.0},
         {"k": 64, "dims": 16000, "balance": 1.0})


def passes_side_by_side(model, specs, projection, sequences, pad_id: int, batch_size: int, rounds: int = 3
                        ) -> tuple[float, float]:
    """Seconds of a plain forward+backward (parameter gradients) and of the build's pass (projected
    vectors) over the same documents, batches and model: alternated, the fastest of ``rounds`` of each
    (the machine is shared; the first build pass also forms the projection's operators)."""
    from bench.common import plain_pass
    from hub_msif.attribution.gradient_projection import candidate_vectors

    pass_times, vector_times = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        plain_pass(model, sequences, batch_size)
        pass_times.append(time.perf_counter() - started)
        for p in model.parameters():
            p.requires_grad_(False)
        started = time.perf_counter()
        candidate_vectors(model, specs, projection, sequences, pad_id, batch_size)
        vector_times.append(time.perf_counter() - started)
    return min(pass_times), min(vector_times)


# --- 2b. build cost at a real model's width ------------------------------------------------------

def shaped_throughput(layers: int, documents: int, length: int, batch_size: int, rounds: int = 3) -> dict:
    """The build's pass against a plain forward+backward on a GPT-NeoX of Pythia-410m's width (hidden 1024,
    16 heads, ffn 4096; ``layers`` layers, vocabulary 4096 so that the head's share of the work is about the
    real model's), random weights and random factors of the right shapes (the projection's cost does not
    depend on their values), random tokens. Alternated rounds, the fastest of each."""
    import torch

    from bench.common import make_sequences
    from hub_msif.attribution.gradient_projection import GradientProjection
    from hub_msif.factors.architectures import find_modules
    from hub_msif.factors.ekfac import ModuleFactors
    from hub_msif.factors.storage import StageFactors
    from hub_msif.toy.examples import tiny_model

    vocab = 4096
    model = tiny_model("gpt_neox", vocab_size=vocab, hidden=1024, layers=layers, heads=16, ffn=4096,
                       max_positions=max(512, length))
    specs = find_modules(model)
    generator = torch.Generator().manual_seed(0)

    def orthogonal(*shape):
        return torch.linalg.qr(torch.randn(*shape, generator=generator)).Q

    modules = {}
    for spec in specs:
        blocks, size = spec.num_blocks, spec.block_size
        modules[spec.name] = ModuleFactors(spec, orthogonal(spec.d_in, spec.d_in), orthogonal(blocks, size, size),
                                           torch.rand(blocks, size, spec.d_in, generator=generator) + 1e-3,
                                           torch.rand(spec.d_in, generator=generator), torch.rand(blocks, size, generator=generator))
    projection = GradientProjection(StageFactors("pretrained", {}, modules))
    sequences = make_sequences(documents, length, vocab)
    pass_seconds, vectors_seconds = passes_side_by_side(model, specs, projection, sequences, 0, batch_size, rounds)
    row = {"model": f"GPT-NeoX, Pythia-410m width, {layers} layers, vocabulary {vocab}", "documents": documents,
           "tokens": length, "batch_size": batch_size, "plain_pass_seconds": pass_seconds,
           "vectors_pass_seconds": vectors_seconds, "ratio": pass_seconds / vectors_seconds,
           "modules": len(specs), "dims": projection.dims}
    print(f"{row['model']}: {documents} x {length} tokens, build pass {row['vectors_pass_seconds']:.1f} s vs plain "
          f"pass {row['plain_pass_seconds']:.1f} s (throughput ratio {row['ratio']:.2f})", flush=True)
    return row


# --- 3. latency at scale -------------------------------------------------------------------------

def latency(size: int, dims: int, queries: int, top: int, threads: int) -> dict:
    """One query's top-``top`` search over ``size`` synthetic documents through ``GradientIndex.search``:
    flat, then ivf,pq (with its recall of the flat top ``top``)."""
    import faiss

    from hub_msif.attribution.gradient_index import GradientIndex

    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(0)
    rows = np.empty((size, dims), dtype=np.float16)
    for start in range(0, size, 100_000):  # in blocks: one 1M x 1000 float64 draw would take 8 GB
        block = rng.standard_normal((min(100_000, size - start), dims), dtype=np.float32)
        rows[start:start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    norms = rng.uniform(0.5, 2.0, size).astype(np.float32)
    asked = rng.standard_normal((queries, dims), dtype=np.float32)
    documents = [{"id": "", "text": ""}] * size  # one shared dict: only the count matters here
    row: dict = {"documents": size, "dims": dims, "top": top, "queries": queries, "threads": threads}
    truth = None
    for ann in ("flat", "ivf,pq"):
        index = GradientIndex(documents, rows, norms, {"num_documents": size, "projection": {"dims": dims}}, ann=ann)
        started = time.perf_counter()
        index.faiss_index()
        built = time.perf_counter() - started
        index.search(asked[:1], top)  # warm-up
        times, found = [], []
        for q in asked:
            started = time.perf_counter()
            hits = index.search(q[None, :], top)[0]
            times.append(time.perf_counter() - started)
            found.append({i for i, _ in hits})
        entry = {"build_seconds": built, "query_median_ms": 1000 * statistics.median(times),
                 "query_p90_ms": 1000 * float(np.percentile(times, 90)), "parameters": index.search_parameters()}
        if truth is None:
            truth = found
        else:
            entry["recall_at_top_of_flat"] = float(np.mean([len(a & b) / top for a, b in zip(found, truth)]))
        row[ann] = entry
        print(f"{size:>9} x {dims} {ann:>7}: index built in {built:7.1f} s, one query top-{top}: median "
              f"{entry['query_median_ms']:.1f} ms" + (f", recall@{top} of flat {entry['recall_at_top_of_flat']:.3f}"
                                                      if "recall_at_top_of_flat" in entry else ""), flush=True)
        del index
    return row


# --- 4. scale on paper ---------------------------------------------------------------------------

def parameters(config: dict) -> int:
    """The number of parameters of a model built from ``config`` on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def on_paper(bytes_per_document: int) -> list[dict]:
    from bench.scale import CONFIGS

    rows = []
    for model_id in ("EleutherAI/pythia-410m", "meta-llama/Meta-Llama-3-8B"):
        n = parameters(CONFIGS[model_id])
        flops = 4 * n * PILE_TOKENS
        seconds = flops / (GPUS * GPU_PEAK_FLOPS * GPU_UTILISATION)
        rows.append({"model": model_id, "parameters": n, "model_bytes_bf16": 2 * n,
                     "bytes_per_document": bytes_per_document,
                     "document_bytes_over_model_bytes": bytes_per_document / (2 * n),
                     "pile_documents": PILE_DOCUMENTS, "pile_tokens": PILE_TOKENS,
                     "pile_index_bytes": PILE_DOCUMENTS * bytes_per_document,
                     "build_flops": flops, "gpus": GPUS, "gpu_peak_flops": GPU_PEAK_FLOPS,
                     "gpu_utilisation": GPU_UTILISATION, "build_hours": seconds / 3600})
        print(f"{model_id}: {n / 1e9:.2f}B parameters; the Pile: {PILE_DOCUMENTS * bytes_per_document / 1e9:.0f} GB "
              f"of index, build about {seconds / 3600:.0f} h on {GPUS} GPUs at {GPU_UTILISATION:.0%} of "
              f"{GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s")
    return rows


# --- 1 and 2. fact worlds ------------------------------------------------------------------------

def world_of(name: str):
    if name == "factworld":
        from hub_msif.toy.factworld import generate

        return generate(seed=0)
    if name == "hardworld":
        from bench.hardworld import generate_hard

        return generate_hard(seed=0, num_subjects=24, test_fraction=1 / 3)
    raise SystemExit(f"unknown world {name!r}: use factworld or hardworld")


def first_proponent(scores, rows: list[int], ids: list[str], proponents: list[str]) -> float:
    """1 / rank of the first proponent when ``rows`` are ranked by ``scores`` (0: none among them)."""
    order = sorted(rows, key=lambda r: -float(scores[r]))  # stable: ties keep the given order
    wanted = set(proponents)
    return next((1 / (rank + 1) for rank, r in enumerate(order) if ids[r] in wanted), 0.0)


def run_world(name: str, cache: Path, candidates: int, batch_size: int) -> dict:
    import torch

    from hub_msif.attribution.attributor import DEFAULT_DAMPING, Attributor
    from hub_msif.attribution.gradient_index import GradientIndex
    from hub_msif.attribution.gradient_index_build import build_gradindex
    from hub_msif.attribution.gradient_projection import GradientProjection, candidate_vectors
    from hub_msif.attribution.retrieval import DocumentIndex
    from hub_msif.attribution.scoring import per_example_gradients
    from hub_msif.data import CorpusSpec
    from hub_msif.toy.demo import default_cache, fitted_factors, prepare, trained_pair
    from hub_msif.toy.factworld import save_world

    folder = cache / name
    folder.mkdir(parents=True, exist_ok=True)
    if name == "factworld":  # the demo's world, pair, factors and embedding index, reused from its cache
        demo = prepare(default_cache())
        world, paths, factors, models, embedding_index = (demo[k] for k in ("world", "paths", "factors", "models",
                                                                              "index"))
    else:
        world = world_of(name)
        paths = save_world(world, folder / "world")
        models = trained_pair(world, folder)
        factors = fitted_factors(models, paths, world, folder)
        embedding_index = None
    att = Attributor(factors)
    texts = [d["text"] for d in world.documents]
    ids = [d["id"] for d in world.documents]
    queries = [(q.prompt, q.answer) for q in world.queries]

    # Build cost against one plain forward+backward over the same documents, side by side.
    out = folder / "gradindex"
    if out.exists():
        import shutil

        shutil.rmtree(out)
    started = time.perf_counter()
    build_gradindex(factors, CorpusSpec(data=str(paths["pretrain"]), max_length=att.max_length), out,
                    batch_size=batch_size, device="cpu", show_progress=False)
    build_seconds = time.perf_counter() - started
    sequences = [att.document_sequence(t) for t in texts]
    model = att.models["pretrained"]

    # Exact whole-corpus MS-IF, stage one of the index, the embedding's candidates.
    started = time.perf_counter()
    exact = torch.cat([att.score_methods(queries[i:i + 8], texts, ["ms-if"], [DEFAULT_DAMPING], batch_size=16)[0].total
                       for i in range(0, len(queries), 8)], dim=1).double()  # [D, Q]
    exact_seconds = time.perf_counter() - started
    index = GradientIndex.load(out)
    projection = GradientProjection.from_json(index.metadata["projection"], att.factors["pretrained"])
    grads = per_example_gradients(att.models["finetuned"], att.specs, [att.query_sequence(p, a) for p, a in queries],
                                  att.pad_id)
    started = time.perf_counter()
    vectors = projection.query_vectors(grads, att.factors["finetuned"], att.factors["pretrained"], DEFAULT_DAMPING, True)
    hits = index.search(vectors.float().numpy(), candidates)
    stage_one_ms = 1000 * (time.perf_counter() - started) / len(queries)
    pass_seconds, vectors_seconds = passes_side_by_side(model, att.specs, projection, sequences, att.pad_id, batch_size)
    approx = torch.from_numpy(index.vectors()).double() @ vectors.T.cpu()  # [D, Q]: every document's stage-one score
    if embedding_index is None:
        embedding_index = DocumentIndex.build(texts, ids)
    embedding = embedding_index.search([f"{p} {a}" for p, a in queries], candidates)
    near = [[i for i, _ in found] for found in embedding]
    result = {"documents": len(texts), "queries": len(queries), "candidates": candidates,
              "test_accuracy": json.loads((models / "training.json").read_text())["test_accuracy"],
              **quality(world, exact, [[i for i, _ in found] for found in hits], near, approx),
              "bytes_per_document": index_bytes(out) / len(texts),
              "projection": {k: v for k, v in index.metadata["projection"].items() if k != "k"},
              "seconds": {"build": build_seconds, "vectors_pass": vectors_seconds, "plain_pass": pass_seconds,
                          "exact_whole_corpus": exact_seconds, "stage_one_per_query_ms": stage_one_ms},
              "build_ratio_to_fwd_bwd": pass_seconds / vectors_seconds,
              "build_ratio_to_fwd_bwd_end_to_end": pass_seconds / build_seconds}
    # Other compressions, from the same pass (no index written): what recall costs in bytes.
    result["sweep"] = []
    for settings in SWEEP:
        other = GradientProjection(att.factors["pretrained"], **settings)
        cands = candidate_vectors(model, att.specs, other, sequences, att.pad_id, batch_size).double()
        scores = cands @ other.query_vectors(grads, att.factors["finetuned"], att.factors["pretrained"],
                                             DEFAULT_DAMPING, True).T.cpu()
        top = [scores[:, q].argsort(descending=True)[:candidates].tolist() for q in range(len(queries))]
        row = {"settings": settings, "dims": other.dims, "bytes_per_document": 2 * other.dims + 12,
               **quality(world, exact, top, near, scores)}
        row.pop("stage_one_vs_exact")
        result["sweep"].append(row)
        print(f"  {name} {settings}: {other.dims} dims, recall@10 {row['recall_at_10']:.3f}, "
              f"MRR two-stage {row['mrr']['two-stage']:.3f}", flush=True)
    print(f"{name}: {len(texts)} documents, {len(queries)} queries: recall@10 in top {candidates} "
          f"{result['recall_at_10']:.3f} (min {result['recall_at_10_min']:.1f}); MRR two-stage "
          f"{result['mrr']['two-stage']:.3f}, exact {result['mrr']['exact']:.3f}, embedding "
          f"{result['mrr']['embedding']:.3f}; {result['embedding_misses']['queries']} queries where the embedding "
          f"misses every proponent; vectors pass {vectors_seconds:.1f} s (build {build_seconds:.1f} s end to end) vs "
          f"plain pass {pass_seconds:.1f} s", flush=True)
    return result


def quality(world, exact, found: list[list[int]], near: list[list[int]], approx) -> dict:
    """Recall@10 of the exact top 10 in ``found`` (stage one's lists), and MRR of exact whole-corpus
    MS-IF, of two-stage (``found`` rescored exactly) and of embedding candidates (``near`` rescored)."""
    from bench.common import per_query_correlations

    ids = [d["id"] for d in world.documents]
    everything = list(range(len(ids)))
    rows = []
    for q, query in enumerate(world.queries):
        top10 = exact[:, q].argsort(descending=True)[:10].tolist()
        rows.append({"recall_at_10": len(set(top10) & set(found[q])) / 10,
                     "exact": first_proponent(exact[:, q], everything, ids, query.proponents),
                     "two-stage": first_proponent(exact[:, q], found[q], ids, query.proponents),
                     "embedding": first_proponent(exact[:, q], near[q], ids, query.proponents),
                     "embedding_misses": not set(query.proponents) & {ids[i] for i in near[q]}})
    missed = [r for r in rows if r["embedding_misses"]]
    methods = ("two-stage", "exact", "embedding")
    return {"recall_at_10": statistics.fmean(r["recall_at_10"] for r in rows),
            "recall_at_10_min": min(r["recall_at_10"] for r in rows),
            "mrr": {m: statistics.fmean(r[m] for r in rows) for m in methods},
            "embedding_misses": {"queries": len(missed),
                                 **({m: statistics.fmean(r[m] for r in missed) for m in methods} if missed else {})},
            "stage_one_vs_exact": {k: v for k, v in per_query_correlations(approx.T, exact.T).items()
                                   if not k.endswith("per_query")}}


def index_bytes(folder: Path) -> int:
    """Bytes of the shards (vectors, norms, row numbers) of a built index."""
    return sum(p.stat().st_size for p in (folder / "shards").glob("*.safetensors"))


def main(argv=None) -> int:
    from hub_msif.artifacts.local_folders import cache_root
    from hub_msif.attribution.gradient_defaults import DEFAULT_DIMS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", default="factworld,hardworld")
    parser.add_argument("--sizes", default="1000000", help="comma-separated synthetic corpus sizes for latency")
    parser.add_argument("--queries", type=int, default=20, help="synthetic queries timed per size")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--shape-layers", type=int, default=2, help="layers of the Pythia-410m-wide model timed (0: skip)")
    parser.add_argument("--cache", default=None, help="default: $HUB_MSIF_CACHE/bench/gradindex")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "gradindex.json"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    cache = Path(args.cache) if args.cache else cache_root() / "bench" / "gradindex"
    started = time.perf_counter()
    worlds = {name: run_world(name, cache, args.candidates, args.batch_size)
              for name in args.worlds.split(",") if name}
    shaped = shaped_throughput(args.shape_layers, 8, 128, 4) if args.shape_layers else None
    latencies = [latency(int(s), DEFAULT_DIMS, args.queries, args.candidates, args.threads)
                 for s in args.sizes.split(",") if s]
    vector_bytes = 2 * DEFAULT_DIMS + 4 + 8  # float16 row, float32 norm, int64 row number
    report = {
        "recall_at_10": min((w["recall_at_10"] for w in worlds.values()), default=None),
        "bytes_per_document": vector_bytes,
        "query_ms_1m": next((r["ivf,pq"]["query_median_ms"] for r in latencies if r["documents"] == 1_000_000), None),
        "query_ms_1m_flat": next((r["flat"]["query_median_ms"] for r in latencies if r["documents"] == 1_000_000), None),
        "build_ratio_to_fwd_bwd": shaped["ratio"] if shaped else None,
        "build_ratio_tiny_worlds": min((w["build_ratio_to_fwd_bwd"] for w in worlds.values()), default=None),
        "build_pythia_width": shaped,
        "worlds": worlds,
        "latency": latencies,
        "on_paper": on_paper(vector_bytes),
        "machine": machine_info() | {"load_average": os.getloadavg()},
        "command": "python -m bench.gradindex_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": time.perf_counter() - started,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
