"""Shared test set-up: offline Hugging Face libraries and small deterministic inputs."""

import os
import socket
import tempfile


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Read once at import by huggingface_hub / datasets / transformers: set before any of them loads.
# Every Hub call of the test session goes to a Hub-compatible server on loopback (the hub_server
# fixture), with a cache of its own; nothing can reach a real hub.
HUB_PORT = _free_port()
os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{HUB_PORT}"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="hub-msif-tests-hf-home-")
os.environ["HF_HUB_DISABLE_XET"] = "1"  # plain LFS uploads; the local server does not speak Xet
os.environ["HF_TOKEN"] = "test-token-alice"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# datasets pings an S3 bucket to count downloads on every load_dataset, even of local files.
os.environ["HF_UPDATE_DOWNLOAD_COUNTS"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.pop("HF_HUB_OFFLINE", None)

# Test users of the loopback hub: alice (token in HF_TOKEN) may write to alice/ and msif-team/,
# bob only to bob/, carol's token is read-only.
HUB_TOKENS = {
    "test-token-alice": {"user": "alice", "orgs": ["msif-team"]},
    "test-token-bob": {"user": "bob", "orgs": []},
    "test-token-carol-read": {"user": "carol", "orgs": [], "role": "read"},
}

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def random_sequences(n: int, vocab_size: int, min_len: int = 3, max_len: int = 12, seed: int = 0,
                     prompt_len: int = 0) -> list[dict]:
    """``n`` token sequences of varying length (so batches carry padding).

    With ``prompt_len`` > 0 the first tokens carry no loss (label -100), like instruction data.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(4, vocab_size) for _ in range(length)]
        labels = [-100 if i < prompt_len else t for i, t in enumerate(ids)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def save_tiny_example(folder, num_sequences: int):
    """A float64 tiny GPT-NeoX saved with its tokenizer under ``folder/model``, and a jsonl corpus
    of ``num_sequences`` texts; returns both paths."""
    import json

    from hub_msif.toy.examples import example_texts, tiny_model, word_tokenizer

    tokenizer = word_tokenizer(example_texts(200))
    model = tiny_model("gpt_neox", vocab_size=len(tokenizer), hidden=16, heads=2, ffn=32, layers=2,
                       dtype=torch.float64)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in example_texts(num_sequences, seed=1)))
    return folder / "model", corpus


@pytest.fixture(scope="session")
def fact_world():
    """The demo's fact world (trained model pair, both stages' factors, document index), taken from
    the demo's own cache (``hub_msif.toy.demo.default_cache()``): built by the first run on a
    machine (about half a minute), reused by every later run and by ``hub-msif demo``. Adds
    ``examples``, the demo's three held-out questions."""
    from hub_msif.toy.demo import default_cache, example_queries, prepare

    artifacts = prepare(default_cache())
    artifacts["examples"] = example_queries(artifacts["world"])
    return artifacts


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is many times faster than several on a shared machine.
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


QA_TEMPLATE = "question : {prompt} answer :"


def qa_rows(n: int) -> list[dict]:
    """``n`` prompt/response rows about the bundled example corpus ("what does the cat see ?")."""
    from hub_msif.toy.examples import OBJECTS, SUBJECTS, VERBS

    rows = []
    for i in range(n):
        s, v, o = SUBJECTS[i % len(SUBJECTS)], VERBS[(3 * i) % len(VERBS)], OBJECTS[(5 * i) % len(OBJECTS)]
        rows.append({"prompt": f"what does {s} {v} ?", "response": o})
    return rows


def save_tiny_pair(root) -> dict:
    """A tiny GPT-NeoX trained briefly on the example corpus (pre-trained) and a copy trained
    briefly on templated Q&A rows (fine-tuned), saved like Hub models under ``root/pretrained``
    and ``root/finetuned`` with a word-level tokenizer, and both corpora as jsonl
    (``root/pretrain.jsonl`` text, ``root/finetune.jsonl`` prompt/response). Returns the paths,
    the tokenizer, the fine-tuned model and the Q&A texts (for deriving more models)."""
    import copy
    import json

    from hub_msif.toy.examples import example_texts, tiny_model, train_briefly, word_tokenizer

    texts, rows = example_texts(32, seed=0), qa_rows(16)
    qa_texts = [QA_TEMPLATE.format(prompt=r["prompt"]) + " " + r["response"] for r in rows]
    tokenizer = word_tokenizer(texts + qa_texts + ["where what who is was ?"])
    pretrained = tiny_model("gpt_neox", vocab_size=len(tokenizer), seed=0)
    train_briefly(pretrained, tokenizer, texts, steps=8, batch_size=8)
    finetuned = train_briefly(copy.deepcopy(pretrained), tokenizer, qa_texts, steps=8, batch_size=8, seed=1)
    out = {"tokenizer": tokenizer, "finetuned_model": finetuned, "qa_texts": qa_texts}
    for name, model in (("pretrained", pretrained), ("finetuned", finetuned)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    out["pretrain"], out["finetune"] = root / "pretrain.jsonl", root / "finetune.jsonl"
    out["pretrain"].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out["finetune"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def fit_tiny_pair(pair: dict, folder, **corpus) -> None:
    """Both stages' factors of a ``save_tiny_pair`` pair into ``folder``: the pre-trained model on its
    text, the fine-tuned one on its Q&A rows in ``QA_TEMPLATE`` (batches of 8, no checkpoints);
    ``corpus``: ``CorpusSpec`` settings of both (e.g. ``max_length``)."""
    from hub_msif.data import CorpusSpec
    from hub_msif.factors.fit import FitConfig, fit_stage

    qa = {"prompt_column": "prompt", "response_column": "response", "template": QA_TEMPLATE}
    for stage, data, columns in (("pretrained", pair["pretrain"], {}), ("finetuned", pair["finetune"], qa)):
        fit_stage(str(pair[stage]), str(data), folder, FitConfig(stage=stage, batch_size=8, checkpoint_every=0),
                  corpus=CorpusSpec(data=str(data), **corpus, **columns), show_progress=False)


def write_gradindex(folder, stage_folder, documents: list[dict], location: str, dims: int = 16, seed: int = 0,
                    processes: int = 2, corpus: dict | None = None, check: dict | None = None,
                    **extra) -> dict:
    """A gradient index folder in the format of docs/design.md ("Gradient index"), written directly
    (not by the builder): ``documents.parquet`` through ``DocumentIndex.save`` (the index's own
    parquet writer), one shard per process ``shards/r<rank>-0.safetensors`` holding the documents
    ``i`` with ``i mod processes == rank`` (seeded random unit float16 rows, float32 norms, int64 row
    numbers), and ``gradindex.json`` last with real sha256s. Its ``stage`` is the pre-trained stage
    of the factor folder ``stage_folder`` (model and tokenizer as recorded by the fit), found at
    ``location``. ``extra``: more manifest keys. Returns the manifest."""
    import hashlib
    import json
    import shutil
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import save as st_save

    from hub_msif import __version__
    from hub_msif.artifacts.atomic import atomic_write_bytes, atomic_write_json, sha256_bytes
    from hub_msif.artifacts.manifest import read_manifest
    from hub_msif.attribution.retrieval import DocumentIndex

    folder = Path(folder)
    entry = read_manifest(stage_folder)["stages"]["pretrained"]
    n = len(documents)
    scratch = folder.parent / f".{folder.name}-documents"
    DocumentIndex(documents, np.eye(n, dtype=np.float32), {"embedding_model": {"id": "none", "revision": "none"},
                                                           "corpus": {}}).save(scratch)
    payloads = {"documents.parquet": (scratch / "documents.parquet").read_bytes()}
    shutil.rmtree(scratch)
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, dims))
    norms = np.linalg.norm(vectors, axis=1)
    for rank in range(processes):
        rows = np.arange(rank, n, processes, dtype=np.int64)
        payloads[f"shards/r{rank}-0.safetensors"] = st_save({
            "vectors": (vectors[rows] / norms[rows, None]).astype(np.float16),
            "norms": norms[rows].astype(np.float32), "rows": rows})
    files = {}
    for name, data in payloads.items():
        atomic_write_bytes(folder / name, data)
        files[name] = {"sha256": sha256_bytes(data), "bytes": len(data)}
    names = [m["name"] for m in entry["modules"]]
    manifest = {
        "format": "hub_msif.gradindex", "format_version": 1, "library_version": __version__,
        "stage": {"model": entry["model"], "tokenizer": entry["tokenizer"], "location": location,
                  "manifest_sha256": hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest(),
                  "modules": names},
        "projection": {"kind": "kronecker", "seed": seed, "k": {name: [4, 4] for name in names}, "dims": dims,
                       "balance": 0.5, "damping": 0.1, "relative": True},
        "corpus": corpus or {"data": "pretrain.jsonl", "documents_sha256": sha256_bytes(payloads["documents.parquet"])},
        "num_documents": n, "max_length": 64, "files": files, **extra,
    }
    if check is not None:
        manifest["check"] = check
    atomic_write_json(folder / "gradindex.json", manifest)
    return manifest


def machine_paths_published(repos, paths, cache_dir) -> list[str]:
    """``REPO/FILE: PATH`` for every path of ``paths`` (of the pushing machine) found in any file of
    the Hub repos ``repos`` (``(repo id, repo type)``; a wheel's files are read inside it)."""
    import zipfile
    from pathlib import Path

    from huggingface_hub import snapshot_download

    hits = []
    for repo, kind in repos:
        folder = Path(snapshot_download(repo, repo_type=kind, cache_dir=cache_dir))
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                if path.suffix == ".whl":
                    with zipfile.ZipFile(path) as wheel:
                        data = b"".join(wheel.read(n) for n in wheel.namelist())
                hits += [f"{repo}/{path.relative_to(folder)}: {p}" for p in paths if p.encode() in data]
    return hits


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


NON_LOOPBACK_REQUESTS: list[str] = []


def _refuse_non_loopback(request) -> None:
    host = request.url.host
    if host not in ("127.0.0.1", "localhost", "::1"):
        NON_LOOPBACK_REQUESTS.append(str(request.url))
        raise ConnectionRefusedError(f"test guard: request to non-loopback host {host} refused ({request.url})")


def pytest_configure(config):
    """Every huggingface_hub HTTP request of the session passes a guard that refuses other hosts."""
    import httpx2
    from huggingface_hub.utils import _http

    def factory():
        return httpx2.Client(event_hooks={"request": [_http.hf_request_event_hook, _refuse_non_loopback]},
                             follow_redirects=True, timeout=None)

    _http.set_client_factory(factory)


def pytest_sessionfinish(session, exitstatus):
    if NON_LOOPBACK_REQUESTS:
        print("\nrequests to non-loopback hosts were refused:", *NON_LOOPBACK_REQUESTS, sep="\n  ")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def hub_root(tmp_path_factory):
    """On-disk storage of the loopback hub; it outlives server restarts within the session."""
    return tmp_path_factory.mktemp("hub-root")


@pytest.fixture
def hub_server(hub_root):
    """A Hub-compatible server on the loopback port HF_ENDPOINT names, running for one test."""
    from hub_msif.hub.server import HubServer

    server = HubServer(hub_root, host="127.0.0.1", port=HUB_PORT, tokens=HUB_TOKENS).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fact_gradindex(fact_world, tmp_path_factory):
    """The default gradient index of the fact world's pre-training corpus (its pre-trained stage, max
    length 64 as the demo fits it): ``folder`` and the loaded ``index`` (tests/apps: the Space)."""
    from hub_msif.attribution.gradient_index import GradientIndex
    from hub_msif.attribution.gradient_index_build import build_gradindex
    from hub_msif.data import CorpusSpec

    out = tmp_path_factory.mktemp("fact-gradindex") / "gradindex"
    build_gradindex(str(fact_world["factors"]), CorpusSpec(data=str(fact_world["paths"]["pretrain"]), max_length=64),
                    out, device="cpu", show_progress=False)
    return {"folder": out, "index": GradientIndex.load(out)}


GRADIENT_WORLD_DOCUMENTS = 150


@pytest.fixture(scope="session")
def gradient_world(tmp_path_factory):
    """The tiny pair with both stages' factors, a corpus of 150 distinct documents, its embedding
    index, and three gradient indexes of it: identity and default projections of the pre-trained
    stage, and one of the fine-tuned stage (to be refused); four Q&A queries (issue 18: two-stage
    attribution and ``gradindex check``, tests/attribution and tests/apps)."""
    import json

    from hub_msif.attribution.gradient_index import GradientIndex
    from hub_msif.attribution.gradient_index_build import build_gradindex
    from hub_msif.attribution.retrieval import build_index
    from hub_msif.data import CorpusSpec
    from hub_msif.toy.examples import example_texts

    root = tmp_path_factory.mktemp("gradient-attribution")
    pair = save_tiny_pair(root / "models")
    factors = root / "factors"
    fit_tiny_pair(pair, factors)
    texts = list(dict.fromkeys(example_texts(2 * GRADIENT_WORLD_DOCUMENTS, seed=2)))[:GRADIENT_WORLD_DOCUMENTS]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"doc-{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    spec = CorpusSpec(data=str(corpus))
    folders = {}
    for name, settings in (("identity", {"kind": "identity"}), ("default", {}), ("finetuned", {"stage": "finetuned"})):
        folders[name] = root / f"gradindex-{name}"
        build_gradindex(str(factors), spec, folders[name], device="cpu", show_progress=False, **settings)
    index = build_index(spec, out=root / "index")
    queries = [(r["prompt"], r["response"]) for r in qa_rows(16)[:4]]
    return {"root": root, "pair": pair, "factors": factors, "corpus": corpus, "folders": folders, "index": index,
            "gradindexes": {name: GradientIndex.load(folder) for name, folder in folders.items()},
            "queries": queries}
