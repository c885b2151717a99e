"""Counterfactual benchmarks of multi-stage attribution (issue 11): multi-stage LDS and top-k removal.

For each world (the demo's fact world at bench size, and the harder world of
``bench.hardworld``):

1. **The full pair**: pre-trained on the whole pre-training corpus, fine-tuned on the Q&A pairs
   (``factworld``'s training loop, tiny GPT-NeoX); both stages' factors fitted with ``fit_stage``
   (as the demo does); every method setting of ``SETTINGS`` scores every pre-training document for
   every held-out query (``Attributor.score_methods``: one pass per model for all settings).
2. **LDS**: ``--subsets`` (M >= 32) pairs, each pre-trained from the same initialisation and
   with the same seed on a random half of the corpus, then fine-tuned identically; each held-out
   query's answer loss is measured under every pair. Per setting, a query's LDS is the Spearman
   correlation over the M subsets between the predicted effect (sum of the scores of the kept
   documents) and the measured answer log-probability; the mean over queries with a bootstrap 95%
   interval is reported (``bench.lds``).
3. **Top-k removal**: for ``--removal-queries`` held-out queries (those the full pair answers
   right first), each method's top ``--top-k`` documents (best setting by LDS, scored over the
   whole corpus) are removed and the pair is retrained with the full pair's seed; the increase
   of the answer loss over the full pair and the share of right answers that flip are reported,
   beside removing the fact's true proponents and ``--random-draws`` random draws of k documents
   (their spread shows the retraining noise).

Every trained pair's measurements are cached under ``--cache`` (one JSON per pair, keyed by a
hash of the world, the training settings and the kept documents; atomic writes), so a rerun
resumes; the full pair's models and factors are kept there too. Subset and removal pairs keep only
their measurements, not their weights. Writes ``--out`` (the issue's format) and
``counterfactual_details.json`` + ``counterfactual.png`` beside it.

A method setting is one entry of ``SETTINGS`` (name -> a ``score_methods`` call of an Attributor
built with the setting's options); a new variant (say ``Setting("ms-if+norm@1e-3", "ms-if", 1e-3,
(("normalize", True),), "ms-if+norm")``) is one more line.

    .venv/bin/python -m bench.counterfactual [--workers 2] [--subsets 32] [--removal-queries 20]
        [--worlds factworld,hardworld] [--cache DIR] [--out bench/out/counterfactual.json]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # noqa: E402 -- before anything imports tqdm: no progress bars in the log

from bench import lds
from hub_msif.artifacts.atomic import atomic_write_json

CODE_VERSION = 1  # bump when training or measurement changes, so cached pairs are not reused
DAMPINGS = ("1e-4", "1e-3", "1e-2", "1e-1", "1")
FAMILIES = ("ms-if", "ss-if", "gdp", "repsim", "bm25")
REMOVAL_FAMILIES = ("ms-if", "ss-if", "bm25", "gdp")


class NotReady(Exception):
    """--cached-only: a world has too few trained pairs to report anything."""


@dataclass(frozen=True)
class Setting:
    """One method setting: ``name`` in the output, the ``Attributor.score_methods`` method and
    damping, extra keyword ``options`` as (key, value) pairs, and the ``family`` (output key) whose
    best setting it competes for (default: the method)."""

    name: str
    method: str
    damping: float | None = None
    options: tuple = ()
    family: str = ""

    @property
    def key(self) -> str:
        return self.family or self.method


SETTINGS: list[Setting] = (
    [Setting(f"ms-if@{d}", "ms-if", float(d)) for d in DAMPINGS]
    + [Setting(f"ss-if@{d}", "ss-if", float(d)) for d in DAMPINGS]
    + [Setting("gdp", "gdp"), Setting("repsim", "repsim"), Setting("bm25", "bm25")]
    # Issue 11's levers, at the plain methods' best damping (0.1 on both worlds): unit-normalised
    # scores, refined query iHVPs (5 CG steps on 64 sequences of each stage's data), and factors
    # fitted with 4 label samples per sequence in the Lambda pass. Each is a family of its own, so
    # the plain methods' best settings (and their removal runs) stay those of the plain methods.
    + [Setting("ms-if+norm@1e-1", "ms-if", 0.1, (("normalize", True),), "ms-if+norm"),
       Setting("ss-if+norm@1e-1", "ss-if", 0.1, (("normalize", True),), "ss-if+norm"),
       Setting("ms-if+refine5@1e-1", "ms-if", 0.1, (("refine_steps", 5),), "ms-if+refine5"),
       Setting("ss-if+refine5@1e-1", "ss-if", 0.1, (("refine_steps", 5),), "ss-if+refine5"),
       Setting("ms-if+samples4@1e-1", "ms-if", 0.1, (("samples_per_sequence", 4),), "ms-if+samples4"),
       Setting("ss-if+samples4@1e-1", "ss-if", 0.1, (("samples_per_sequence", 4),), "ss-if+samples4")]
)


@dataclass
class TrainConfig:
    """How every pair of a world is trained (``factworld.train_loop``'s loop: AdamW, warm-up, decay)."""

    hidden: int = 64
    layers: int = 2
    heads: int = 4
    pretrain_steps: int = 500
    finetune_steps: int = 100
    pretrain_lr: float = 3e-3
    finetune_lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0


@dataclass
class WorldSpec:
    name: str
    kind: str  # "fact" (factworld.generate) or "hard" (hardworld.generate_hard)
    params: dict
    train: TrainConfig = field(default_factory=TrainConfig)


# Sized so that one pair trains in about 8-12 s on one core (measured: 24 subjects, hidden 64,
# 400 + 80 steps); 24 held-out queries per world.
WORLDS = {
    "factworld": WorldSpec("factworld", "fact", {"seed": 0, "num_subjects": 24, "test_fraction": 1 / 3},
                           TrainConfig(pretrain_steps=400, finetune_steps=80)),
    "hardworld": WorldSpec("hardworld", "hard", {"seed": 0, "num_subjects": 24, "test_fraction": 1 / 3},
                           TrainConfig(hidden=128, pretrain_steps=600, finetune_steps=80)),
}


@functools.lru_cache(maxsize=4)
def build_world(kind: str, params_json: str):
    from bench.hardworld import generate_hard
    from hub_msif.toy.factworld import generate

    params = json.loads(params_json)
    return generate(**params) if kind == "fact" else generate_hard(**params)


def world_of(spec: WorldSpec):
    return build_world(spec.kind, json.dumps(spec.params, sort_keys=True))


def world_hash(spec: WorldSpec) -> str:
    world = world_of(spec)
    blob = json.dumps({"v": CODE_VERSION, "kind": spec.kind, "params": spec.params, "train": asdict(spec.train),
                       "docs": [d["text"] for d in world.documents], "ft": world.finetune,
                       "queries": [asdict(q) for q in world.queries]}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pair_key(whash: str, keep: list[int] | None, seed: int) -> str:
    kept = "all" if keep is None else ",".join(map(str, sorted(keep)))
    return hashlib.sha256(f"{whash}|{seed}|{kept}".encode()).hexdigest()[:24]


# -- training and measuring one pair (runs in the worker processes) ------------------------------
@functools.lru_cache(maxsize=4)
def _tokenized(kind: str, params_json: str):
    from hub_msif.data import CorpusSpec, tokenize_corpus
    from hub_msif.toy.factworld import Rows, qa_sequences, world_tokenizer

    world = build_world(kind, params_json)
    tokenizer = world_tokenizer(world)  # from the whole world: every subset shares the vocabulary
    docs = tokenize_corpus(Rows(world.documents, ["id", "text", "fact_id"]), tokenizer,
                           CorpusSpec(data="factworld", max_length=64))[0]
    return world, tokenizer, docs, qa_sequences(tokenizer, world.finetune, world.template)


def query_tokens(tokenizer, world, query) -> tuple[list[int], list[int]]:
    """Prompt (templated, with BOS) and answer token ids, as ``Attributor.query_sequence`` makes them
    (``score_all`` checks that they agree, so the measured loss is the scored one)."""
    prompt = tokenizer(world.template.format(prompt=query.prompt), add_special_tokens=True)["input_ids"]
    return prompt, tokenizer(query.answer, add_special_tokens=False)["input_ids"]


def answer_losses(model, tokenizer, world) -> list[float]:
    """-log p(answer | templated prompt) of every held-out query (answer tokens only, summed)."""
    import torch

    out = []
    with torch.no_grad():
        for q in world.queries:
            prompt, answer = query_tokens(tokenizer, world, q)
            ids = torch.tensor([prompt + answer])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))
            out.append(float(-logp[positions, torch.tensor(answer)].sum()))
    return out


def train_and_measure(job: dict) -> dict:
    """Trains one pair (pre-training on the kept documents, then the fixed fine-tuning), measures
    every held-out query, writes the measurements to ``job["path"]`` (and the models to
    ``job["save"]`` when given)."""
    import torch

    from hub_msif.models import generate_answer
    from hub_msif.toy.examples import tiny_model
    from hub_msif.toy.factworld import train_loop

    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"
    started, cpu_started = time.perf_counter(), time.process_time()
    world, tokenizer, docs, qa = _tokenized(job["kind"], job["params"])
    t = TrainConfig(**job["train"])
    keep = job["keep"]
    model = tiny_model("gpt_neox", vocab_size=len(tokenizer), hidden=t.hidden, layers=t.layers, heads=t.heads,
                       ffn=4 * t.hidden, seed=t.seed, max_positions=64)
    train_loop(model, tokenizer, docs if keep is None else [docs[i] for i in keep], t.pretrain_steps, t.pretrain_lr,
           t.batch_size, job["seed"], "pre-training")
    if job.get("save"):
        model.save_pretrained(Path(job["save"]) / "pretrained")
        tokenizer.save_pretrained(Path(job["save"]) / "pretrained")
    train_loop(model, tokenizer, qa, t.finetune_steps, t.finetune_lr, t.batch_size, job["seed"] + 1, "fine-tuning")
    if job.get("save"):
        model.save_pretrained(Path(job["save"]) / "finetuned")
        tokenizer.save_pretrained(Path(job["save"]) / "finetuned")
    losses = answer_losses(model, tokenizer, world)
    correct = [generate_answer(model, tokenizer, world.template.format(prompt=q.prompt), max_new_tokens=4) == q.answer
               for q in world.queries]
    result = {"loss": losses, "correct": correct, "seconds": time.perf_counter() - started,
              "cpu_seconds": time.process_time() - cpu_started,
              "kept": None if keep is None else len(keep), "seed": job["seed"]}
    if not all(np.isfinite(losses)):
        raise FloatingPointError(f"pair {job['path']} gave a non-finite answer loss")
    atomic_write_json(job["path"], result)
    return result


def _worker_init() -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TQDM_DISABLE"] = "1"


def run_jobs(jobs: list[dict], workers: int, label: str, cached_only: bool = False) -> dict[str, dict]:
    """Runs the jobs not cached yet (``workers`` processes), returns ``{path: result}`` for all;
    with ``cached_only`` trains nothing and returns the cached ones only."""
    jobs = list({j["path"]: j for j in jobs}.values())  # identical pairs (same kept set) train once
    todo = [j for j in jobs if not Path(j["path"]).is_file()]
    if cached_only:
        print(f"{label}: {len(jobs)} pairs, {len(jobs) - len(todo)} cached (--cached-only: training none)", flush=True)
        return {j["path"]: json.loads(Path(j["path"]).read_text()) for j in jobs if Path(j["path"]).is_file()}
    started = time.perf_counter()
    print(f"{label}: {len(jobs)} pairs, {len(jobs) - len(todo)} cached, training {len(todo)} on {workers} worker(s)",
          flush=True)
    if todo:
        if workers > 1:
            with multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init) as pool:
                for done, _ in enumerate(pool.imap_unordered(train_and_measure, todo), start=1):
                    if done % 10 == 0 or done == len(todo):
                        print(f"  {done}/{len(todo)} pairs, {time.perf_counter() - started:.0f}s", flush=True)
        else:
            for done, job in enumerate(todo, start=1):
                train_and_measure(job)
                if done % 10 == 0 or done == len(todo):
                    print(f"  {done}/{len(todo)} pairs, {time.perf_counter() - started:.0f}s", flush=True)
    return {j["path"]: json.loads(Path(j["path"]).read_text()) for j in jobs}


# -- scoring with the full pair -----------------------------------------------------------------
def score_all(spec: WorldSpec, folder: Path, settings: list[Setting]) -> tuple[dict[str, np.ndarray], float]:
    """``{setting name: scores [D, Q]}`` of every pre-training document for every held-out query
    under the full pair's factors (fitted here when missing); cached in ``scores.safetensors``."""
    import torch
    from safetensors.torch import load_file, save_file

    from hub_msif.attribution.attributor import Attributor
    from hub_msif.toy.demo import fitted_factors
    from hub_msif.toy.factworld import save_world

    world = world_of(spec)
    names_blob = json.dumps([asdict(s) for s in settings], sort_keys=True)
    cache = folder / "scores.safetensors"
    meta = folder / "scores.json"
    if cache.is_file() and meta.is_file() and json.loads(meta.read_text()).get("settings") == names_blob:
        loaded = load_file(cache)
        return {s.name: loaded[s.name].numpy() for s in settings}, json.loads(meta.read_text())["seconds"]
    started = time.perf_counter()
    paths = save_world(world, folder / "world")
    factors = fitted_factors(folder / "full", paths, world, folder)
    att = Attributor(factors)
    attributors = {(): att}

    def attributor(options: tuple) -> Attributor:
        """Options are Attributor settings, except ``samples_per_sequence``, which selects factors
        fitted with that many label samples per sequence."""
        if options not in attributors:
            settings = dict(options)
            samples = settings.pop("samples_per_sequence", 1)
            attributors[options] = Attributor(fitted_factors(folder / "full", paths, world, folder, samples),
                                              **settings)
        return attributors[options]
    for q in world.queries:  # the scored query is the measured one
        prompt, answer = query_tokens(att.tokenizer, world, q)
        if att.query_sequence(q.prompt, q.answer) != {"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer}:
            raise AssertionError(f"{spec.name}: the scored query {q.prompt!r} is tokenized unlike the measured one")
    texts = [d["text"] for d in world.documents]
    queries = [(q.prompt, q.answer) for q in world.queries]
    out: dict[str, list] = {}
    groups: dict[tuple, list[Setting]] = {}
    for s in settings:
        groups.setdefault(s.options, []).append(s)
    for options, members in groups.items():
        methods = list(dict.fromkeys(s.method for s in members))
        dampings = list(dict.fromkeys(s.damping for s in members if s.damping is not None)) or [0.1]
        for start in range(0, len(queries), 8):
            chunk = queries[start : start + 8]
            got = {(r.method, r.damping): r.total
                   for r in attributor(options).score_methods(chunk, texts, methods, dampings, batch_size=16)}
            for s in members:
                out.setdefault(s.name, []).append(got[(s.method, s.damping)].double())
    scores = {name: torch.cat(parts, dim=1).contiguous() for name, parts in out.items()}
    for name, value in scores.items():
        if not bool(torch.isfinite(value).all()):
            raise FloatingPointError(f"{spec.name}: setting {name} gave non-finite scores")
    seconds = time.perf_counter() - started
    tmp = folder / ".scores.safetensors.tmp"
    save_file(scores, str(tmp))
    os.replace(tmp, cache)
    atomic_write_json(meta, {"settings": names_blob, "seconds": seconds})
    return {k: v.numpy() for k, v in scores.items()}, seconds


# -- the benchmark ------------------------------------------------------------------------------
def subset_masks(num_docs: int, subsets: int, seed: int) -> np.ndarray:
    """``[M, D]`` 0/1: each row keeps a random half of the documents (seeded)."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((subsets, num_docs), dtype=np.int8)
    for m in range(subsets):
        masks[m, rng.choice(num_docs, num_docs // 2, replace=False)] = 1
    return masks


def job(spec: WorldSpec, folder: Path, whash: str, keep: list[int] | None, seed: int, save: Path | None = None) -> dict:
    key = pair_key(whash, keep, seed)
    return {"kind": spec.kind, "params": json.dumps(spec.params, sort_keys=True), "train": asdict(spec.train),
            "keep": keep, "seed": seed, "path": str(folder / "pairs" / f"{key}.json"),
            "save": str(save) if save else None}


def run_world(spec: WorldSpec, args, cache: Path) -> dict:
    world = world_of(spec)
    whash = world_hash(spec)
    folder = cache / f"{spec.name}-{whash}"
    folder.mkdir(parents=True, exist_ok=True)
    num_docs, seed = len(world.documents), spec.train.seed
    started = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. the full pair (its models are kept for fitting and scoring)
    full_models = folder / "full"
    full_job = job(spec, folder, whash, None, seed, save=full_models)
    if not (full_models / "finetuned" / "config.json").is_file():
        Path(full_job["path"]).unlink(missing_ok=True)
    full = run_jobs([full_job], 1, f"{spec.name}: full pair", args.cached_only).get(full_job["path"])
    if full is None:
        raise NotReady(f"{spec.name}: the full pair is not in the cache {folder}; run without --cached-only")
    timings["full_pair_training"] = full["seconds"]
    (full_models / "training.json").write_text(json.dumps({"test_accuracy": float(np.mean(full["correct"]))}))
    accuracy = float(np.mean(full["correct"]))
    print(f"{spec.name}: {num_docs} documents, {len(world.finetune)} fine-tuning pairs, {len(world.queries)} held-out "
          f"queries; full pair answers {accuracy:.0%} of them (one pair trains in {full['seconds']:.1f}s)", flush=True)

    # 2. scores of every setting under the full pair
    scores, timings["fit_and_score"] = score_all(spec, folder, SETTINGS)

    # 3. LDS over M half subsets
    masks = subset_masks(num_docs, args.subsets, seed=1000 + seed)
    lds_jobs = [job(spec, folder, whash, np.flatnonzero(m).tolist(), seed) for m in masks]
    t0 = time.perf_counter()
    results = run_jobs(lds_jobs, args.workers, f"{spec.name}: LDS subsets", args.cached_only)
    timings["lds_training"] = time.perf_counter() - t0
    have = [m for m, j in enumerate(lds_jobs) if j["path"] in results]  # all of them unless --cached-only
    if len(have) < 3:
        raise NotReady(f"{spec.name}: only {len(have)} of {len(lds_jobs)} subset pairs are trained; need 3 for an LDS")
    masks, lds_jobs = masks[have], [lds_jobs[m] for m in have]
    measured = -np.array([results[j["path"]]["loss"] for j in lds_jobs])  # [M, Q] answer log-probabilities
    lds_out, per_query_lds = {}, {}
    for s in SETTINGS:
        per_query = lds.lds_per_query(scores[s.name], masks, measured)
        per_query_lds[s.name] = [None if not np.isfinite(v) else float(v) for v in per_query]
        lds_out[s.name] = lds.summarize_lds(per_query, seed=0)
    best = {}
    for family in dict.fromkeys(s.key for s in SETTINGS):
        mine = [s for s in SETTINGS if s.key == family]
        best[family] = max(mine, key=lambda s: lds_out[s.name]["mean"]).name
    # Fact tracing over the whole pre-training corpus: reciprocal rank of a query's best-ranked
    # true proponent under each setting (the documents that state the fact the query asks for).
    proponent_sets = [{i for i, d in enumerate(world.documents) if d["fact_id"] == q.fact_id} for q in world.queries]
    mrr = {s.name: float(np.mean([lds.reciprocal_rank(scores[s.name][:, q], proponent_sets[q])
                                  for q in range(len(world.queries))])) for s in SETTINGS}
    lds_table = {family: lds_out[name] for family, name in best.items()}
    lds_table.update({s.name: lds_out[s.name] for s in SETTINGS if s.name != s.key})

    # 4. top-k removal
    order = sorted(range(len(world.queries)), key=lambda q: (not full["correct"][q], q))
    chosen = order[: args.removal_queries]
    removal_jobs: dict[str, list[tuple[int, dict]]] = {}
    for q in chosen:
        query = world.queries[q]
        for family in REMOVAL_FAMILIES:
            top = set(lds.top_k(scores[best[family]][:, q], args.top_k))
            removal_jobs.setdefault(family, []).append(
                (q, job(spec, folder, whash, [i for i in range(num_docs) if i not in top], seed)))
        proponents = {i for i, d in enumerate(world.documents) if d["fact_id"] == query.fact_id}
        removal_jobs.setdefault("true-proponents", []).append(
            (q, job(spec, folder, whash, [i for i in range(num_docs) if i not in proponents], seed)))
    # Random removals do not depend on the query: each draw is one retrained pair, measured on
    # every chosen query; the spread over draws is the retraining noise.
    for draw in range(args.random_draws):
        rng = random.Random(f"{whash}-random-{draw}")
        gone = set(rng.sample(range(num_docs), args.top_k))
        random_job = job(spec, folder, whash, [i for i in range(num_docs) if i not in gone], seed)
        removal_jobs[f"random#{draw}"] = [(q, random_job) for q in chosen]
    t0 = time.perf_counter()
    # Query-major order (the random draws first): an interrupted run has every method on its first queries.
    randoms = [pairs[0][1] for family, pairs in removal_jobs.items() if family.startswith("random#")]
    per_query_jobs = [pairs[i][1] for i in range(len(chosen)) for family, pairs in removal_jobs.items()
                      if not family.startswith("random#")]
    done = run_jobs(randoms + per_query_jobs, args.workers, f"{spec.name}: removals", args.cached_only)
    timings["removal_training"] = time.perf_counter() - t0
    removal_jobs = {family: [(q, j) for q, j in pairs if j["path"] in done] for family, pairs in removal_jobs.items()}
    removal_jobs = {family: pairs for family, pairs in removal_jobs.items() if pairs}

    def summary(pairs):
        qs = [q for q, _ in pairs]
        return lds.removal_summary([full["loss"][q] for q in qs], [done[j["path"]]["loss"][q] for q, j in pairs],
                                   [full["correct"][q] for q in qs], [done[j["path"]]["correct"][q] for q, j in pairs])

    removal = {family: summary(pairs) for family, pairs in removal_jobs.items() if not family.startswith("random#")}
    random_pairs = [p for family, pairs in removal_jobs.items() if family.startswith("random#") for p in pairs]
    if random_pairs:
        removal["random"] = summary(random_pairs)
        removal["random"]["per_draw_loss_increase"] = [
            summary(pairs)["loss_increase"] for family, pairs in removal_jobs.items() if family.startswith("random#")]
    per_query_increase = {family: [done[j["path"]]["loss"][q] - full["loss"][q] for q, j in pairs]
                          for family, pairs in removal_jobs.items()}
    # Retraining noise: how much two random removals of k documents disagree on the same query.
    draws_done = [f"random#{d}" for d in range(args.random_draws) if f"random#{d}" in per_query_increase]
    if len(draws_done) >= 2:
        spread = np.array([per_query_increase[d] for d in draws_done])  # [R, queries]
        removal["random"]["seed_noise_std"] = float(np.sqrt(spread.var(axis=0, ddof=1).mean()))
    proponent_hits = {family: float(np.mean([
        len(set(lds.top_k(scores[best[family]][:, q], args.top_k))
            & {i for i, d in enumerate(world.documents) if d["fact_id"] == world.queries[q].fact_id})
        / len(world.queries[q].proponents) for q in chosen])) for family in REMOVAL_FAMILIES}
    pair_seconds = [r["seconds"] for r in results.values()] + [r["seconds"] for r in done.values()]
    pair_cpu = [r["cpu_seconds"] for r in list(results.values()) + list(done.values()) if "cpu_seconds" in r]
    timings["total"] = time.perf_counter() - started
    public = {"accuracy": accuracy,
              "lds": {k: {"mean": v["mean"], "ci": v["ci"]} for k, v in lds_table.items()},
              "mrr": {k: mrr[best.get(k, k)] for k in lds_table},
              "removal": {k: {"loss_increase": v["loss_increase"], "flip_rate": v["flip_rate"]} for k, v in removal.items()}}
    details = {"hash": whash, "spec": {"kind": spec.kind, "params": spec.params, "train": asdict(spec.train)},
               "documents": num_docs, "finetune_pairs": len(world.finetune), "queries": len(world.queries),
               "finetune_accuracy_note": "accuracy = greedy answer of the full pair on held-out queries",
               "best_settings": best, "lds": lds_out, "fact_tracing_mrr": mrr, "lds_per_query": per_query_lds, "removal": removal,
               "removal_queries": [world.queries[q].prompt for q in chosen],
               "removal_per_query_increase": per_query_increase, "top_k_proponent_recall": proponent_hits,
               "subsets": len(have), "subsets_planned": args.subsets, "top_k": args.top_k,
               "random_draws": len(draws_done),
               "removal_pairs": {family: len(pairs) for family, pairs in removal_jobs.items()},
               "complete": len(have) == args.subsets and len(done) == len({j["path"] for j in randoms + per_query_jobs}),
               "pairs_trained": len(pair_seconds) + 1,
               "pair_seconds": {"mean": float(np.mean(pair_seconds)), "max": float(np.max(pair_seconds)),
                                "cpu_mean": float(np.mean(pair_cpu)) if pair_cpu else None},
               "load_average_end": list(os.getloadavg()),
               "seconds": timings}
    return {"public": public, "details": details}


def plot(details: dict, path: Path) -> None:
    """Per world: LDS mean (95% CI) of every setting, and the answer-loss increase of each removal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = list(details)
    fig, axes = plt.subplots(len(worlds), 2, figsize=(13, 3.8 * len(worlds)), dpi=100, layout="constrained",
                             squeeze=False)
    for row, name in enumerate(worlds):
        d = details[name]
        names = [s.name for s in SETTINGS]
        means = [d["lds"][n]["mean"] for n in names]
        errs = np.array([[d["lds"][n]["mean"] - d["lds"][n]["ci"][0], d["lds"][n]["ci"][1] - d["lds"][n]["mean"]]
                         for n in names]).T
        colours = ["tab:blue" if n.startswith("ms-if") else "tab:orange" if n.startswith("ss-if") else "tab:gray"
                   for n in names]
        ax = axes[row, 0]
        ax.bar(range(len(names)), means, yerr=errs, color=colours, capsize=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_ylabel("LDS (Spearman)")
        ax.set_title(f"{name}: multi-stage LDS, M = {d['subsets']} (bars: 95% bootstrap CI)", loc="left")
        ax = axes[row, 1]
        keys = list(d["removal"])
        vals = [d["removal"][k]["loss_increase"] for k in keys]
        errs = np.array([[d["removal"][k]["loss_increase"] - d["removal"][k]["loss_increase_ci"][0],
                          d["removal"][k]["loss_increase_ci"][1] - d["removal"][k]["loss_increase"]] for k in keys]).T
        ax.bar(range(len(keys)), vals, yerr=errs, color="tab:green", capsize=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(keys)), keys, rotation=30, ha="right")
        ax.set_ylabel("answer loss increase (nats)")
        ax.set_title(f"{name}: remove top {d['top_k']} and retrain", loc="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    from hub_msif.artifacts.local_folders import cache_root

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default=",".join(WORLDS))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--subsets", type=int, default=32, help="M half-corpus pairs for LDS")
    parser.add_argument("--removal-queries", type=int, default=20)
    parser.add_argument("--random-draws", type=int, default=4, help="random removals (one pair each)")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--pretrain-steps", type=int, default=0, help="override every world's (0: keep)")
    parser.add_argument("--finetune-steps", type=int, default=0, help="override every world's (0: keep)")
    parser.add_argument("--cached-only", action="store_true",
                        help="train nothing: report from the pairs already in the cache (a partial run says so)")
    parser.add_argument("--cache", default=str(cache_root() / "bench" / "counterfactual"))
    parser.add_argument("--out", default="bench/out/counterfactual.json")
    args = parser.parse_args(argv)
    names = [w for w in args.worlds.split(",") if w]
    unknown = [w for w in names if w not in WORLDS]
    if unknown or not names:
        parser.error(f"unknown world {(unknown or [''])[0]!r}; use {', '.join(WORLDS)}")
    if args.subsets < 2 or args.workers < 1 or args.top_k < 1 or args.removal_queries < 1 or args.random_draws < 1:
        parser.error("--subsets must be >= 2 and --workers, --top-k, --removal-queries, --random-draws >= 1")
    os.environ["TQDM_DISABLE"] = "1"
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    public, details = {}, {}
    for name in names:
        spec = WORLDS[name]
        if args.pretrain_steps or args.finetune_steps:
            train = asdict(spec.train)
            train.update({k: v for k, v in (("pretrain_steps", args.pretrain_steps),
                                            ("finetune_steps", args.finetune_steps)) if v})
            spec = WorldSpec(spec.name, spec.kind, spec.params, TrainConfig(**train))
        try:
            result = run_world(spec, args, Path(args.cache))
        except NotReady as err:
            print(f"{err}; leaving this world out", flush=True)
            continue
        public[name], details[name] = result["public"], result["details"]
        d = result["details"]
        print(f"{name}: best {d['best_settings']}; " + ", ".join(
            f"{k} LDS {v['mean']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]" for k, v in result["public"]["lds"].items()
            if k in FAMILIES), flush=True)
        print(f"{name}: removal " + ", ".join(f"{k} {v['loss_increase']:+.3f} nats, flips {v['flip_rate']}"
                                             for k, v in result["public"]["removal"].items()), flush=True)
    if not public:
        raise SystemExit("no world has enough trained pairs to report")
    out = Path(args.out)
    atomic_write_json(out, {"worlds": public})
    seconds = time.perf_counter() - started
    atomic_write_json(out.with_name("counterfactual_details.json"),
                      {"worlds": details, "seconds": seconds, "workers": args.workers, "cached_only": args.cached_only,
                       "command": "make bench-counterfactual",
                       "settings": [asdict(s) for s in SETTINGS]})
    plot(details, out.with_name("counterfactual.png"))
    print(f"wrote {out}, counterfactual_details.json and counterfactual.png in {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
