"""Retrieval latency: faiss exact (flat, inner product) search over random normalised 384-d vectors.

384 is the width of the sentence embeddings the document index uses. For each corpus size
(default 10k and 100k documents) it times building ``IndexFlatIP`` (adding the vectors) and the
median latency of one query's top-100 search over ``--queries`` single-query searches (after one
warm-up search). Writes ``bench/out/retrieval_bench.json``.

    .venv/bin/python -m bench.retrieval_bench [--sizes 10000,100000 --queries 100 --threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss  # noqa: E402
import numpy as np  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="comma-separated corpus sizes")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--top", type=int, default=100)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2, help="faiss OpenMP threads (default 2)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "retrieval_bench.json"))
    args = parser.parse_args(argv)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)

    def normalised(n: int) -> np.ndarray:
        x = rng.standard_normal((n, args.dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    queries = normalised(args.queries)
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        docs = normalised(size)
        started = time.perf_counter()
        index = faiss.IndexFlatIP(args.dim)
        index.add(docs)
        build = time.perf_counter() - started
        index.search(queries[:1], args.top)  # warm-up
        latencies = []
        for q in queries:
            started = time.perf_counter()
            index.search(q[None, :], args.top)
            latencies.append(time.perf_counter() - started)
        row = {"documents": size, "build_seconds": build, "query_median_ms": 1000 * statistics.median(latencies),
               "query_p90_ms": 1000 * float(np.percentile(latencies, 90)), "queries": args.queries}
        results.append(row)
        print(f"{size:>8} documents: build {build * 1000:8.1f} ms, one query top-{args.top}: median "
              f"{row['query_median_ms']:.2f} ms, p90 {row['query_p90_ms']:.2f} ms")
        del index, docs
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    report = {
        "setup": {"index": "faiss.IndexFlatIP (exact)", "dim": args.dim, "top": args.top, "queries": args.queries,
                  "vectors": "random normal, L2-normalised, float32"},
        "machine": {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
                    "faiss_threads": args.threads, "python": platform.python_version(), "faiss": faiss.__version__},
        "command": "python -m bench.retrieval_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
