"""Scoring-time and scoring-memory benchmark: hub_msif's fast path against one forward+backward and kronfluence.

One run, on the paper's scalability-size GPT-NeoX (2 layers, hidden 256, 2 heads, FFN 1024,
random init), with two different models as the pre-trained and the fine-tuned one (different
seeds), each stage's factors fitted by ``hub_msif.factors.fit.fit_factors`` on its own small fitting set,
and C candidate sequences (default 256 x 128 tokens):

1. MS-IF with the fast path for Q = 1, 8, 32 queries: ``precondition_queries`` (both stages) and
   ``score_candidates`` over the C candidates, each reported alone and their sum as a ratio to the
   floor, ONE plain forward+backward pass over the same candidates with the same batch size
   (``loss.backward()`` with parameter gradients). Target: <= 1.5 for every Q. The query gradients
   (``per_example_gradients``) are reported too but are not part of that ratio.
2. Single-stage IF at Q = 32: hub_msif (query gradients + preconditioning + scoring) against
   kronfluence's ``compute_pairwise_scores`` with its own EK-FAC factors fitted on the fine-tuned
   model's fitting data (the factor fit is not timed). Target: kronfluence / hub_msif >= 3,
   like for like (kronfluence's time includes its query gradients, so hub_msif's does too; the
   ratio without hub_msif's query gradients is printed as well). Sanity check: correlation of the
   two score matrices, with hub_msif's default factors (sampled labels, per-head blocks) and with
   factors fitted the way kronfluence fits (empirical labels, no head split), which must agree.
3. Peak memory of MS-IF scoring (Q = 8) at C and 4C candidates, each in a fresh subprocess:
   the increase of the peak resident set size (``VmHWM``, reset just before scoring) over the
   resident size just before ``score_candidates``; ``ru_maxrss`` is recorded too but cannot
   serve, as Linux carries the parent's peak into the child. Target: flat (4C / C <= 1.2;
   anything that kept per-candidate data would grow about 4x).

4. Low-rank queries (``--query-ranks``, default 2, 8, 32) at the largest Q: MS-IF
   ``precondition_queries(..., rank=r)`` (the factors straight from the query gradients, no
   dense ``W_q``) and ``score_candidates`` from the factors, their sum over the floor (target
   <= 1.3), the query memory per query over the model's parameter bytes (target <= 1%), and the
   mean per-query Spearman of the scores with the full-rank ones (random models and sequences: a
   check that the path scores the same thing, not the accuracy measurement, which is
   bench/query_rank_accuracy.py's on a trained pair).

Times are the median of ``--repeats`` runs, interleaved (floor, MS-IF for each Q, SS-IF,
kronfluence in every round) so that drift of a shared machine hits all alike. Prints a table and
writes the same to ``bench/out/score_bench.json``. Run with
``.venv/bin/python -m bench.score_bench [--candidates 256 --threads 2 --repeats 3]``;
``--quick`` is a small smoke configuration.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

# Sleeping (not spinning) OpenMP waiters: spinning threads on a 2-CPU machine shared with other
# work make every measurement several times slower (see bench/fit_bench.py). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from bench.common import PAD_ID, ROOT, Clock, machine_info, make_sequences, plain_pass, verdict  # noqa: E402
from bench.common import pooled_correlations as correlations  # noqa: E402
from hub_msif.attribution.scoring import per_example_gradients, precondition_queries, score_candidates  # noqa: E402
from hub_msif.factors.architectures import find_modules  # noqa: E402
from hub_msif.factors.fit import FitConfig, fit_factors  # noqa: E402
from hub_msif.factors.objectives import lm_loss  # noqa: E402
from hub_msif.factors.storage import load_stage  # noqa: E402
from hub_msif.toy.examples import tiny_model  # noqa: E402

MEMORY_QUERIES = 8
TARGETS = {
    "ms_if_over_floor": 1.5,  # (precondition + score) / one forward+backward, every Q: at most
    "kronfluence_over_hub_msif": 3.0,  # SS-IF at the largest Q, like for like: at least
    "memory_4c_over_c": 1.2,  # peak RSS increase at 4C over that at C: at most
    "matched_correlation": 0.99,  # sanity: same factor recipe, scores must agree: at least
    "low_rank_over_floor": 1.3,  # MS-IF with low-rank queries at the largest Q, (precondition + score) / floor: at most
    "low_rank_query_memory": 0.01,  # one low-rank query's bytes / the model's parameter bytes: at most
}
FULL = dict(candidates=256, seq_len=128, vocab=1024, hidden=256, layers=2, heads=2, ffn=1024, fit_sequences=64,
            query_len=128, answer_len=32, repeats=3, queries="1,8,32")
QUICK = dict(candidates=32, seq_len=32, vocab=256, hidden=64, layers=2, heads=2, ffn=256, fit_sequences=16,
             query_len=32, answer_len=8, repeats=2, queries="1,8,32")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small smoke configuration (seconds, not minutes)")
    parser.add_argument("--candidates", type=int, help=f"candidates C (default {FULL['candidates']})")
    parser.add_argument("--seq-len", type=int, help=f"tokens per candidate and fitting sequence (default {FULL['seq_len']})")
    parser.add_argument("--queries", help=f"comma-separated query counts Q (default {FULL['queries']})")
    parser.add_argument("--query-len", type=int, help=f"tokens per query, prompt + answer (default {FULL['query_len']})")
    parser.add_argument("--answer-len", type=int, help=f"answer tokens per query (default {FULL['answer_len']})")
    parser.add_argument("--fit-sequences", type=int, help=f"fitting sequences per stage (default {FULL['fit_sequences']})")
    parser.add_argument("--vocab", type=int, help=f"vocabulary size (default {FULL['vocab']})")
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--layers", type=int)
    parser.add_argument("--heads", type=int)
    parser.add_argument("--ffn", type=int)
    parser.add_argument("--repeats", type=int, help=f"timed runs of each measurement; the median counts (default {FULL['repeats']})")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch, everywhere (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--damping", type=float, default=0.1,
                        help="relative damping (times mean Lambda per module; kronfluence's heuristic is the same 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the pre-trained model; the fine-tuned one uses seed+1")
    parser.add_argument("--query-ranks", default="2,8,32",
                        help="ranks of the low-rank query measurement at the largest Q, comma-separated ('' skips it)")
    parser.add_argument("--no-kronfluence", action="store_true", help="skip the kronfluence comparison")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--out", default=None, help="JSON report (default bench/out/score_bench.json, "
                                                   "bench/out/score_bench_quick.json with --quick)")
    parser.add_argument("--keep", default=None, help="keep the factor folders in this directory")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.query_counts = sorted({int(q) for q in str(args.queries).split(",") if q.strip()})
    if not args.query_counts or min(args.query_counts) < 1:
        parser.error(f"--queries must list positive counts, got {args.queries!r}")
    if not 1 <= args.answer_len < args.query_len:
        parser.error(f"--answer-len must be in [1, query length {args.query_len}), got {args.answer_len}")
    args.query_ranks = sorted({int(r) for r in str(args.query_ranks).split(",") if r.strip()})
    if args.query_ranks and min(args.query_ranks) < 1:
        parser.error(f"--query-ranks must list positive ranks, got {args.query_ranks!r}")
    if args.out is None:
        name = "score_bench_quick.json" if args.quick else "score_bench.json"
        args.out = str(Path(__file__).resolve().parent / "out" / name)
    return args


# --- data and models ----------------------------------------------------------------------------

def make_queries(n: int, length: int, answer_len: int, vocab: int, seed: int) -> list[dict]:
    """``n`` (prompt, answer) sequences: only the last ``answer_len`` tokens carry loss."""
    queries = make_sequences(n, length, vocab, seed)
    for q in queries:
        q["labels"] = [-100] * (length - answer_len) + q["labels"][length - answer_len :]
    return queries


def build_model(args, seed: int) -> torch.nn.Module:
    return tiny_model("gpt_neox", vocab_size=args.vocab, hidden=args.hidden, layers=args.layers, heads=args.heads,
                      ffn=args.ffn, seed=seed, dtype=torch.float32,
                      max_positions=max(256, args.seq_len, args.query_len))


# --- measurements -------------------------------------------------------------------------------

def timed(fn, *fn_args, **fn_kwargs):
    clock = Clock()
    result = fn(*fn_args, **fn_kwargs)
    return result, clock.read()


def median_of(runs: list[dict]) -> dict:
    return {"seconds": statistics.median(r["seconds"] for r in runs),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
            "all_seconds": [round(r["seconds"], 4) for r in runs]}


def added(*parts: dict) -> dict:
    return {"seconds": sum(p["seconds"] for p in parts), "cpu_seconds": sum(p["cpu_seconds"] for p in parts)}


# --- kronfluence --------------------------------------------------------------------------------

def kronfluence_analyzer(model, fit_sequences, batch_size: int, folder: Path, module_names: list[str]):
    """A kronfluence Analyzer on a copy of ``model`` with EK-FAC factors fitted (empirical Fisher)."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.utils.dataset import DataLoaderKwargs

    from bench.kronfluence_task import LanguageModelTask, collator

    def summed_loss(model, batch, sample):
        """Summed next-token loss with hub_msif's own loss (labels -100 and padding carry none)."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        return lm_loss(logits, batch, "empirical")

    task = LanguageModelTask(module_names, summed_loss, empirical_only=True)
    prepared = prepare_model(copy.deepcopy(model), task)
    loader = DataLoaderKwargs(num_workers=0, collate_fn=collator(PAD_ID))
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyzer = Analyzer("score_bench", prepared, task, cpu=True, disable_tqdm=True, disable_model_save=True,
                            output_dir=str(folder), log_level=logging.WARNING)
        analyzer.fit_all_factors("ekfac", fit_sequences, per_device_batch_size=batch_size, dataloader_kwargs=loader,
                                 factor_args=factor_args)
    return analyzer, loader


def kronfluence_scores(analyzer, loader, name: str, queries, candidates, batch_size: int, train_indices=None):
    """kronfluence's pairwise scores ``[Q, C]``; all queries in one batch (one pass over the candidates)."""
    from kronfluence.arguments import ScoreArguments

    score_args = ScoreArguments(damping_factor=None)  # 0.1 * mean(Lambda) per module, as hub_msif's relative 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyzer.compute_pairwise_scores(name, "ekfac", queries, candidates, per_device_query_batch_size=len(queries),
                                         per_device_train_batch_size=batch_size, train_indices=train_indices,
                                         dataloader_kwargs=loader, score_args=score_args, overwrite_output_dir=True)
    return analyzer.load_pairwise_scores(name)["all_modules"]


# --- memory (fresh subprocess per size) ---------------------------------------------------------

def _rss_kib(field: str) -> int | None:
    """``VmRSS`` or ``VmHWM`` (peak) of this process from /proc, in KiB; None where unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0); False if not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def memory_worker(config_path: str) -> int:
    """Runs in a fresh process: MS-IF ``score_candidates`` over ``n`` candidates, peak RSS increase printed as JSON."""
    config = json.loads(Path(config_path).read_text())
    args = argparse.Namespace(**config["model"])
    torch.set_num_threads(config["threads"])
    model = build_model(args, config["seed"])
    specs = load_stage(config["factors"], "pretrained").specs
    weights = load_file(config["weights"])  # W_q of the queries, computed by the parent
    candidates = make_sequences(config["candidates"], config["seq_len"], args.vocab, config["candidate_seed"])
    gc.collect()
    # ru_maxrss cannot serve here: Linux carries the parent's peak over fork+exec (this process
    # starts with the benchmark's own peak). VmHWM belongs to this process's memory map alone, and
    # resetting it right before scoring leaves nothing but the scoring pass in the peak.
    peak_was_reset = _reset_peak_rss()
    rss_before = _rss_kib("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    clock = Clock()
    scores = score_candidates(model, specs, weights, candidates, PAD_ID, batch_size=config["batch_size"])
    elapsed = clock.read()
    maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    hwm = _rss_kib("VmHWM")
    if rss_before is not None and hwm is not None:
        method = "VmHWM - VmRSS before scoring" + ("" if peak_was_reset else " (peak not reset: may include set-up)")
        increase = hwm - rss_before
    else:  # no /proc: ru_maxrss only grows past the inherited peak, so this can undercount
        method, increase = "ru_maxrss after - before (can undercount)", maxrss_after - maxrss_before
    print(json.dumps({
        "candidates": config["candidates"], "shape": list(scores.total.shape), "method": method,
        "increase_mib": increase / 1024, "rss_before_mib": (rss_before or 0) / 1024,
        "peak_mib": (hwm or maxrss_after) / 1024, "ru_maxrss_before_mib": maxrss_before / 1024,
        "ru_maxrss_after_mib": maxrss_after / 1024, **elapsed,
    }))
    return 0


def measure_memory(args, work: Path, weights: dict[str, torch.Tensor], sizes: list[int]) -> list[dict]:
    weights_path = work / "memory_weights.safetensors"
    save_file({k: v.contiguous() for k, v in weights.items()}, str(weights_path))
    results = []
    for n in sizes:
        config = {
            "model": {k: getattr(args, k) for k in ("vocab", "hidden", "layers", "heads", "ffn", "seq_len", "query_len")},
            "seed": args.seed, "threads": args.threads, "factors": str(work / "factors"), "weights": str(weights_path),
            "candidates": n, "seq_len": args.seq_len, "candidate_seed": 2, "batch_size": args.batch_size,
        }
        config_path = work / f"memory_{n}.json"
        config_path.write_text(json.dumps(config))
        done = subprocess.run([sys.executable, "-m", "bench.score_bench", "--memory-worker", str(config_path)],
                              capture_output=True, text=True, check=False, env=os.environ.copy(), cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker for {n} candidates failed:\n{done.stderr[-4000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_worker:
        return memory_worker(args.memory_worker)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="score_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    info["load_average_start"] = os.getloadavg()

    pretrained, finetuned = build_model(args, args.seed), build_model(args, args.seed + 1)
    fit_pt = make_sequences(args.fit_sequences, args.seq_len, args.vocab, seed=0)
    fit_ft = make_sequences(args.fit_sequences, args.seq_len, args.vocab, seed=1)
    candidates = make_sequences(args.candidates, args.seq_len, args.vocab, seed=2)
    queries = make_queries(max(args.query_counts), args.query_len, args.answer_len, args.vocab, seed=3)
    parameters = sum(p.numel() for p in pretrained.parameters())
    q_max = max(args.query_counts)
    print(f"GPT-NeoX {args.layers} layers, hidden {args.hidden}, {args.heads} heads, FFN {args.ffn}, vocab {args.vocab} "
          f"({parameters / 1e6:.2f}M parameters), float32; pre-trained seed {args.seed}, fine-tuned seed {args.seed + 1}",
          flush=True)
    print(f"C = {args.candidates} candidates x {args.seq_len} tokens; queries {args.query_len} tokens "
          f"({args.answer_len} answer tokens); batch {args.batch_size}; fitting sets {args.fit_sequences} x "
          f"{args.seq_len} tokens per stage; damping {args.damping} x mean(Lambda); median of {args.repeats}", flush=True)
    print(f"machine: {info['cpu']}, {info['cpu_count']} CPUs, load average {info['load_average_start'][0]:.1f}; "
          f"torch {info['torch']}, {info['torch_threads']} threads, OMP_WAIT_POLICY={info['omp_wait_policy']}", flush=True)

    # --- factors (not timed) ---------------------------------------------------------------------
    print("fitting hub_msif factors (pre-trained, fine-tuned: sampled labels, per-head blocks) ...", flush=True)
    folder = work / "factors"
    for stage, model, data in (("pretrained", pretrained, fit_pt), ("finetuned", finetuned, fit_ft)):
        fit_factors(model, data, folder, FitConfig(stage=stage, batch_size=args.batch_size, checkpoint_every=0),
                    pad_id=PAD_ID, info={}, show_progress=False)
    pt_factors, ft_factors = load_stage(folder, "pretrained"), load_stage(folder, "finetuned")
    specs = pt_factors.specs
    module_names = [s.name for s in specs]

    analyzer = loader = matched = None
    if not args.no_kronfluence:
        print("fitting kronfluence EK-FAC factors and hub_msif's like-for-like factors on the fine-tuned stage "
              "(empirical labels, no head split) ...", flush=True)
        analyzer, loader = kronfluence_analyzer(finetuned, fit_ft, args.batch_size, work / "kronfluence",
                                                [t.name for t in find_modules(finetuned, "all", split_heads=False)])
        config = FitConfig(stage="finetuned", batch_size=args.batch_size, split_heads=False, label_mode="empirical",
                           checkpoint_every=0)
        matched = fit_factors(finetuned, fit_ft, work / "matched", config, pad_id=PAD_ID, info={}, show_progress=False)

    # --- warm-up (allocator, kernels, lazy imports) ------------------------------------------------
    print("warming up ...", flush=True)
    warm = candidates[: args.batch_size]
    plain_pass(pretrained, warm, args.batch_size)
    warm_grads = per_example_gradients(finetuned, specs, queries[: args.batch_size], PAD_ID, args.batch_size)
    warm_w = precondition_queries(warm_grads, "ms-if", ft_factors, pt_factors, args.damping)
    score_candidates(pretrained, specs, warm_w, warm, PAD_ID, args.batch_size)
    for r in args.query_ranks:
        score_candidates(pretrained, specs, precondition_queries(warm_grads, "ms-if", ft_factors, pt_factors,
                                                                 args.damping, rank=r), warm, PAD_ID, args.batch_size)
    if analyzer is not None:
        kronfluence_scores(analyzer, loader, "warmup", queries[:q_max], candidates, args.batch_size,
                           train_indices=list(range(min(args.batch_size, len(candidates)))))
    del warm_grads, warm_w

    # --- timed rounds ------------------------------------------------------------------------------
    runs: dict[str, list[dict]] = {"floor": []}
    last: dict = {}
    for repeat in range(args.repeats):
        print(f"round {repeat + 1}/{args.repeats}: floor, MS-IF for Q = {args.query_counts}, SS-IF Q = {q_max}"
              f"{', kronfluence' if analyzer is not None else ''} ...", flush=True)
        _, t = timed(plain_pass, pretrained, candidates, args.batch_size)
        runs["floor"].append(t)
        for q in args.query_counts:
            grads, t_grad = timed(per_example_gradients, finetuned, specs, queries[:q], PAD_ID, args.batch_size)
            w, t_pre = timed(precondition_queries, grads, "ms-if", ft_factors, pt_factors, args.damping)
            _, t_score = timed(score_candidates, pretrained, specs, w, candidates, PAD_ID, args.batch_size)
            for key, t in (("query_gradients", t_grad), ("precondition", t_pre), ("score", t_score)):
                runs.setdefault(f"ms_if_q{q}_{key}", []).append(t)
            if q == MEMORY_QUERIES:
                last["memory_weights"] = w
            if q == q_max and args.query_ranks:
                full_scores, _ = timed(score_candidates, pretrained, specs, w, candidates, PAD_ID, args.batch_size)
                last["full_rank"] = full_scores.total
                for r in args.query_ranks:
                    low, t_pre = timed(precondition_queries, grads, "ms-if", ft_factors, pt_factors, args.damping,
                                       rank=r)
                    low_scores, t_score = timed(score_candidates, pretrained, specs, low, candidates, PAD_ID,
                                                args.batch_size)
                    for key, t in (("precondition", t_pre), ("score", t_score)):
                        runs.setdefault(f"low_rank_r{r}_q{q}_{key}", []).append(t)
                    last[f"low_rank_r{r}"] = (low.bytes_per_query(), low_scores.total)
            del grads, w
        grads, t_grad = timed(per_example_gradients, finetuned, specs, queries[:q_max], PAD_ID, args.batch_size)
        w, t_pre = timed(precondition_queries, grads, "ss-if", ft_factors, None, args.damping)
        ss_scores, t_score = timed(score_candidates, finetuned, specs, w, candidates, PAD_ID, args.batch_size)
        for key, t in (("query_gradients", t_grad), ("precondition", t_pre), ("score", t_score)):
            runs.setdefault(f"ss_if_q{q_max}_{key}", []).append(t)
        last["ss_if"], last["ss_if_grads"] = ss_scores.total.T, grads
        if analyzer is not None:
            theirs, t = timed(kronfluence_scores, analyzer, loader, f"scores{repeat}", queries[:q_max], candidates,
                              args.batch_size)
            runs.setdefault("kronfluence", []).append(t)
            last["kronfluence"] = theirs
    print("floor, again (drift check) ...", flush=True)
    _, t = timed(plain_pass, pretrained, candidates, args.batch_size)
    runs["floor"].append(t)
    info["load_average_end"] = os.getloadavg()
    times = {name: median_of(r) for name, r in runs.items()}
    floor = times["floor"]

    # --- agreement with kronfluence ----------------------------------------------------------------
    agreement = {}
    if analyzer is not None:
        theirs = last["kronfluence"].double()
        agreement["default_factors"] = correlations(last["ss_if"], theirs)
        w = precondition_queries(last["ss_if_grads"], "ss-if", matched, None, args.damping)
        ours = score_candidates(finetuned, matched.specs, w, candidates, PAD_ID, args.batch_size).total.T
        agreement["matched_factors"] = correlations(ours, theirs)

    # --- memory --------------------------------------------------------------------------------------
    memory = None
    if not args.no_memory:
        sizes = [args.candidates, 4 * args.candidates]
        print(f"memory: MS-IF scoring, Q = {MEMORY_QUERIES}, {sizes[0]} and {sizes[1]} candidates, "
              "one fresh process each ...", flush=True)
        if MEMORY_QUERIES not in args.query_counts:
            grads = per_example_gradients(finetuned, specs, queries[:MEMORY_QUERIES], PAD_ID, args.batch_size)
            last["memory_weights"] = precondition_queries(grads, "ms-if", ft_factors, pt_factors, args.damping)
        memory = {"queries": MEMORY_QUERIES, "runs": measure_memory(args, work, last["memory_weights"], sizes)}
        small, large = memory["runs"]
        memory["ratio_4c_over_c"] = large["increase_mib"] / max(small["increase_mib"], 1e-9)

    # --- ratios, targets -----------------------------------------------------------------------------
    ratios, met, rows = {}, {}, []
    rows.append(("floor: 1 x (forward + backward with parameter gradients) over C", floor, None, ""))
    for q in args.query_counts:
        pre, score, grad = (times[f"ms_if_q{q}_{k}"] for k in ("precondition", "score", "query_gradients"))
        total = added(pre, score)
        times[f"ms_if_q{q}_total"] = total
        key = f"ms_if_q{q}_over_floor"
        ratios[key] = total["seconds"] / floor["seconds"]
        ratios[f"ms_if_q{q}_with_query_gradients_over_floor"] = (total["seconds"] + grad["seconds"]) / floor["seconds"]
        met[key] = ratios[key] <= TARGETS["ms_if_over_floor"]
        rows += [(f"MS-IF Q={q}: query gradients (not in the ratio)", grad, grad["seconds"] / floor["seconds"], ""),
                 (f"MS-IF Q={q}: precondition_queries (both stages)", pre, pre["seconds"] / floor["seconds"], ""),
                 (f"MS-IF Q={q}: score_candidates", score, score["seconds"] / floor["seconds"], ""),
                 (f"MS-IF Q={q}: precondition + score", total, ratios[key],
                  f"<= {TARGETS['ms_if_over_floor']:.1f}: {verdict(met[key])}")]
    ss = {k: times[f"ss_if_q{q_max}_{k}"] for k in ("query_gradients", "precondition", "score")}
    ss_core = added(ss["precondition"], ss["score"])
    ss_full = added(ss["query_gradients"], ss["precondition"], ss["score"])
    times[f"ss_if_q{q_max}_precondition_score"], times[f"ss_if_q{q_max}_total"] = ss_core, ss_full
    rows += [(f"SS-IF Q={q_max} hub_msif: precondition + score", ss_core, ss_core["seconds"] / floor["seconds"], ""),
             (f"SS-IF Q={q_max} hub_msif: query gradients + precondition + score", ss_full,
              ss_full["seconds"] / floor["seconds"], "")]
    if "kronfluence" in times:
        kron = times["kronfluence"]
        ratios["kronfluence_over_hub_msif"] = kron["seconds"] / ss_full["seconds"]
        ratios["kronfluence_over_hub_msif_precondition_score"] = kron["seconds"] / ss_core["seconds"]
        met["kronfluence_over_hub_msif"] = ratios["kronfluence_over_hub_msif"] >= TARGETS["kronfluence_over_hub_msif"]
        met["matched_correlation"] = agreement["matched_factors"]["pearson"] >= TARGETS["matched_correlation"]
        rows.append((f"SS-IF Q={q_max} kronfluence compute_pairwise_scores (factors not timed)", kron,
                     kron["seconds"] / floor["seconds"], ""))
    low_rank = {}
    parameter_bytes = sum(p.numel() * p.element_size() for p in pretrained.parameters())
    for r in args.query_ranks:
        pre, score = (times[f"low_rank_r{r}_q{q_max}_{k}"] for k in ("precondition", "score"))
        total = added(pre, score)
        times[f"low_rank_r{r}_q{q_max}_total"] = total
        query_bytes, scores = last[f"low_rank_r{r}"]
        full = last["full_rank"]
        rho = correlations(scores.T, full.T)["spearman_mean"]
        low_rank[r] = {"over_floor": total["seconds"] / floor["seconds"], "query_bytes": query_bytes,
                       "query_bytes_over_parameter_bytes": query_bytes / parameter_bytes,
                       "spearman_mean_with_full_rank": rho}
        ratios[f"low_rank_r{r}_q{q_max}_over_floor"] = low_rank[r]["over_floor"]
        met[f"low_rank_r{r}_over_floor"] = low_rank[r]["over_floor"] <= TARGETS["low_rank_over_floor"]
        met[f"low_rank_r{r}_query_memory"] = (low_rank[r]["query_bytes_over_parameter_bytes"]
                                              <= TARGETS["low_rank_query_memory"])
        rows += [(f"MS-IF Q={q_max} rank {r}: precondition_queries (low-rank factors)", pre,
                  pre["seconds"] / floor["seconds"], ""),
                 (f"MS-IF Q={q_max} rank {r}: score_candidates from the factors", score,
                  score["seconds"] / floor["seconds"], ""),
                 (f"MS-IF Q={q_max} rank {r}: precondition + score", total, low_rank[r]["over_floor"],
                  f"<= {TARGETS['low_rank_over_floor']:.1f}: {verdict(met[f'low_rank_r{r}_over_floor'])}")]
    if memory is not None:
        ratios["memory_4c_over_c"] = memory["ratio_4c_over_c"]
        met["memory_4c_over_c"] = memory["ratio_4c_over_c"] <= TARGETS["memory_4c_over_c"]

    print()
    print(f"{'measurement (median)':<72} {'wall s':>8} {'CPU s':>8} {'/ floor':>8}   target")
    for label, row, ratio, target in rows:
        ratio_text = f"{ratio:8.3f}" if ratio is not None else " " * 8
        print(f"{label:<72} {row['seconds']:8.3f} {row['cpu_seconds']:8.3f} {ratio_text}   {target}")
    if "kronfluence" in times:
        key = "kronfluence_over_hub_msif"
        print(f"\nkronfluence / hub_msif, SS-IF Q={q_max}, like for like (both with query gradients): "
              f"{ratios[key]:.2f}x   target >= {TARGETS[key]:.1f}: {verdict(met[key])}")
        print(f"kronfluence / hub_msif (precondition + score only): "
              f"{ratios['kronfluence_over_hub_msif_precondition_score']:.2f}x")
        for name, label in (("default_factors", "hub_msif default factors (sampled labels, per-head blocks)"),
                            ("matched_factors", "hub_msif factors fitted like kronfluence's (empirical, no split)")):
            c = agreement[name]
            print(f"agreement with kronfluence, {label}: Pearson {c['pearson']:.6f}, mean per-query Spearman "
                  f"{c['spearman_mean']:.6f}, max |diff| / max |score| {c['max_abs_difference_over_max_abs']:.2e}")
        print(f"  (sanity target: Pearson with matched factors >= {TARGETS['matched_correlation']}: "
              f"{verdict(met['matched_correlation'])})")
    if memory is not None:
        small, large = memory["runs"]
        print(f"\npeak RSS increase of MS-IF scoring (Q={MEMORY_QUERIES}, fresh process each, {small['method']}):")
        for r in memory["runs"]:
            print(f"  {r['candidates']:>6} candidates: +{r['increase_mib']:.1f} MiB (RSS {r['rss_before_mib']:.1f} MiB before "
                  f"scoring, peak {r['peak_mib']:.1f} MiB; scoring took {r['seconds']:.2f} s)")
        print(f"  4C / C: {memory['ratio_4c_over_c']:.3f}   target <= {TARGETS['memory_4c_over_c']}: "
              f"{verdict(met['memory_4c_over_c'])}")
    for r, row in low_rank.items():
        print(f"low-rank queries, rank {r}: {row['query_bytes'] / 1024:.1f} KiB per query = "
              f"{100 * row['query_bytes_over_parameter_bytes']:.2f}% of the model's {parameter_bytes / 2**20:.1f} MiB "
              f"of parameters (target <= {100 * TARGETS['low_rank_query_memory']:.0f}%: "
              f"{verdict(met[f'low_rank_r{r}_query_memory'])}); mean Spearman with full rank "
              f"{row['spearman_mean_with_full_rank']:.4f}")
    floors = ", ".join(f"{r['seconds']:.3f}" for r in runs["floor"])
    print(f"\nfloor runs: {floors} s (last one after all rounds, drift check); torch threads {info['torch_threads']}, "
          f"{info['cpu_count']} CPUs, load average {info['load_average_start'][0]:.1f} at the start and "
          f"{info['load_average_end'][0]:.1f} at the end")
    if max(info["load_average_start"][0], info["load_average_end"][0]) > (info["cpu_count"] or 1):
        print("warning: the machine was busy with other work; times (and ratios) are noisy")
    all_met = all(met.values())
    print(f"targets: {sum(met.values())}/{len(met)} met" + ("" if all_met else
          f" (missed: {', '.join(k for k, v in met.items() if not v)})"))

    report = {
        "setup": {"model": "gpt_neox", "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "ffn": args.ffn, "vocab": args.vocab, "parameters": parameters, "dtype": "float32",
                  "candidates": args.candidates, "seq_len": args.seq_len, "query_counts": args.query_counts,
                  "query_len": args.query_len, "answer_len": args.answer_len, "fit_sequences": args.fit_sequences,
                  "batch_size": args.batch_size, "repeats": args.repeats, "damping_relative": args.damping,
                  "quick": args.quick, "query_ranks": args.query_ranks, "modules": module_names, "seeds": {"pretrained": args.seed,
                                                                         "finetuned": args.seed + 1}},
        "machine": info, "times": times, "ratios": ratios, "agreement": agreement, "memory": memory,
        "low_rank": {"queries": q_max, "parameter_bytes": parameter_bytes, "ranks": low_rank},
        "targets": TARGETS, "targets_met": met,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
