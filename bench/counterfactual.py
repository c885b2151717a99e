"""Counterfactual benchmarks of multi-stage attribution (issues 11, 19): held-out multi-stage LDS
and top-k removal, with paired seeds, a ceiling, and settings chosen on other queries.

For each world (the demo's fact world at bench size, and the harder world of ``bench.hardworld``):

1. **The full pair**: pre-trained on the whole pre-training corpus, fine-tuned on the Q&A pairs
   (``factworld.train_loop``, tiny GPT-NeoX), once per seed of ``--seeds``; the first seed's pair
   is attributed: both stages' factors fitted with ``fit_stage`` (as the demo does), and every
   method setting of ``SETTINGS`` scores every pre-training document for every held-out query.
2. **Fixed schedule, paired seeds**: every pair of a seed trains along the full corpus's batch
   schedule with the removed documents masked out of their batches (``factworld.masked_schedule``),
   from that seed's initialisation; a measured effect is the mean over the seeds of (subset or
   removal pair - the same seed's full pair), so retraining noise shrinks with the seeds.
3. **Known facts only**: queries are evaluated only where the attributed pair answers right and
   the answer's log-probability beats the relation's most frequent other answer by ``MARGIN`` nats
   (mean over seeds).
4. **Held-out settings**: a seeded split of the queries into two halves; each method's setting
   (damping, per-stage dampings, contrastive query, unit normalisation) is chosen by mean LDS on
   the ``select`` half and everything is reported on the ``report`` half, for every method alike.
5. **LDS**: ``--subsets`` half-corpus masks, each trained under every seed; a query's LDS is the
   Spearman correlation over the masks between the predicted effect (sum of the kept documents'
   scores) and the seed-averaged answer log-probability (``bench.lds``). **Ceiling**: the
   proponent-indicator score (1 on the fact's proponents, 0 elsewhere).
6. **Top-k removal**: for ``--removal-queries`` known report-half queries, each method's top
   ``--top-k`` (chosen setting) are removed and the pair retrained under every seed; beside them
   the true proponents (the removal ceiling) and ``--random-draws`` random draws of k documents,
   whose spread over draws (seed-averaged) is the noise floor (``random_spread``).
7. Every difference "A beats B" is a paired difference over the same queries with a bootstrap 95%
   interval; A beats B only when the interval excludes 0.

Every trained pair's measurements are cached under ``--cache`` (one JSON per pair, keyed by a
hash of the world, the training settings, the seed and the kept documents; atomic writes), so a
rerun resumes; the attributed pair's models and factors are kept there too. Writes ``--out``
(``counterfactual.json``) and ``counterfactual_details.json`` + ``counterfactual.png`` beside it.

    .venv/bin/python -m bench.counterfactual [--workers 2] [--seeds 3] [--subsets 16]
        [--removal-queries 8] [--random-draws 4] [--worlds factworld,hardworld] [--cache DIR]
"""

from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import json
import multiprocessing
import os
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # noqa: E402 -- before anything imports tqdm: no progress bars in the log

from bench import lds
from hub_msif.artifacts.atomic import atomic_write_json

CODE_VERSION = 2  # bump when training or measurement changes, so cached pairs are not reused
DAMPINGS = ("1e-4", "1e-3", "1e-2", "1e-1", "1")
STAGE_DAMPINGS = ("1e-2", "1e-1", "1")
FAMILIES = ("ms-if", "ss-if", "gdp", "repsim", "bm25")
REMOVAL_FAMILIES = ("ms-if", "ss-if", "bm25", "gdp")
DEFAULT_SETTING = "ms-if@1e-1"  # the product's default (Attributor: ms-if, relative damping 0.1)
MARGIN = 1.0  # nats by which a known answer's log-probability beats the relation's most frequent other answer


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
    # Issue 19's levers, all in their method's family (chosen on the select half like the dampings):
    # per-stage dampings (the call's damping is the pre-trained stage's, damping_finetuned replaces
    # the fine-tuned one), the contrastive subject query, and unit-normalised scores.
    + [Setting(f"ms-if@pt{p}/ft{f}", "ms-if", float(p), (("damping_finetuned", float(f)),))
       for f in STAGE_DAMPINGS for p in STAGE_DAMPINGS if p != f]
    + [Setting(f"{m}+contrast@{d}", m, float(d), (("contrast", "subject"),)) for m in ("ms-if", "ss-if")
       for d in STAGE_DAMPINGS]
    + [Setting(f"{m}+norm@1e-1", m, 0.1, (("normalize", True),)) for m in ("ms-if", "ss-if")]
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


def relation_of(world, query) -> str:
    return next(f.relation for f in world.facts if f.id == query.fact_id)


def subject_of(world, query) -> str:
    """The subject's text as the query's prompt names it (the harder world's question alias)."""
    alias = world.config.get("question_alias", {}).get(query.fact_id)
    return alias or next(f.subject for f in world.facts if f.id == query.fact_id)


def relation_defaults(world) -> dict[str, list[str]]:
    """Each relation's fine-tuning answers, most frequent first (ties: alphabetical)."""
    relation = {f.id: f.relation for f in world.facts}
    counts: dict[str, collections.Counter] = {}
    for row in world.finetune:
        counts.setdefault(relation[row["fact_id"]], collections.Counter())[row["response"]] += 1
    return {rel: sorted(c, key=lambda a: (-c[a], a)) for rel, c in counts.items()}


def rival_answers(world) -> list[str]:
    """Per query, the relation's most frequent fine-tuning answer other than the true one: the
    answer a model that does not know the fact falls back on."""
    defaults = relation_defaults(world)
    return [next(a for a in defaults[relation_of(world, q)] if a != q.answer) for q in world.queries]


def answer_losses(model, tokenizer, world, answers: list[str] | None = None) -> list[float]:
    """-log p(answer | templated prompt) of every held-out query (answer tokens only, summed); with
    ``answers``, of those answers instead of the true ones."""
    import torch

    out = []
    with torch.no_grad():
        for i, q in enumerate(world.queries):
            prompt, answer = query_tokens(tokenizer, world, q)
            if answers is not None:
                answer = tokenizer(answers[i], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + answer])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))
            out.append(float(-logp[positions, torch.tensor(answer)].sum()))
    return out


def train_and_measure(job: dict) -> dict:
    """Trains one pair of seed ``job["seed"]`` (its initialisation and batch schedule): pre-training
    along the whole corpus's schedule with the documents outside ``job["keep"]`` masked, then the
    fixed fine-tuning; measures every held-out query (and its rival answer), writes the
    measurements to ``job["path"]`` (and the models to ``job["save"]`` when given)."""
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
                       ffn=4 * t.hidden, seed=job["seed"], max_positions=64)
    train_loop(model, tokenizer, docs, t.pretrain_steps, t.pretrain_lr, t.batch_size, job["seed"], "pre-training",
               keep=None if keep is None else set(keep))
    if job.get("save"):
        model.save_pretrained(Path(job["save"]) / "pretrained")
        tokenizer.save_pretrained(Path(job["save"]) / "pretrained")
    train_loop(model, tokenizer, qa, t.finetune_steps, t.finetune_lr, t.batch_size, job["seed"] + 1, "fine-tuning")
    if job.get("save"):
        model.save_pretrained(Path(job["save"]) / "finetuned")
        tokenizer.save_pretrained(Path(job["save"]) / "finetuned")
    losses = answer_losses(model, tokenizer, world)
    rival = answer_losses(model, tokenizer, world, rival_answers(world))
    correct = [generate_answer(model, tokenizer, world.template.format(prompt=q.prompt), max_new_tokens=4) == q.answer
               for q in world.queries]
    result = {"loss": losses, "rival_loss": rival, "correct": correct, "seconds": time.perf_counter() - started,
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
def score_all(spec: WorldSpec, folder: Path, settings: list[Setting]) -> tuple[dict[str, np.ndarray], dict, float]:
    """``{setting name: scores [D, Q]}`` of every pre-training document for every held-out query
    under the attributed pair's factors (fitted here when missing), the MS-IF settings' per-module
    scores ``{setting: {module: [D, Q]}}`` and the seconds it took; cached in ``scores.safetensors``."""
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
        loaded = {k: v.numpy() for k, v in load_file(cache).items()}
        return ({s.name: loaded[s.name] for s in settings}, _per_module(loaded),
                json.loads(meta.read_text())["seconds"])
    started = time.perf_counter()
    paths = save_world(world, folder / "world")
    factors = fitted_factors(folder / "full", paths, world, folder)
    att = Attributor(factors)
    attributors = {(): att}

    subjects = {q.prompt: subject_of(world, q) for q in world.queries}

    def attributor(options: tuple) -> Attributor:
        """Options are Attributor settings; a contrastive one is given each prompt's subject."""
        if options not in attributors:
            settings = dict(options)
            if "contrast" in settings:
                settings["subject"] = subjects
            attributors[options] = Attributor(factors, **settings)
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
            got = {(r.method, r.damping): r
                   for r in attributor(options).score_methods(chunk, texts, methods, dampings, batch_size=16)}
            for s in members:
                result = got[(s.method, s.damping)]
                out.setdefault(s.name, []).append(result.total.double())
                if s.method == "ms-if" and result.per_module is not None:
                    for module, value in result.per_module.items():
                        out.setdefault(f"{s.name}|{module}", []).append(value.double())
    scores = {name: torch.cat(parts, dim=1).contiguous() for name, parts in out.items()}
    for name, value in scores.items():
        if not bool(torch.isfinite(value).all()):
            raise FloatingPointError(f"{spec.name}: setting {name} gave non-finite scores")
    seconds = time.perf_counter() - started
    tmp = folder / ".scores.safetensors.tmp"
    save_file(scores, str(tmp))
    os.replace(tmp, cache)
    atomic_write_json(meta, {"settings": names_blob, "seconds": seconds, "roles": att.roles})
    loaded = {k: v.numpy() for k, v in scores.items()}
    return {s.name: loaded[s.name] for s in settings}, _per_module(loaded), seconds


def _per_module(loaded: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, value in loaded.items():
        if "|" in key:
            name, module = key.split("|", 1)
            out.setdefault(name, {})[module] = value
    return out


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
    num_docs, queries = len(world.documents), world.queries
    num_queries = len(queries)
    seeds = [spec.train.seed + i for i in range(args.seeds)]
    started = time.perf_counter()
    timings: dict[str, float] = {}

    # 1. the full pair of every seed (the first seed's models are kept for fitting and scoring)
    full_models = folder / "full"
    full_jobs = {s: job(spec, folder, whash, None, s, save=full_models if s == seeds[0] else None) for s in seeds}
    if not (full_models / "finetuned" / "config.json").is_file():
        Path(full_jobs[seeds[0]]["path"]).unlink(missing_ok=True)
    got = run_jobs(list(full_jobs.values()), args.workers, f"{spec.name}: full pairs", args.cached_only)
    if any(j["path"] not in got for j in full_jobs.values()):
        raise NotReady(f"{spec.name}: the full pairs are not all in the cache {folder}; run without --cached-only")
    full = {s: got[j["path"]] for s, j in full_jobs.items()}
    scored = full[seeds[0]]
    timings["full_pair_training"] = scored["seconds"]
    full_loss = np.array([full[s]["loss"] for s in seeds])  # [S, Q]
    margin = np.mean([np.array(full[s]["rival_loss"]) - np.array(full[s]["loss"]) for s in seeds], axis=0)
    known = [q for q in range(num_queries) if scored["correct"][q] and margin[q] >= MARGIN]
    defaults = {rel: answers[0] for rel, answers in relation_defaults(world).items()}
    nondefault = [q for q in range(num_queries) if queries[q].answer != defaults[relation_of(world, queries[q])]]
    accuracy = float(np.mean(scored["correct"]))
    accuracy_nondefault = float(np.mean([scored["correct"][q] for q in nondefault])) if nondefault else None
    (full_models / "training.json").write_text(json.dumps({"test_accuracy": accuracy}))
    select, report = lds.heldout_split(num_queries, seed=args.split_seed)
    select_known, report_known = [q for q in select if q in known], [q for q in report if q in known]
    print(f"{spec.name}: {num_docs} documents, {len(world.finetune)} fine-tuning pairs, {num_queries} held-out queries; "
          f"the attributed pair answers {accuracy:.0%} ({accuracy_nondefault:.0%} of the {len(nondefault)} with a "
          f"non-default answer); {len(known)} known with a margin >= {MARGIN} nats ({len(select_known)} select, "
          f"{len(report_known)} report); one pair trains in {scored['seconds']:.1f}s", flush=True)
    if len(select_known) < 2 or len(report_known) < 2:
        raise NotReady(f"{spec.name}: too few known queries in a half ({len(select_known)}, {len(report_known)})")

    # 2. scores of every setting under the attributed pair
    scores, per_module, timings["fit_and_score"] = score_all(spec, folder, SETTINGS)
    roles = json.loads((folder / "scores.json").read_text())["roles"]
    proponent_sets = [{i for i, d in enumerate(world.documents) if d["fact_id"] == q.fact_id} for q in queries]
    ceiling = lds.indicator_scores(num_docs, proponent_sets)

    # 3. LDS over M half subsets, each under every seed (seed-averaged measured log-probability)
    masks = subset_masks(num_docs, args.subsets, seed=1000 + spec.train.seed)
    lds_jobs = [[job(spec, folder, whash, np.flatnonzero(m).tolist(), s) for s in seeds] for m in masks]
    t0 = time.perf_counter()
    results = run_jobs([j for row in lds_jobs for j in row], args.workers, f"{spec.name}: LDS subsets",
                       args.cached_only)
    timings["lds_training"] = time.perf_counter() - t0
    have = [m for m, row in enumerate(lds_jobs) if all(j["path"] in results for j in row)]
    if len(have) < 3:
        raise NotReady(f"{spec.name}: only {len(have)} of {len(lds_jobs)} subsets are trained under every seed")
    masks = masks[have]
    measured = -np.array([np.mean([results[j["path"]]["loss"] for j in lds_jobs[m]], axis=0) for m in have])  # [M, Q]
    per_query_lds = {s.name: lds.lds_per_query(scores[s.name], masks, measured) for s in SETTINGS}
    per_query_lds["ceiling"] = lds.lds_per_query(ceiling, masks, measured)
    rr = {name: np.array([lds.reciprocal_rank(value[:, q], proponent_sets[q]) for q in range(num_queries)])
          for name, value in list(scores.items())}

    def on(values, qs):
        return np.asarray(values, dtype=np.float64)[qs]

    best = {}
    for family in dict.fromkeys(s.key for s in SETTINGS):
        mine = [s for s in SETTINGS if s.key == family]
        best[family] = max(mine, key=lambda s: (np.nanmean(on(per_query_lds[s.name], select_known)), -mine.index(s))).name
    lds_report = {name: lds.summarize_lds(on(values, report_known)) for name, values in per_query_lds.items()}
    lds_select = {name: float(np.nanmean(on(values, select_known))) for name, values in per_query_lds.items()}
    mrr = {name: float(np.mean(on(values, report_known))) for name, values in rr.items()}
    chosen_ms = best["ms-if"]
    comparisons: dict[str, dict] = {}
    for other in ("ss-if", "bm25", "gdp", "repsim"):
        comparisons[f"ms-if vs {other}"] = {"lds": lds.paired_difference(
            on(per_query_lds[chosen_ms], report_known), on(per_query_lds[best[other]], report_known))}
    comparisons["ms-if (chosen) vs ms-if default"] = {"lds": lds.paired_difference(
        on(per_query_lds[chosen_ms], report_known), on(per_query_lds[DEFAULT_SETTING], report_known))}
    # Which parts carry the fact: the chosen MS-IF setting's scores summed per layer and per role.
    parts: dict[str, list[str]] = {}
    for module, role in roles.items():
        layer = re.search(r"\.(\d+)\.", module)
        parts.setdefault(f"layer {layer.group(1) if layer else '?'}", []).append(module)
        parts.setdefault(f"role {role}", []).append(module)
    by_part = {}
    for part, modules in sorted(parts.items()):
        value = sum(per_module[chosen_ms][m] for m in modules)
        part_lds = lds.lds_per_query(value, masks, measured)
        by_part[part] = {"modules": modules, "lds": lds.summarize_lds(on(part_lds, report_known)),
                         "mrr": float(np.mean([lds.reciprocal_rank(value[:, q], proponent_sets[q]) for q in report_known])),
                         "score_share": float(np.mean([np.abs(value[:, q]).sum() / np.abs(scores[chosen_ms][:, q]).sum()
                                                       for q in report_known]))}

    # 4. top-k removal on known report-half queries, every removal under every seed
    chosen = report_known[: args.removal_queries]
    removal_jobs: dict[str, dict[int, list[dict]]] = {}
    for q in chosen:
        for family in REMOVAL_FAMILIES:
            top = set(lds.top_k(scores[best[family]][:, q], args.top_k))
            keep = [i for i in range(num_docs) if i not in top]
            removal_jobs.setdefault(family, {})[q] = [job(spec, folder, whash, keep, s) for s in seeds]
        keep = [i for i in range(num_docs) if i not in proponent_sets[q]]
        removal_jobs.setdefault("true-proponents", {})[q] = [job(spec, folder, whash, keep, s) for s in seeds]
    for draw in range(args.random_draws):
        rng = random.Random(f"{whash}-random-{draw}")
        gone = set(rng.sample(range(num_docs), args.top_k))
        keep = [i for i in range(num_docs) if i not in gone]
        row = [job(spec, folder, whash, keep, s) for s in seeds]
        removal_jobs[f"random#{draw}"] = {q: row for q in chosen}
    t0 = time.perf_counter()
    randoms = [j for family, by_q in removal_jobs.items() if family.startswith("random#") for j in by_q[chosen[0]]]
    per_query_jobs = [j for q in chosen for family, by_q in removal_jobs.items() if not family.startswith("random#")
                      for j in by_q[q]]
    done = run_jobs(randoms + per_query_jobs, args.workers, f"{spec.name}: removals", args.cached_only)
    timings["removal_training"] = time.perf_counter() - t0
    increase: dict[str, dict[int, float]] = {}  # seed-averaged answer-loss increase per query
    flips: dict[str, list[int]] = {}  # [flips, right before] over (query, seed)
    single_seed: dict[str, dict[int, list[float]]] = {}
    for family, by_q in removal_jobs.items():
        for q, row in by_q.items():
            if not all(j["path"] in done for j in row):
                continue
            deltas = [done[j["path"]]["loss"][q] - full[s]["loss"][q] for s, j in zip(seeds, row)]
            increase.setdefault(family, {})[q] = float(np.mean(deltas))
            single_seed.setdefault(family, {})[q] = deltas
            counts = flips.setdefault(family, [0, 0])
            for s, j in zip(seeds, row):
                if full[s]["correct"][q]:
                    counts[1] += 1
                    counts[0] += int(not done[j["path"]]["correct"][q])
    draws = [f for f in increase if f.startswith("random#")]
    removal: dict[str, dict] = {}
    for family in [f for f in increase if not f.startswith("random#")]:
        values = list(increase[family].values())
        summary = lds.mean_with_ci(values)
        removal[family] = {"loss_increase": summary["mean"], "loss_increase_ci": summary["ci"], "queries": summary["n"],
                           "flip_rate": flips[family][0] / flips[family][1] if flips[family][1] else None,
                           "flips": flips[family][0], "right_before": flips[family][1]}
    random_spread = single_seed_spread = None
    if draws:
        pooled = [v for f in draws for v in increase[f].values()]
        summary = lds.mean_with_ci(pooled)
        total = [sum(flips[f][i] for f in draws) for i in (0, 1)]
        removal["random"] = {"loss_increase": summary["mean"], "loss_increase_ci": summary["ci"], "queries": summary["n"],
                             "flip_rate": total[0] / total[1] if total[1] else None, "flips": total[0],
                             "right_before": total[1],
                             "per_draw_loss_increase": [float(np.mean(list(increase[f].values()))) for f in draws]}
        common = [q for q in chosen if all(q in increase[f] for f in draws)]
        if len(draws) >= 2 and common:
            # the noise floor: how much two random removals of k documents disagree on one query
            random_spread = float(np.sqrt(np.mean([np.var([increase[f][q] for f in draws], ddof=1) for q in common])))
            single_seed_spread = float(np.sqrt(np.mean([np.var([single_seed[f][q][i] for f in draws], ddof=1)
                                                        for q in common for i in range(len(seeds))])))
    random_per_query = {q: float(np.mean([increase[f][q] for f in draws if q in increase[f]])) for q in chosen
                        if any(q in increase[f] for f in draws)}
    if "ms-if" in increase:
        for other in ("ss-if", "bm25", "gdp", "true-proponents"):
            qs = [q for q in chosen if q in increase["ms-if"] and q in increase.get(other, {})]
            if qs:
                comparisons.setdefault(f"ms-if vs {other}", {})["removal"] = lds.paired_difference(
                    [increase["ms-if"][q] for q in qs], [increase[other][q] for q in qs])
        qs = [q for q in chosen if q in increase["ms-if"] and q in random_per_query]
        if qs:
            comparisons.setdefault("ms-if vs random", {})["removal"] = lds.paired_difference(
                [increase["ms-if"][q] for q in qs], [random_per_query[q] for q in qs])
    proponent_hits = {family: float(np.mean([len(set(lds.top_k(scores[best[family]][:, q], args.top_k))
                                                 & proponent_sets[q]) / len(proponent_sets[q]) for q in chosen]))
                      for family in REMOVAL_FAMILIES}
    all_results = list(results.values()) + list(done.values()) + list(full.values())
    pair_seconds = [r["seconds"] for r in all_results]
    pair_cpu = [r["cpu_seconds"] for r in all_results if "cpu_seconds" in r]
    timings["total"] = time.perf_counter() - started
    families = {family: name for family, name in best.items()}
    public = {"accuracy": accuracy, "accuracy_nondefault": accuracy_nondefault, "known_queries": len(known),
              "heldout": True, "seeds": len(seeds), "chosen": families,
              "lds": {**{k: {"mean": lds_report[v]["mean"], "ci": lds_report[v]["ci"]} for k, v in families.items()},
                      **{s.name: {"mean": lds_report[s.name]["mean"], "ci": lds_report[s.name]["ci"]} for s in SETTINGS}},
              "mrr": {**{k: mrr[v] for k, v in families.items()}, **{s.name: mrr[s.name] for s in SETTINGS}},
              "removal": {k: {"loss_increase": v["loss_increase"], "ci": v["loss_increase_ci"], "flip_rate": v["flip_rate"]}
                          for k, v in removal.items()},
              "ceiling": {"lds": {"mean": lds_report["ceiling"]["mean"], "ci": lds_report["ceiling"]["ci"]},
                          "mrr": 1.0,
                          "removal": ({"loss_increase": removal["true-proponents"]["loss_increase"],
                                       "ci": removal["true-proponents"]["loss_increase_ci"],
                                       "flip_rate": removal["true-proponents"]["flip_rate"]}
                                      if "true-proponents" in removal else None)},
              "random_spread": random_spread,
              "comparisons": comparisons,
              "by_part": {k: {"lds": {"mean": v["lds"]["mean"], "ci": v["lds"]["ci"]}, "mrr": v["mrr"],
                              "score_share": v["score_share"]} for k, v in by_part.items()}}
    details = {"hash": whash, "spec": {"kind": spec.kind, "params": spec.params, "train": asdict(spec.train)},
               "documents": num_docs, "finetune_pairs": len(world.finetune), "queries": num_queries,
               "seeds": seeds, "split_seed": args.split_seed, "select": select, "report": report, "known": known,
               "select_known": select_known, "report_known": report_known, "margin_nats": MARGIN,
               "margins": margin.tolist(), "nondefault_queries": len(nondefault),
               "full_loss_seed_std": float(full_loss.std(axis=0, ddof=1).mean()) if len(seeds) > 1 else None,
               "best_settings": best, "lds_report": lds_report, "lds_select": lds_select, "mrr_report": mrr,
               "lds_per_query": {k: [None if not np.isfinite(v) else float(v) for v in vals]
                                 for k, vals in per_query_lds.items()},
               "by_part": by_part, "removal": removal, "comparisons": comparisons,
               "random_spread": random_spread, "random_spread_single_seed": single_seed_spread,
               "removal_queries": [queries[q].prompt for q in chosen],
               "removal_per_query_increase": {f: {str(q): v for q, v in d.items()} for f, d in increase.items()},
               "top_k_proponent_recall": proponent_hits,
               "subsets": len(have), "subsets_planned": args.subsets, "top_k": args.top_k,
               "random_draws": len(draws),
               "complete": len(have) == args.subsets and len(done) == len({j["path"] for j in randoms + per_query_jobs}),
               "removal_pairs_done": len(done), "removal_pairs_planned": len({j["path"] for j in randoms + per_query_jobs}),
               "pairs_trained": len(pair_seconds),
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
        names = [s.name for s in SETTINGS] + ["ceiling"]
        table = d["lds_report"]
        means = [table[n]["mean"] for n in names]
        errs = np.array([[table[n]["mean"] - table[n]["ci"][0], table[n]["ci"][1] - table[n]["mean"]]
                         for n in names]).T
        colours = ["tab:blue" if n.startswith("ms-if") else "tab:orange" if n.startswith("ss-if")
                   else "tab:green" if n == "ceiling" else "tab:gray" for n in names]
        ax = axes[row, 0]
        ax.bar(range(len(names)), means, yerr=errs, color=colours, capsize=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_ylabel("LDS (Spearman)")
        ax.set_title(f"{name}: held-out LDS on {len(d['report_known'])} known queries, M = {d['subsets']}, "
                     f"{len(d['seeds'])} seeds (95% CI)", loc="left")
        ax = axes[row, 1]
        keys = list(d["removal"])
        if not keys:
            ax.set_title(f"{name}: no removal pair trained yet", loc="left")
            continue
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
    parser.add_argument("--seeds", type=int, default=3, help="paired seeds every pair is trained under")
    parser.add_argument("--subsets", type=int, default=16, help="M half-corpus masks for LDS (each under every seed)")
    parser.add_argument("--removal-queries", type=int, default=8, help="known report-half queries for removal")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the select/report split of the queries")
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
    if args.subsets < 2 or args.workers < 1 or args.top_k < 1 or args.removal_queries < 1 or args.random_draws < 1 \
            or args.seeds < 1:
        parser.error("--subsets must be >= 2 and --workers, --seeds, --top-k, --removal-queries, --random-draws >= 1")
    os.environ["TQDM_DISABLE"] = "1"
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    load_start = list(os.getloadavg())
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
        print(f"{name}: chosen on the select half {d['best_settings']}; held-out LDS " + ", ".join(
            f"{k} {v['mean']:+.3f} [{v['ci'][0]:+.3f}, {v['ci'][1]:+.3f}]" for k, v in result["public"]["lds"].items()
            if k in FAMILIES) + f"; ceiling {result['public']['ceiling']['lds']['mean']:+.3f}", flush=True)
        print(f"{name}: removal " + ", ".join(f"{k} {v['loss_increase']:+.3f} nats, flips {v['flip_rate']}"
                                             for k, v in result["public"]["removal"].items())
              + f"; random spread {d['random_spread']}", flush=True)
    if not public:
        raise SystemExit("no world has enough trained pairs to report")
    out = Path(args.out)
    atomic_write_json(out, {"worlds": public})
    seconds = time.perf_counter() - started
    atomic_write_json(out.with_name("counterfactual_details.json"),
                      {"worlds": details, "seconds": seconds, "workers": args.workers, "cached_only": args.cached_only,
                       "command": "make bench-counterfactual", "argv": vars(args),
                       "load_average_start": load_start,
                       "settings": [asdict(s) for s in SETTINGS]})
    plot(details, out.with_name("counterfactual.png"))
    print(f"wrote {out}, counterfactual_details.json and counterfactual.png in {seconds:.0f}s", flush=True)


if __name__ == "__main__":
    main()
