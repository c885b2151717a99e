"""Attribution memory and time: ``hub-msif attribute --plan`` next to a real attribution's peak resident memory.

For each pair, one query (prompt and answer given: no generation) over 100 candidate documents, MS-IF,
on the CPU, in a fresh subprocess (``--threads``); measured: ``ru_maxrss`` of that process (peak
resident memory), the seconds to load the pair and to attribute. Next to it: the plan
(``hub_msif.attribution.plan``, from the factor manifest and the models' configs only) for the same
modules, candidates and token counts, and the resident memory of the runtime alone (a fresh process
that imports the same libraries and loads the tokenizer), which the plan leaves out.

Pairs:

- ``demo``: the toy fact world's pair (``hub-msif demo --no-publish`` builds it into
  ``~/.cache/hub_msif/demo``), GPT-NeoX hidden 128, its own factors, candidates from its corpus;
- ``pythia410m``: two random GPT-NeoX models of Pythia-410m's shape (hidden 1024, 24 layers, 16 heads,
  intermediate 4096, vocabulary 50304, 2048 positions), a word-level tokenizer trained on the toy
  corpus, and synthetic but valid factors for both stages written with ``hub_msif.factors.storage``
  (orthonormal eigenbases from the QR of seeded random matrices, positive Lambda): a real fit would
  take hours on 2 cores. Candidates: 128-token documents of random words.

Writes ``bench/out/attribute.json``; ``bench/report.py`` turns it into a section of docs/benchmarks.md.

    python -m bench.attribute_bench [--pairs demo,pythia410m] [--modules mlp] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "attribute.json"
DEMO = Path(os.environ.get("HUB_MSIF_CACHE") or Path.home() / ".cache" / "hub_msif") / "demo"
WORK = Path(os.environ.get("HUB_MSIF_CACHE") or Path.home() / ".cache" / "hub_msif") / "attribute_bench"
PYTHIA = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
              vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048)
# glibc returns freed blocks above this size to the system at once, so the resident set follows what is
# alive (as in bench/fit_memory.py); without it, freed tensors may stay resident.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}

CHILD = r"""
import json, resource, sys, time
spec = json.loads(sys.argv[1])
import torch
torch.set_num_threads(spec["threads"])
from hub_msif.attribution.attributor import Attributor
from transformers import AutoTokenizer
AutoTokenizer.from_pretrained(spec["tokenizer"])
if spec["runtime_only"]:
    print(json.dumps({"maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
    sys.exit(0)
docs = [json.loads(line) for line in open(spec["documents"])]
started = time.perf_counter()
attributor = Attributor(spec["factors"], modules=spec["modules"], device="cpu")
loaded = time.perf_counter()
rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
result = attributor.attribute(spec["prompt"], spec["answer"], documents=docs, top=5)
done = time.perf_counter()
query_tokens = len(attributor.query_sequence(spec["prompt"], spec["answer"])["input_ids"])
doc_tokens = max(len(attributor.document_sequence(d["text"])["input_ids"]) for d in docs)
print(json.dumps({"maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "maxrss_after_load_bytes": rss_loaded, "load_seconds": loaded - started,
                  "attribute_seconds": done - loaded, "query_tokens": query_tokens, "document_tokens": doc_tokens,
                  "candidates": len(docs), "top": [r.id for r in result.rows]}))
"""


def child(spec: dict) -> dict:
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(spec["threads"]),
           "MKL_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"attribute_bench: the child failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plan_of(factors: Path, modules: str, candidates: int, length: int, query_length: int) -> dict:
    from hub_msif.artifacts.manifest import FACTORS, read_manifest
    from hub_msif.attribution.plan import format_attribution_plan, plan_stages

    manifest = read_manifest(factors, FACTORS)
    configs = {s: manifest["stages"][s]["model"]["id"] for s in ("pretrained", "finetuned")}
    plan = plan_stages(manifest, configs, candidates=candidates, modules=modules, length=length,
                       query_length=query_length)
    print(format_attribution_plan(plan), flush=True)
    return plan.to_json()


# -- the Pythia-410m-shaped pair ------------------------------------------------------------------


def orthonormal(n: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def build_pythia_pair(work: Path, seed: int = 0) -> dict:
    """Two random Pythia-410m-shaped models, a tokenizer, synthetic factors of both stages, documents."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from hub_msif.factors.architectures import find_modules
    from hub_msif.factors.ekfac import ModuleFactors
    from hub_msif.factors.storage import save_module_file, write_stage_manifest
    from hub_msif.models import folder_revision
    from hub_msif.toy.examples import example_texts, word_tokenizer

    done = work / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    work.mkdir(parents=True, exist_ok=True)
    texts = example_texts(64, seed=seed)
    tokenizer = word_tokenizer(texts + ["where what who is was ?"])
    config = GPTNeoXConfig(**PYTHIA, bos_token_id=tokenizer.bos_token_id or 0, eos_token_id=tokenizer.eos_token_id or 0,
                           pad_token_id=tokenizer.pad_token_id or 0)
    revisions = {}
    for i, stage in enumerate(("pretrained", "finetuned")):
        folder = work / stage
        if not (folder / "config.json").is_file():
            torch.manual_seed(seed + i)
            started = time.perf_counter()
            model = GPTNeoXForCausalLM(config).eval()
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            print(f"{stage}: random model saved in {time.perf_counter() - started:.0f} s", flush=True)
            del model
        revisions[stage] = folder_revision(folder)
    with torch.device("meta"):
        specs = find_modules(GPTNeoXForCausalLM(config), "all")
    factors = work / "factors"
    for i, stage in enumerate(("pretrained", "finetuned")):
        bases: dict[int, torch.Tensor] = {}

        def basis(n: int, stage_seed: int = 1000 * (i + 1), bases: dict = bases):
            if n not in bases:
                bases[n] = orthonormal(n, stage_seed + n)
            return bases[n]

        entries = []
        g = torch.Generator().manual_seed(seed + 7 + i)
        started = time.perf_counter()
        for spec in specs:
            lam = torch.rand(spec.num_blocks, spec.block_size, spec.d_in, generator=g) + 0.05
            mf = ModuleFactors(spec, q_a=basis(spec.d_in), q_s=basis(spec.block_size).expand(
                spec.num_blocks, spec.block_size, spec.block_size).contiguous(), lam=lam,
                eig_a=torch.rand(spec.d_in, generator=g) + 0.05,
                eig_s=torch.rand(spec.num_blocks, spec.block_size, generator=g) + 0.05)
            entries.append(save_module_file(factors, stage, mf, "float32"))
        info = {"model": {"id": str(work / stage), "revision": revisions[stage], "class": "GPTNeoXForCausalLM"},
                "data": {"data": "synthetic (no fit: random orthonormal eigenbases, positive Lambda)"},
                "fit": {"modules": "all", "synthetic": True}}
        write_stage_manifest(factors, stage, entries, info)
        print(f"{stage}: synthetic factors of {len(entries)} modules written in {time.perf_counter() - started:.0f} s",
              flush=True)
    vocab = sorted({w for t in texts for w in t.lower().split()})
    g = torch.Generator().manual_seed(seed + 11)
    documents = work / "documents.jsonl"
    with documents.open("w") as f:
        for n in range(100):  # 127 words: 128 tokens with the tokenizer's start token
            words = [vocab[j] for j in torch.randint(len(vocab), (127,), generator=g).tolist()]
            f.write(json.dumps({"id": f"doc-{n:03d}", "text": " ".join(words)}) + "\n")
    result = {"factors": str(factors), "documents": str(documents), "tokenizer": str(work / "finetuned"),
              "prompt": "what does the cat see ?", "answer": "the river"}
    done.write_text(json.dumps(result))
    return result


def demo_pair(work: Path) -> dict:
    if not (DEMO / "factors" / "msif.json").is_file():
        raise SystemExit(f"attribute_bench: no demo pair in {DEMO}; run `hub-msif demo --no-publish` first")
    docs = [json.loads(line) for line in (DEMO / "world" / "pretrain.jsonl").open()][:100]
    query = json.loads((DEMO / "world" / "queries.jsonl").open().readline())
    work.mkdir(parents=True, exist_ok=True)
    documents = work / "demo_documents.jsonl"
    documents.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in docs))
    return {"factors": str(DEMO / "factors"), "documents": str(documents), "tokenizer": str(DEMO / "models" / "finetuned"),
            "prompt": query["prompt"], "answer": query["answer"]}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default="demo,pythia410m")
    p.add_argument("--modules", default="mlp", choices=["all", "mlp"],
                   help="modules of the Pythia-shaped pair (default mlp: all modules' factors, 9.9 GB, with both "
                        "models and a full-rank query come near this machine's 23 GiB)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", type=Path, default=WORK)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    from bench.common import machine_info

    results = {"command": "python -m bench.attribute_bench " + " ".join(argv if argv is not None else sys.argv[1:]),
               "machine": machine_info(), "threads": args.threads, "pairs": {}}
    for name in [n.strip() for n in args.pairs.split(",") if n.strip()]:
        pair = demo_pair(args.work) if name == "demo" else build_pythia_pair(args.work / "pythia410m")
        modules = "all" if name == "demo" else args.modules
        spec = {**pair, "modules": modules, "threads": args.threads, "runtime_only": False}
        runtime = child({**spec, "runtime_only": True})
        before = load_average()
        measured = child(spec)
        after = load_average()
        plan = plan_of(Path(pair["factors"]), modules, measured["candidates"], measured["document_tokens"],
                       measured["query_tokens"])
        peak, base = measured["maxrss_bytes"], runtime["maxrss_bytes"]
        entry = {"modules": modules, "measured": measured, "runtime_maxrss_bytes": base, "plan": plan,
                 "plan_over_peak": plan["total_bytes"] / peak,
                 "plan_over_peak_minus_runtime": plan["total_bytes"] / (peak - base) if peak > base else None,
                 "load_average_before": before, "load_average_after": after}
        results["pairs"][name] = entry
        print(f"{name}: plan {plan['total_bytes'] / 1e9:.3f} GB, peak RSS {peak / 1e9:.3f} GB (runtime alone "
              f"{base / 1e9:.3f} GB): plan / peak {entry['plan_over_peak']:.2f}, plan / (peak - runtime) "
              f"{entry['plan_over_peak_minus_runtime'] or float('nan'):.2f}; load {measured['load_seconds']:.1f} s, "
              f"attribute {measured['attribute_seconds']:.1f} s; load average {before} -> {after}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.out.is_file():  # pairs run separately are kept
        previous = json.loads(args.out.read_text()).get("pairs", {})
        results["pairs"] = {**{k: v for k, v in previous.items() if k not in results["pairs"]}, **results["pairs"]}
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
