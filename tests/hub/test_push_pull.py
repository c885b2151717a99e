"""Factors and index on a Hub: push, pull, versions, cards, matching, offline use and faults (hub_msif.hub).

Everything runs against the loopback Hub-compatible server of the ``hub_server`` fixture (the
session's ``HF_ENDPOINT``), with the real ``huggingface_hub`` and ``datasets`` clients. Its
storage outlives each test's server, so the repos pushed once (``published``) serve every test.
A module-scoped fixture builds a tiny GPT-NeoX pair (local folders), two factor versions (label
seeds 0 and 1) and a 20-document index.
"""

import copy
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import conftest
import pytest
from conftest import QA_TEMPLATE as TEMPLATE
from conftest import save_tiny_pair

from hub_msif import hub
from hub_msif.apps.cli import main as cli_main
from hub_msif.artifacts.atomic import file_sha256
from hub_msif.artifacts.manifest import read_manifest
from hub_msif.attribution.attributor import Attributor
from hub_msif.attribution.retrieval import DocumentIndex
from hub_msif.data import CorpusSpec
from hub_msif.errors import FactorError, HubError, HubIntegrityError
from hub_msif.factors.fit import FitConfig, fit_stage
from hub_msif.factors.storage import load_stage, save_stage
from hub_msif.hub.cards import factors_card
from hub_msif.toy.examples import example_texts, train_briefly

PROMPT, ANSWER = "what does the cat see ?", "the river"
FACTORS_REPO = "alice/msif-tiny-factors"
INDEX_REPO = "msif-team/msif-tiny-index"  # alice writes to her organisation too
ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Artifacts:
    root: Path
    pretrained: Path
    finetuned: Path
    retrained: Path  # the fine-tuned model trained one step more: same shapes, another revision
    factors: dict[str, Path]  # "v1", "v2": the same pair fitted with label seeds 0 and 1
    index: Path
    documents: list[dict] = field(default_factory=list)


def _fit(model_dir, data, folder, stage, seed, **corpus):
    config = FitConfig(stage=stage, batch_size=8, checkpoint_every=0, seed=seed)
    fit_stage(str(model_dir), str(data), folder, config, corpus=CorpusSpec(data=str(data), max_length=64, **corpus),
              show_progress=False)


_ARTIFACTS: dict = {}


def shared_artifacts(tmp_path_factory) -> Artifacts:
    """The artifacts, built once per session (``test_faults.py`` uses them too)."""
    if not _ARTIFACTS:
        _ARTIFACTS["built"] = _build_artifacts(tmp_path_factory)
    return _ARTIFACTS["built"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Artifacts:
    return shared_artifacts(tmp_path_factory)


def _build_artifacts(tmp_path_factory) -> Artifacts:
    root = tmp_path_factory.mktemp("hub-artifacts")
    pair = save_tiny_pair(root)
    tokenizer, qa_texts = pair["tokenizer"], pair["qa_texts"]
    retrained = train_briefly(copy.deepcopy(pair["finetuned_model"]), tokenizer, qa_texts, steps=1, batch_size=8, seed=2)
    retrained.save_pretrained(root / "retrained")
    tokenizer.save_pretrained(root / "retrained")
    dirs = {"pretrained": pair["pretrained"], "finetuned": pair["finetuned"], "retrained": root / "retrained"}
    pre_data, ft_data = pair["pretrain"], pair["finetune"]
    factors = {}
    for version, seed in (("v1", 0), ("v2", 1)):
        folder = root / f"factors-{version}"
        _fit(dirs["pretrained"], pre_data, folder, "pretrained", seed)
        _fit(dirs["finetuned"], ft_data, folder, "finetuned", seed, prompt_column="prompt",
             response_column="response", template=TEMPLATE)
        factors[version] = folder
    # Left-overs of an interrupted run: never pushed.
    (factors["v1"] / ".msif.json.abc123.tmp").write_text("partial")
    (factors["v1"] / ".msif-checkpoints").mkdir()
    (factors["v1"] / ".msif-checkpoints" / "step-1.safetensors").write_bytes(b"\0" * 16)
    documents = [{"id": f"doc{i}", "text": t} for i, t in enumerate(example_texts(32, seed=0)[:20])]
    index = DocumentIndex.build([d["text"] for d in documents], ids=[d["id"] for d in documents],
                                corpus={"data": "tiny-example-corpus", "revision": None})
    index.save(root / "index")
    return Artifacts(root, dirs["pretrained"], dirs["finetuned"], dirs["retrained"], factors, root / "index", documents)


_PUBLISHED: dict = {}


def publish_once(artifacts: Artifacts) -> dict:
    """Factors v1 and v2 and the index v1, pushed once per session (the server's storage persists)."""
    if not _PUBLISHED:
        _PUBLISHED["v1"] = hub.push_factors(artifacts.factors["v1"], FACTORS_REPO)
        _PUBLISHED["v2"] = hub.push_factors(artifacts.factors["v2"], FACTORS_REPO)
        _PUBLISHED["index"] = hub.push_index(artifacts.index, INDEX_REPO)
    return _PUBLISHED


@pytest.fixture
def published(hub_server, artifacts) -> dict:
    return publish_once(artifacts)


def hub_api(token=None):
    from huggingface_hub import HfApi

    return HfApi(token=token)


def _tags(repo=FACTORS_REPO) -> dict[str, str]:
    return {t.name: t.target_commit for t in hub_api().list_repo_refs(repo, repo_type="dataset").tags}


def _main_head(repo=FACTORS_REPO) -> str:
    refs = hub_api().list_repo_refs(repo, repo_type="dataset")
    return next(b.target_commit for b in refs.branches if b.name == "main")


def _same_files(pulled: Path, local: Path, files) -> bool:
    return all((pulled / f).read_bytes() == (local / f).read_bytes() for f in files)


# -- push and pull ----------------------------------------------------------------------------------
def test_push_twice_gives_two_tags_and_each_revision_pulls_its_version(published, artifacts, hub_server):
    (sha1, tag1), (sha2, tag2) = published["v1"], published["v2"]
    assert (tag1, tag2) == ("v1", "v2") and sha1 != sha2
    tags = _tags()
    assert tags["v1"] == sha1 and tags["v2"] == sha2
    files = {m["file"] for s in read_manifest(artifacts.factors["v1"])["stages"].values() for m in s["modules"]}
    # Only the manifest, the card and the module files went up: no temporary file, no checkpoint.
    remote = set(hub_api().list_repo_files(FACTORS_REPO, repo_type="dataset", revision=sha1))
    assert remote - {".gitattributes"} == files | {"msif.json", "README.md"}
    # Module files took the large-file (LFS) path.
    entries = hub_api().get_paths_info(FACTORS_REPO, sorted(files)[:2], repo_type="dataset", revision=sha1)
    assert all(getattr(e, "lfs", None) is not None for e in entries)

    hub_api().create_branch(FACTORS_REPO, branch="stable", revision=sha1, repo_type="dataset", exist_ok=True)
    for location, version, commit in [(f"{FACTORS_REPO}@v1", "v1", sha1), (f"{FACTORS_REPO}@{sha1}", "v1", sha1),
                                      (f"{FACTORS_REPO}@stable", "v1", sha1), (f"{FACTORS_REPO}@v2", "v2", sha2),
                                      (FACTORS_REPO, "v2", sha2), (f"{FACTORS_REPO}@main", "v2", sha2)]:
        folder = hub.pull_factors(location)
        assert folder.name == commit, location
        local = artifacts.factors[version]
        assert read_manifest(folder) == read_manifest(local), location
        assert _same_files(folder, local, files), location

    # Pushing an unchanged folder adds no version; a user-named tag that exists is refused up front.
    assert hub.push_factors(artifacts.factors["v2"], FACTORS_REPO) == (sha2, "v2")
    head = _main_head()
    with pytest.raises(HubError, match="already has a tag 'v1'.*immutable"):
        hub.push_factors(artifacts.factors["v1"], FACTORS_REPO, tag="v1")
    assert _tags() == tags and _main_head() == head


def test_mlp_pull_downloads_no_attention_file(published, artifacts, hub_server, tmp_path):
    cache = tmp_path / "cache"
    start = len(hub_server.request_log)
    folder = hub.pull_factors(f"{FACTORS_REPO}@v1", modules="mlp", cache_dir=cache)
    paths = [r["path"] for r in hub_server.request_log[start:]]
    assert any("/mlp/" in p for p in paths)
    assert not any("/attn/" in p for p in paths), "an attention file was requested"
    cached = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    assert cached and all("/attn/" not in p for p in cached)
    assert {p.split("/")[1] for p in cached if "/" in p} == {"mlp"}
    assert not list((cache).rglob("*attn*"))
    # Only-what-is-needed also holds for one stage.
    only_ft = hub.pull_factors(f"{FACTORS_REPO}@v1", modules="mlp", stages=["finetuned"], cache_dir=tmp_path / "c2")
    assert not (only_ft / "pretrained").exists() and (only_ft / "finetuned" / "mlp").is_dir()


def test_cards_carry_the_metadata_and_the_documents_load_with_datasets(published, artifacts, hub_server,
                                                                      monkeypatch):
    from huggingface_hub import DatasetCard

    from hub_msif.hub.cards import model_name, public_source

    card = DatasetCard.load(FACTORS_REPO)  # main = v2
    data = card.data.to_dict()
    manifest = read_manifest(artifacts.factors["v2"])
    assert data["license"] == "apache-2.0"
    assert {"hub-msif", "ekfac", "influence-functions"} <= set(data["tags"])
    meta = data["hub_msif"]
    for stage in ("pretrained", "finetuned"):
        recorded = manifest["stages"][stage]
        # local folders and files: named without their path (tests/apps/test_cli_cards.py)
        assert meta[stage]["model"] == {"id": model_name(recorded["model"]), "revision": recorded["model"]["revision"]}
        assert meta[stage]["num_sequences"] == recorded["fit"]["num_sequences"]
        assert meta[stage]["data"]["data"] == public_source(recorded["data"]["data"])
        assert meta[stage]["seed"] == 1
    assert [m["name"] for m in meta["modules"]] == [m["name"] for m in manifest["stages"]["pretrained"]["modules"]]
    assert {m["role"] for m in meta["modules"]} == {"mlp", "attn_qkv", "attn_out"}
    assert meta["roles"] == {"mlp": 4, "attention": 4}
    assert meta["library_version"] == manifest["library_version"] and meta["size_bytes"] > 0
    body = card.text
    assert "hub-msif fit --model" in body and "--stage finetuned" in body and "--prompt-column prompt" in body
    assert f"hub-msif pull factors {FACTORS_REPO}@v2 --modules mlp" in body
    assert "## Limits" in body and "## How they were fitted" in body
    # The Hub derives the repo's tags from the card: the search by tags finds it.
    assert FACTORS_REPO in {d.id for d in hub_api().list_datasets(filter=["hub-msif", "ekfac"])}

    index_card = DatasetCard.load(INDEX_REPO).data.to_dict()
    index_manifest = json.loads((artifacts.index / "index.json").read_text())
    assert {"hub-msif", "document-index"} <= set(index_card["tags"])
    meta = index_card["hub_msif"]
    assert meta["embedding_model"] == index_manifest["embedding_model"]
    assert (meta["dimension"], meta["metric"], meta["num_documents"]) == (384, "inner_product", 20)
    assert meta["corpus"]["data"] == "tiny-example-corpus"
    assert index_card["configs"][0]["data_files"][0]["path"] == "documents.parquet"

    import datasets

    for revision in ("v1", None):
        loaded = datasets.load_dataset(INDEX_REPO, revision=revision, split="train")
        assert loaded["id"] == [d["id"] for d in artifacts.documents]
        assert loaded["text"] == [d["text"] for d in artifacts.documents]
        # For main, datasets also asks the Hub's dataset viewer (datasets-server.<host>) for its parquet
        # export, which is not on loopback: the next round goes without it.
        monkeypatch.setattr(datasets.config, "USE_PARQUET_EXPORT", False)


def _attribute(factors, index, **kwargs):
    attributor = Attributor(factors, **kwargs)
    return attributor.attribute(PROMPT, ANSWER, index=DocumentIndex.load(index), candidates=12, top=12).to_json()


def test_pulled_artifacts_attribute_like_the_local_folders(published, artifacts, hub_server):
    local = _attribute(artifacts.factors["v1"], artifacts.index)
    pulled = _attribute(f"{FACTORS_REPO}@v1", f"{INDEX_REPO}@v1")
    assert pulled == local
    assert len(local["rows"]) == 12
    # MLP only: pulled MLP files give the local folder's MLP-only result.
    assert _attribute(f"{FACTORS_REPO}@v1", f"{INDEX_REPO}@v1", modules="mlp") == \
        _attribute(artifacts.factors["v1"], artifacts.index, modules="mlp")


def test_after_one_pull_attribution_runs_offline_with_the_server_stopped(published, artifacts, hub_server):
    location = (f"{FACTORS_REPO}@v1", f"{INDEX_REPO}@v1")
    expected = _attribute(*location)  # pulls (or finds) both in the cache
    hub_server.stop()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = [sys.executable, "-m", "hub_msif.apps.cli", "attribute", "--factors", location[0], "--index", location[1],
            "--prompt", PROMPT, "--answer", ANSWER, "--candidates", "12", "--top", "12", "--json"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert [r["id"] for r in got["rows"]] == [r["id"] for r in expected["rows"]]
    assert [r["score"] for r in got["rows"]] == pytest.approx([r["score"] for r in expected["rows"]], rel=1e-5)
    # Offline, a revision never pulled is a clear error, not a hang.
    args[args.index("--factors") + 1] = f"{FACTORS_REPO}@v2-never-pulled"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]  # (after the index's progress bar)
    assert last.startswith("hub-msif attribute: error: cannot pull factors") and "v2-never-pulled" in last
    assert "not (completely) in the Hugging Face cache and HF_HUB_OFFLINE=1" in last
    assert "Traceback" not in done.stderr


# -- matching ---------------------------------------------------------------------------------------
def test_find_factors_picks_the_newest_matching_version(published, artifacts, hub_server):
    newest = max((t for t in _tags() if t[1:].isdigit()), key=lambda t: int(t[1:]))
    assert hub.find_factors(str(artifacts.pretrained), str(artifacts.finetuned)) == f"{FACTORS_REPO}@{newest}"
    with pytest.raises(HubError, match="no published factors match.*finetuned .*retrained at sha256:"):
        hub.find_factors(str(artifacts.pretrained), str(artifacts.retrained))


def test_a_model_of_another_revision_is_refused_unless_allowed(published, artifacts, hub_server, caplog):
    with pytest.raises(FactorError) as err:
        Attributor(f"{FACTORS_REPO}@v1", finetuned=str(artifacts.retrained))
    message = str(err.value)
    recorded = read_manifest(artifacts.factors["v1"])["stages"]["finetuned"]["model"]["revision"]
    from hub_msif.models import folder_revision

    loaded = folder_revision(artifacts.retrained)
    assert recorded in message and loaded in message and str(artifacts.retrained.resolve()) in message
    assert "allow_revision_mismatch" in message
    with caplog.at_level(logging.WARNING):
        Attributor(f"{FACTORS_REPO}@v1", finetuned=str(artifacts.retrained), allow_revision_mismatch=True)
    assert recorded in caplog.text and loaded in caplog.text


def test_factors_of_hub_models_record_and_pin_their_commits(hub_server, artifacts, tmp_path):
    """Models from the Hub: the manifest records repo ids and commit shas; the recorded commit is what
    loads by default, and a model repo that moved on is another revision."""
    api = hub_api()
    commits = {}
    for name, folder in (("pretrained", artifacts.pretrained), ("finetuned", artifacts.finetuned)):
        repo = f"alice/tiny-{name}"
        api.create_repo(repo, exist_ok=True)
        commits[name] = api.upload_folder(repo_id=repo, folder_path=folder).oid
    folder = tmp_path / "factors"
    _fit("alice/tiny-pretrained", artifacts.root / "pretrain.jsonl", folder, "pretrained", 0)
    _fit("alice/tiny-finetuned", artifacts.root / "finetune.jsonl", folder, "finetuned", 0, prompt_column="prompt",
         response_column="response", template=TEMPLATE)
    stages = read_manifest(folder)["stages"]
    assert {s: stages[s]["model"]["id"] for s in stages} == {s: f"alice/tiny-{s}" for s in stages}
    assert {s: stages[s]["model"]["revision"] for s in stages} == commits
    repo = "alice/msif-hub-model-factors"
    _, tag = hub.push_factors(folder, repo)
    assert hub.find_factors("alice/tiny-pretrained", "alice/tiny-finetuned") == f"{repo}@{tag}"
    card = factors_card(read_manifest(folder), repo, tag, {"x": 1})
    assert f"--model alice/tiny-finetuned --revision {commits['finetuned']}" in card.text

    # The fine-tuned model's repo moves on (other weights).
    moved = api.upload_file(path_or_fileobj=str(artifacts.retrained / "model.safetensors"),
                            path_in_repo="model.safetensors", repo_id="alice/tiny-finetuned").oid
    attributor = Attributor(f"{repo}@{tag}")  # the recorded commits, not main
    assert attributor.refs["finetuned"].revision == commits["finetuned"]
    with pytest.raises(FactorError) as err:
        Attributor(f"{repo}@{tag}", finetuned="alice/tiny-finetuned")  # main: the new commit
    assert commits["finetuned"] in str(err.value) and moved in str(err.value)
    with pytest.raises(HubError, match=f"no published factors match .*alice/tiny-finetuned at {moved}"):
        hub.find_factors("alice/tiny-pretrained", "alice/tiny-finetuned")
    assert hub.find_factors("alice/tiny-pretrained", f"alice/tiny-finetuned@{commits['finetuned']}") == \
        f"{repo}@{tag}"


# -- faults -----------------------------------------------------------------------------------------
def _stored_copies(root: Path, data: bytes) -> list[Path]:
    """Files of the server's storage holding exactly ``data`` (however the server lays them out)."""
    return [p for p in root.rglob("*") if p.is_file() and p.stat().st_size == len(data) and p.read_bytes() == data]


def test_a_file_altered_on_the_server_is_reported_and_never_loaded(published, artifacts, hub_server, hub_root, tmp_path):
    victim = "finetuned/mlp/gpt_neox.layers.1.mlp.dense_4h_to_h.safetensors"
    good = (artifacts.factors["v1"] / victim).read_bytes()
    copies = _stored_copies(Path(hub_root), good)
    assert copies, "the pushed file is not stored as is on the server"
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    try:
        for path in copies:
            path.write_bytes(bytes(bad))
        with pytest.raises(HubIntegrityError) as err:
            hub.pull_factors(f"{FACTORS_REPO}@v1", cache_dir=tmp_path / "cache")
        message = str(err.value)
        assert f"{FACTORS_REPO}@v1" in message and published["v1"].commit in message and victim in message
        assert "corrupted or was altered" in message and "sha256" in message
        # The bad copy left the cache: nothing can load it later.
        assert not list((tmp_path / "cache").glob(f"datasets--*/snapshots/*/{victim}"))
        assert not [p for p in (tmp_path / "cache").rglob("blobs/*") if p.read_bytes() == bytes(bad)]
    finally:
        for path in copies:
            path.write_bytes(good)
    folder = hub.pull_factors(f"{FACTORS_REPO}@v1", cache_dir=tmp_path / "cache")
    assert (folder / victim).read_bytes() == good


def test_missing_repo_or_revision(published, hub_server, capsys):
    with pytest.raises(HubError, match="no dataset repo alice/no-such-factors"):
        hub.pull_factors("alice/no-such-factors@v1")
    with pytest.raises(HubError, match=f"{FACTORS_REPO} has no revision 'v99'"):
        hub.pull_factors(f"{FACTORS_REPO}@v99")
    with pytest.raises(HubError, match=f"{FACTORS_REPO} has no revision '{'0' * 40}'"):
        Attributor(f"{FACTORS_REPO}@{'0' * 40}")
    with pytest.raises(HubError, match=f"no dataset repo {INDEX_REPO}-gone"):
        DocumentIndex.load(f"{INDEX_REPO}-gone@v1")
    with pytest.raises(HubError, match="empty revision"):
        hub.pull_factors(f"{FACTORS_REPO}@")
    # A path that is no folder and no repo id is a missing folder, as before.
    with pytest.raises(FactorError, match="does not exist"):
        Attributor("./no-such-folder")
    assert cli_main(["pull", "factors", f"{FACTORS_REPO}@v99"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hub-msif pull: error:") and "v99" in err[0]


def test_push_without_a_token_or_without_write_rights(published, artifacts, hub_server, monkeypatch):
    tags, head = _tags(), _main_head()
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")
    with pytest.raises(HubError, match="needs a Hugging Face token with write access"):
        hub.push_factors(artifacts.factors["v1"], "alice/msif-never-created")
    monkeypatch.undo()
    assert not hub_api().repo_exists("alice/msif-never-created", repo_type="dataset")
    # bob may write to bob/ only; carol's token is read-only.
    with pytest.raises(HubError, match=f"user bob may not write to {FACTORS_REPO}: bob is neither alice nor a member"):
        hub.push_factors(artifacts.factors["v1"], FACTORS_REPO, token="test-token-bob")
    with pytest.raises(HubError, match="may not write to carol/msif-factors"):
        hub.push_factors(artifacts.factors["v1"], "carol/msif-factors", token="test-token-carol-read")
    with pytest.raises(HubError, match="refused the token"):
        hub.push_factors(artifacts.factors["v1"], FACTORS_REPO, token="not-a-token")
    assert _tags() == tags and _main_head() == head
    assert cli_main(["push", "factors", str(artifacts.factors["v1"]), "--repo", FACTORS_REPO,
                     "--token", "test-token-bob"]) == 2


def test_a_broken_folder_is_never_pushed(published, artifacts, hub_server, tmp_path):
    folder = tmp_path / "factors"
    shutil.copytree(artifacts.factors["v1"], folder)
    victim = next((folder / "pretrained" / "attn").iterdir())
    victim.write_bytes(victim.read_bytes()[:-1] + b"\1")
    tags = _tags()
    with pytest.raises(HubError, match=f"refusing to push factors .*{victim.name} is corrupted"):
        hub.push_factors(folder, FACTORS_REPO)
    assert _tags() == tags


# The first lines of every subprocess script that talks to the loopback Hub: as the session's
# guard in conftest, any request to another host is refused.
LOOPBACK_GUARD = textwrap.dedent("""
    import httpx2
    from huggingface_hub.utils import _http

    def refuse_other_hosts(request):
        if request.url.host not in ("127.0.0.1", "localhost", "::1"):
            raise ConnectionRefusedError(f"non-loopback request refused: {request.url}")

    _http.set_client_factory(lambda: httpx2.Client(
        event_hooks={"request": [_http.hf_request_event_hook, refuse_other_hosts]}, follow_redirects=True))
""")

KILL_AFTER_FIRST_LFS_UPLOAD = LOOPBACK_GUARD + textwrap.dedent("""
    import os, signal, sys
    from huggingface_hub import _commit_api
    upload = _commit_api.lfs_upload

    def upload_then_die(*args, **kwargs):
        upload(*args, **kwargs)
        print("uploaded one LFS file, dying", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    _commit_api.lfs_upload = upload_then_die
    from hub_msif.hub import push_factors

    push_factors(sys.argv[1], sys.argv[2])
""")


def edited_copy(source: Path, folder: Path) -> Path:
    """A valid factor folder with new bytes (Lambda scaled), so that a push has files to upload."""
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".*"))
    stage = load_stage(folder, "pretrained")
    modules = {name: dataclasses.replace(m, lam=m.lam * 1.5) for name, m in stage.modules.items()}
    save_stage(folder, "pretrained", modules, {k: v for k, v in stage.info.items() if k != "modules"})
    return folder


def test_a_push_killed_mid_upload_adds_no_version(published, artifacts, hub_server, tmp_path):
    tags, head = _tags(), _main_head()
    folder = edited_copy(artifacts.factors["v1"], tmp_path / "factors-v3")
    uploads_before = sum(r["method"] == "PUT" for r in hub_server.request_log)
    done = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_LFS_UPLOAD, str(folder), FACTORS_REPO],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    assert "uploaded one LFS file" in done.stdout
    assert sum(r["method"] == "PUT" for r in hub_server.request_log) > uploads_before  # it did upload something
    assert _tags() == tags and _main_head() == head  # no commit, no tag
    for version in ("v1", "v2"):  # earlier versions intact
        pulled = hub.pull_factors(f"{FACTORS_REPO}@{version}", cache_dir=tmp_path / "cache")
        assert read_manifest(pulled) == read_manifest(artifacts.factors[version])
    # The push, done again, is the next version.
    commit, tag = hub.push_factors(folder, FACTORS_REPO)
    assert tag == f"v{max(int(t[1:]) for t in tags if t[1:].isdigit()) + 1}" and _tags()[tag] == commit
    assert read_manifest(hub.pull_factors(f"{FACTORS_REPO}@{tag}")) == read_manifest(folder)


def test_a_server_stopping_mid_download_loses_nothing(published, artifacts, hub_server, hub_root, tmp_path,
                                                      monkeypatch):
    from huggingface_hub import _snapshot_download

    from hub_msif.hub.server import HubServer

    cache = tmp_path / "cache"
    download = _snapshot_download.hf_hub_download
    calls = []

    def stop_after_first_file(*args, **kwargs):
        if calls:
            hub_server.stop()
        calls.append(kwargs.get("filename", args[1] if len(args) > 1 else None))
        return download(*args, **kwargs)

    monkeypatch.setattr(_snapshot_download, "hf_hub_download", stop_after_first_file)
    monkeypatch.setattr(_snapshot_download, "hf_thread_map", lambda fn, items, **kw: [fn(i) for i in items])
    monkeypatch.setattr(time, "sleep", lambda seconds: None)  # huggingface_hub's retries back off ~23 s
    with pytest.raises(HubError, match=f"cannot pull factors {FACTORS_REPO}@v2: .*could not be reached"):
        hub.pull_factors(f"{FACTORS_REPO}@v2", cache_dir=cache)
    monkeypatch.undo()
    assert len(calls) >= 2
    # Nothing partial passes for a file: the interrupted ones are absent (at most .incomplete blobs).
    manifest = read_manifest(artifacts.factors["v2"])
    entries = [m for s in manifest["stages"].values() for m in s["modules"]]
    snapshot = next((cache / "datasets--alice--msif-tiny-factors" / "snapshots").iterdir())
    for entry in entries:
        path = snapshot / entry["file"]
        if path.exists():
            assert file_sha256(path) == entry["sha256"]
    assert any(not (snapshot / e["file"]).exists() for e in entries)
    server = HubServer(hub_root, host="127.0.0.1", port=conftest.HUB_PORT, tokens=conftest.HUB_TOKENS).start()
    try:
        folder = hub.pull_factors(f"{FACTORS_REPO}@v2", cache_dir=cache)
        assert read_manifest(folder) == manifest
        assert all(file_sha256(folder / e["file"]) == e["sha256"] for e in entries)
    finally:
        server.stop()


# -- command line -----------------------------------------------------------------------------------
def test_cli_push_pull_find(published, artifacts, hub_server, capsys):
    assert cli_main(["push", "index", str(artifacts.index), "--repo", "alice/msif-cli-index", "--tag", "first",
                     "--private", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["location"] == "alice/msif-cli-index@first" and len(summary["commit"]) == 40
    assert hub_api().dataset_info("alice/msif-cli-index").private is True
    from huggingface_hub import errors

    with pytest.raises(errors.RepositoryNotFoundError):  # private: bob cannot see it
        hub_api(token="test-token-bob").dataset_info("alice/msif-cli-index")
    assert cli_main(["pull", "index", "alice/msif-cli-index@first"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert DocumentIndex.load(folder).ids == [d["id"] for d in artifacts.documents]
    assert cli_main(["pull", "factors", f"{FACTORS_REPO}@v1", "--modules", "mlp"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert (folder / "msif.json").is_file() and (folder / "pretrained" / "mlp").is_dir()
    assert cli_main(["find-factors", "--pretrained", str(artifacts.pretrained), "--finetuned",
                     str(artifacts.finetuned)]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{FACTORS_REPO}@v")


def test_demo_publishes_to_its_own_local_hub_and_pulls_back(artifacts, tmp_path):
    """The demo's step between preparing and attributing (a server of its own on HF_ENDPOINT's port)."""
    from hub_msif.toy import demo

    lines = []
    pulled = demo.publish_and_pull({"factors": artifacts.factors["v1"], "index_folder": artifacts.index}, tmp_path,
                                   echo=lines.append)
    assert pulled is not None, lines
    factors, index = map(Path, pulled)
    assert read_manifest(factors) == read_manifest(artifacts.factors["v1"])
    assert DocumentIndex.load(index).ids == [d["id"] for d in artifacts.documents]
    text = "\n".join(lines)
    assert f"{demo.FACTORS_REPO}@v1" in text and f"{demo.INDEX_REPO}@v1" in text and "pulled both back" in text
    assert (tmp_path / "hub" / "datasets" / "demo").is_dir()  # the demo's own server root


def test_locations():
    assert hub.parse_location("alice/f@v2") == hub.Location(repo_id="alice/f", revision="v2")
    assert hub.parse_location("alice/f") == hub.Location(repo_id="alice/f")
    assert hub.parse_location(f"alice/f@{'a' * 40}").revision == "a" * 40
    assert hub.parse_location("./alice/f").is_local and hub.parse_location(Path("alice/f")).is_local
    assert hub.parse_location(str(ROOT / "hub_msif")).folder == ROOT / "hub_msif"
    assert hub.parse_location("factors").is_local  # no namespace: a folder name
    with pytest.raises(HubError, match="neither a local folder nor a Hub location"):
        hub.parse_location("no--good/x@v1")


def test_no_request_left_loopback(hub_server):
    """Runs last: the session guard (conftest) saw no request to another host, and it is armed."""
    from huggingface_hub import HfApi

    assert conftest.NON_LOOPBACK_REQUESTS == []
    with pytest.raises(Exception, match="non-loopback host"):
        HfApi(endpoint="https://example.com").whoami(token="x")
    assert conftest.NON_LOOPBACK_REQUESTS
    conftest.NON_LOOPBACK_REQUESTS.clear()
    assert all(r["status"] is not None for r in hub_server.request_log)
