"""The demo: the toy fact world end to end, with no account and no network.

Builds (or reuses from the cache) the fact world, its trained pre-trained / fine-tuned GPT-NeoX
pair, both stages' factors and the document index; publishes the factors and the index to a
Hub-compatible server of its own on loopback (``hub_msif.hub.server``), pulls them back by tag
into the Hugging Face cache, and attributes example answers of the fine-tuned model to
pre-training documents with MS-IF from the pulled copies.

``huggingface_hub`` reads where the Hub is (``HF_ENDPOINT``) when it is imported, so
``local_hub_environment`` must run first (``hub-msif demo`` does); without it, or with
``HF_ENDPOINT`` pointing elsewhere than loopback, the demo uses its local folders.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hub_msif.artifacts.local_folders import cache_root
from hub_msif.artifacts.manifest import check_stage_pair, read_manifest
from hub_msif.data import CorpusSpec
from hub_msif.errors import FactorError, RetrievalError
from hub_msif.factors.fit import FitConfig, fit_stage
from hub_msif.models import folder_revision
from hub_msif.toy.factworld import FactWorld, generate, save_world, train_pair

logger = logging.getLogger(__name__)
DEMO_SEED = 0
LOOPBACK = ("127.0.0.1", "localhost", "::1")
FACTORS_REPO, INDEX_REPO = "demo/factworld-factors", "demo/factworld-index"


def default_cache() -> Path:
    """Where the demo keeps its artifacts: ``$HUB_MSIF_CACHE/demo``, else ``~/.cache/hub_msif/demo``.
    The tests and benchmarks reuse the same fact world from here instead of training it again."""
    return cache_root() / "demo"


def local_hub_environment(cache: str | Path) -> bool:
    """Points ``huggingface_hub`` at a loopback Hub for the demo; call before anything imports it.

    With ``HF_ENDPOINT`` unset, picks a free loopback port and a Hugging Face cache under
    ``cache`` (the demo's repos never mix with a real Hub's cache); a loopback ``HF_ENDPOINT`` is
    kept. Returns False (and changes nothing) when another endpoint is set or
    ``huggingface_hub`` is already imported.
    """
    endpoint = os.environ.get("HF_ENDPOINT")
    if "huggingface_hub" in sys.modules or (endpoint and urlsplit(endpoint).hostname not in LOOPBACK):
        return False
    if not endpoint:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
        os.environ["HF_HUB_CACHE"] = str(Path(cache) / "hf-cache")
    os.environ["HF_HUB_DISABLE_XET"] = "1"  # plain LFS: the local server does not speak Xet
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_UPDATE_DOWNLOAD_COUNTS", "0")
    return True


def publish_and_pull(artifacts: dict, cache: Path, echo=print) -> tuple[str, str] | None:
    """Pushes the factors and the index to a Hub server of the demo's own on loopback, pulls them
    back by tag, and returns the two pulled folders; None (with the reason echoed) when the Hub
    client is not pointed at a free loopback port or the server extra (starlette, uvicorn) is missing."""
    from huggingface_hub import constants

    from hub_msif.errors import MissingExtraError
    from hub_msif.hub import pull_factors, pull_index, push_factors, push_index

    try:
        from hub_msif.hub.server import HubServer  # the extra hub_msif[server]: starlette + uvicorn
    except MissingExtraError as err:
        echo(f"(not publishing: {err})")
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    if endpoint.hostname not in LOOPBACK or not constants.HF_HUB_DISABLE_XET:
        echo(f"(not publishing: the Hub client points at {constants.ENDPOINT}; run `hub-msif demo` for the local Hub)")
        return None
    token = secrets.token_hex(16)
    try:
        server = HubServer(cache / "hub", host=endpoint.hostname, port=endpoint.port or 80,
                           tokens={token: {"user": "demo", "orgs": []}}).start()
    except OSError as err:
        echo(f"(not publishing: cannot serve a local Hub at {constants.ENDPOINT}: {err})")
        return None
    try:
        factors_commit, factors_tag = push_factors(artifacts["factors"], FACTORS_REPO, token=token)
        index_commit, index_tag = push_index(artifacts["index_folder"], INDEX_REPO, token=token)
        echo(f"published to the local Hub at {server.url}:\n  factors  {FACTORS_REPO}@{factors_tag} "
             f"(commit {factors_commit[:12]})\n  index    {INDEX_REPO}@{index_tag} (commit {index_commit[:12]})")
        factors = pull_factors(f"{FACTORS_REPO}@{factors_tag}", token=token)
        index = pull_index(f"{INDEX_REPO}@{index_tag}", token=token)
        echo(f"pulled both back by tag into the Hugging Face cache ({constants.HF_HUB_CACHE})")
    finally:
        server.stop()
    return str(factors), str(index)


def trained_pair(world: FactWorld, cache: Path, seed: int = DEMO_SEED) -> Path:
    """The model pair trained on ``world`` (demo settings) under ``cache/models``, trained on the
    first call (into a temporary folder, then renamed) and reused afterwards. ``training.json``
    there records the accuracies and the training time."""
    folder = cache / "models"
    if (folder / "training.json").is_file():
        return folder
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".models-"))
    started = time.perf_counter()
    try:
        result = train_pair(world, tmp, seed=seed, pretrain_steps=1500, finetune_steps=300)
        (tmp / "training.json").write_text(json.dumps(
            {"test_accuracy": result["test_accuracy"], "finetune_accuracy": result["finetune_accuracy"],
             "seconds": time.perf_counter() - started}))
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def fitted_factors(models: Path, paths: dict, world: FactWorld, cache: Path, samples_per_sequence: int = 1) -> Path:
    """Both stages' factors of the pair in ``models`` under ``cache/factors``, fitted as the demo
    does; refitted when missing or stale (fitted on other weights). ``samples_per_sequence`` S > 1
    (label samples per sequence in the Lambda pass) fits into ``cache/factors-sS`` instead."""
    folder = cache / ("factors" if samples_per_sequence == 1 else f"factors-s{samples_per_sequence}")
    try:
        manifest = read_manifest(folder)
        check_stage_pair(manifest)
        # Stale: fitted on other weights, or by an older hub_msif that recorded the folders' paths.
        fresh = all(manifest["stages"][stage]["model"]["revision"] == folder_revision(models / stage)
                    and manifest["stages"][stage]["model"].get("local") for stage in ("pretrained", "finetuned"))
        if fresh:
            return folder
    except FactorError:
        pass
    shown = sys.stderr.isatty()  # one bar per fit, on a terminal only
    samples: dict[str, Any] = {"batch_size": 32, "samples_per_sequence": samples_per_sequence}
    fit_stage(str(models / "pretrained"), str(paths["pretrain"]), folder, FitConfig(stage="pretrained", **samples),
              corpus=CorpusSpec(data=str(paths["pretrain"]), max_length=64), show_progress=shown)
    fit_stage(str(models / "finetuned"), str(paths["finetune"]), folder, FitConfig(stage="finetuned", **samples),
              corpus=CorpusSpec(data=str(paths["finetune"]), prompt_column="prompt", response_column="response",
                                template=world.template, max_length=64), show_progress=shown)
    return folder


def _index(paths: dict, cache: Path, world: FactWorld):
    """The index of the pre-training documents under ``cache/index``, recording the demo's example
    questions; an index cached by an older version (without them) is reused as it is."""
    from hub_msif.attribution.retrieval import DocumentIndex, build_index

    folder = cache / "index"
    try:
        return DocumentIndex.load(folder)
    except RetrievalError:
        return build_index(CorpusSpec(data=str(paths["pretrain"]), max_length=64), out=folder,
                           example_questions=[q.prompt for q in example_queries(world)])


def prepare(cache: str | Path) -> dict:
    """Builds or reuses every demo artifact; returns the world, paths and folders."""
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    world = generate(DEMO_SEED)
    paths = save_world(world, cache / "world")
    models = trained_pair(world, cache)
    factors = fitted_factors(models, paths, world, cache)
    index = _index(paths, cache, world)
    return {"world": world, "paths": paths, "models": models, "factors": factors, "index": index,
            "index_folder": cache / "index"}


def example_queries(world: FactWorld, n: int = 3):
    """The first test query of each relation (facts seen only in pre-training)."""
    picked, seen = [], set()
    for query in world.queries:
        relation = next(f.relation for f in world.facts if f.id == query.fact_id)
        if relation not in seen:
            picked.append(query)
            seen.add(relation)
        if len(picked) == n:
            break
    return picked


def run(cache: str | Path, top: int = 5, candidates: int = 100, echo=print, publish: bool = True,
        device: str = "auto", model_dtype: str | None = None) -> list[dict]:
    """The whole demo; prints each example's answer (with its log-probability) and top documents, then
    a summary table under a legend of what the scores mean, and ends with the factor and index
    folders it keeps and the ``hub-msif attribute`` command to run on them; returns the results.

    With ``publish`` the factors and index are pushed to a local Hub and attributed from the
    copies pulled back by tag (see ``publish_and_pull``). ``device`` and ``model_dtype``: where and
    in which dtype the pair attributes (``Attributor``).
    """
    from hub_msif.attribution.attributor import Attributor
    from hub_msif.attribution.retrieval import DocumentIndex

    started = time.perf_counter()
    artifacts = prepare(cache)
    world = artifacts["world"]
    kept = {"factors": Path(artifacts["factors"]).resolve(), "index": Path(artifacts["index_folder"]).resolve()}
    pulled = publish_and_pull(artifacts, Path(cache), echo) if publish else None
    if pulled is not None:
        artifacts["factors"], artifacts["index"] = pulled[0], DocumentIndex.load(pulled[1])
    attributor = Attributor(artifacts["factors"], index=artifacts["index"], device=device, model_dtype=model_dtype)
    training = json.loads((artifacts["models"] / "training.json").read_text())
    echo(f"fact world: {len(world.documents)} pre-training documents, {len(world.finetune)} fine-tuning Q&A pairs, "
         f"{len(world.queries)} held-out questions; fine-tuned model answers {training['test_accuracy']:.0%} of them right")
    queries = example_queries(world)
    # Every candidate ranked (top=candidates), to find the true proponents' ranks; the top rows are shown.
    ranked = attributor.attribute_many([(q.prompt, None) for q in queries], candidates=candidates, top=candidates)
    results = []
    for query, result in zip(queries, ranked):
        found = next((row for row in result.rows if row.id in query.proponents), None)
        result.rows, result.opponents = result.rows[:top], result.opponents[:top]
        mark = "correct" if result.answer == query.answer else f"expected {query.answer!r}"
        echo(f"\nQ: {query.prompt}\nA: {result.answer}   (generated by the fine-tuned model; {mark}; "
             f"log p(answer) = {result.answer_logprob:.3f})")
        echo(f"top {top} of {result.num_candidates} retrieved pre-training documents by MS-IF "
             "(* = a true proponent of the fact):")
        for row in result.rows:
            star = "*" if row.id in query.proponents else " "
            echo(f"  {star} {row.rank:>2}  score {row.score:>10.4g}  ({row.relative_score:+.2f})  {row.id}  {row.text}")
        results.append({"query": query, "result": result, "proponent": found})
    echo(f"\ndone in {time.perf_counter() - started:.0f}s; artifacts cached in {Path(cache)}")
    for line in summary_table(results, candidates) + next_command(kept, queries[0].prompt):
        echo(line)
    return results


def next_command(folders: dict[str, Path], prompt: str) -> list[str]:
    """The demo's closing lines: the factor and index folders it keeps (its cache, not the loopback
    Hub's copies, which go with the Hub) and the ``hub-msif attribute`` command to run on them."""
    command = ["hub-msif", "attribute", "--factors", str(folders["factors"]), "--index", str(folders["index"]),
               "--prompt", prompt]
    return ["", "The factors and the index stay in the demo's cache; attribute any question with them:",
            f"  factors  {folders['factors']}", f"  index    {folders['index']}",
            "  " + shlex.join(command)]


def summary_table(results: list[dict], candidates: int) -> list[str]:
    """The demo's closing table: per question the answer and where MS-IF ranks the best-placed true
    proponent, under a header that says what score and rel mean."""
    lines = [
        "",
        f"Where MS-IF ranks a true proponent (a pre-training document stating the fact) among the {candidates} "
        "candidates of each question.",
        "score: influence of the document on the answer; positive = training on it made the answer more likely "
        "(it ranks documents, it is not a probability).",
        "rel: score / the largest |score| among the question's candidates (+1.00 = the strongest supporter, "
        "below 0 = opposes the answer).",
        "",
    ]
    width = max([len("question")] + [len(item["query"].prompt) for item in results])
    lines.append(f"{'question':<{width}}  {'answer':<10} {'correct':<7}  {'rank':>4}  {'score':>10}  {'rel':>5}")
    for item in results:
        query, result, found = item["query"], item["result"], item["proponent"]
        correct = "yes" if result.answer == query.answer else "no"
        where = (f"{found.rank:>4}  {found.score:>10.4g}  {found.relative_score:>+5.2f}" if found is not None
                 else f"{'-':>4}  {'(none among the candidates)':>10}")
        lines.append(f"{query.prompt:<{width}}  {result.answer:<10} {correct:<7}  {where}")
    return lines
