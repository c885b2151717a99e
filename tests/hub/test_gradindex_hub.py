"""The gradient index on a Hub (issue 18, deliverable 2): push and pull like the other artifacts,
versions, a card, sha256-verified pulls, listed by ``find-factors --model`` beside the stage it
was built from, and nothing published naming a path of this machine.

The gradient index folders are written directly in the format of docs/design.md ("Gradient
index") by ``conftest.write_gradindex`` (the builder is tested on its own); their ``stage`` is a
real pre-trained stage of a tiny GPT-NeoX (test_push_pull's, fitted once per session), pushed alone. Everything runs against
the loopback Hub-compatible server with the real ``huggingface_hub`` client.
"""

import json
import os
from pathlib import Path

import pytest
from conftest import machine_paths_published, write_gradindex
from test_push_pull import shared_artifacts

from hub_msif import hub
from hub_msif.apps.cli import main as cli_main
from hub_msif.artifacts.atomic import file_sha256
from hub_msif.artifacts.manifest import GRADINDEX, gradindex_files, read_manifest
from hub_msif.errors import HubIntegrityError, HubValueError
from hub_msif.hub.cards import public_gradindex_manifest
from hub_msif.models import folder_revision
from hub_msif.toy.examples import example_texts

pytestmark = pytest.mark.usefixtures("one_thread")
STAGE_REPO, GRADINDEX_REPO = "alice/gi-tiny-base-stage", "alice/gi-tiny-gradindex"
LOCAL_GRADINDEX_REPO, OTHER_MODEL_REPO = "alice/gi-tiny-gradindex-local", "alice/gi-tiny-gradindex-other"
PATHLESS_REPO = "msif-team/gi-tiny-gradindex-pathless"
DIMS = 16


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model's pre-trained stage, fitted for test_push_pull (built once per session and
    shared), and gradient index folders of it."""
    artifacts = shared_artifacts(tmp_path_factory)
    root = tmp_path_factory.mktemp("gradindex-hub")
    stage = artifacts.factors["v1"]  # a pair: its pre-trained stage is pushed alone
    documents = [{"id": f"doc{i}", "text": t} for i, t in enumerate(example_texts(23, seed=0))]
    folders = {"v1": root / "gradindex-v1", "v2": root / "gradindex-v2"}
    write_gradindex(folders["v1"], stage, documents, f"{STAGE_REPO}@v1", dims=DIMS, seed=0, processes=2)
    # Another version: other vectors, three processes (other shard names), and a check result.
    write_gradindex(folders["v2"], stage, documents, f"{STAGE_REPO}@v1", dims=DIMS, seed=1, processes=3,
                    check={"recall": 0.96, "queries": 25, "sample": 23})
    return {"root": root, "artifacts_root": artifacts.root, "pretrained": artifacts.pretrained, "stage": stage,
            "documents": documents, "folders": folders}


_PUSHED: dict = {}


@pytest.fixture
def published(hub_server, world) -> dict:
    """The stage and gradient index v1 and v2, pushed once (the server's storage outlives each test)."""
    if not _PUSHED:
        _PUSHED["stage"] = hub.push_factors(world["stage"], STAGE_REPO, stages="pretrained")
        _PUSHED["v1"] = hub.push_gradindex(world["folders"]["v1"], GRADINDEX_REPO)
        _PUSHED["v2"] = hub.push_gradindex(world["folders"]["v2"], GRADINDEX_REPO)
    return _PUSHED


def _listed(folder: Path) -> list[str]:
    return sorted(gradindex_files(read_manifest(folder, GRADINDEX)))


def test_push_pull_round_trip_is_byte_identical_and_versioned(published, world, hub_server, tmp_path, capsys):
    from huggingface_hub import HfApi

    assert published["stage"].tag == "v1"
    assert (published["v1"].tag, published["v2"].tag) == ("v1", "v2") and published["v1"].created
    for version in ("v1", "v2"):
        local = world["folders"][version]
        pulled = hub.pull_gradindex(f"{GRADINDEX_REPO}@{version}", cache_dir=tmp_path / "cache")
        manifest = read_manifest(pulled, GRADINDEX)
        assert manifest == read_manifest(local, GRADINDEX)  # it records no path: published as is
        assert _listed(pulled) == _listed(local)
        for relative, sha256 in gradindex_files(manifest).items():
            assert (pulled / relative).read_bytes() == (local / relative).read_bytes()
            assert file_sha256(pulled / relative) == sha256
    # A version holds exactly its manifest's files: v2's three shards replace v1's two.
    files = set(HfApi().list_repo_files(GRADINDEX_REPO, repo_type="dataset", revision="v2"))
    assert files == {"gradindex.json", "README.md", ".gitattributes", "documents.parquet",
                     *(f"shards/r{r}-0.safetensors" for r in range(3))}
    # The same folder again: nothing written, the version it is already published as.
    again = hub.push_gradindex(world["folders"]["v2"], GRADINDEX_REPO)
    assert (again.commit, again.tag, again.created) == (published["v2"].commit, "v2", False)
    # The command line: push (already published) and pull.
    assert cli_main(["push", "gradindex", str(world["folders"]["v2"]), "--repo", GRADINDEX_REPO, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "repo": GRADINDEX_REPO, "tag": "v2", "commit": published["v2"].commit, "location": f"{GRADINDEX_REPO}@v2",
        "created": False}
    assert cli_main(["pull", "gradindex", f"{GRADINDEX_REPO}@v1", "--json"]) == 0
    folder = Path(json.loads(capsys.readouterr().out)["folder"])
    assert folder.name == published["v1"].commit and _listed(folder) == _listed(world["folders"]["v1"])
    # A local folder is returned as is once its manifest reads.
    assert hub.pull_gradindex(str(world["folders"]["v1"])) == world["folders"]["v1"]


def _stored_copies(root: Path, data: bytes) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.stat().st_size == len(data) and p.read_bytes() == data]


def test_a_shard_altered_on_the_hub_is_refused_on_pull(published, world, hub_server, hub_root, tmp_path):
    victim = "shards/r1-0.safetensors"
    good = (world["folders"]["v1"] / victim).read_bytes()
    copies = _stored_copies(Path(hub_root), good)
    assert copies, "the pushed shard is not stored as is on the server"
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    try:
        for path in copies:
            path.write_bytes(bytes(bad))
        with pytest.raises(HubIntegrityError) as err:
            hub.pull_gradindex(f"{GRADINDEX_REPO}@v1", cache_dir=tmp_path / "cache")
        message = str(err.value)
        assert f"{GRADINDEX_REPO}@v1" in message and published["v1"].commit in message and victim in message
        assert "corrupted or was altered" in message and "\n" not in message
        assert not list((tmp_path / "cache").glob(f"datasets--*/snapshots/*/{victim}"))
        assert not [p for p in (tmp_path / "cache").rglob("blobs/*") if p.read_bytes() == bytes(bad)]
    finally:
        for path in copies:
            path.write_bytes(good)
    folder = hub.pull_gradindex(f"{GRADINDEX_REPO}@v1", cache_dir=tmp_path / "cache")
    assert (folder / victim).read_bytes() == good


def test_find_factors_lists_the_gradient_index_beside_its_stage(published, world, hub_server, tmp_path, capsys):
    # An index built from the stage's local folder (its location is no published version: listed beside
    # every pre-trained stage of the model, not pinned), and one of another model (never listed).
    local = tmp_path / "gradindex-local"
    write_gradindex(local, world["stage"], world["documents"], str(world["stage"]), dims=8, seed=2)
    hub.push_gradindex(local, LOCAL_GRADINDEX_REPO)
    other = tmp_path / "gradindex-other"
    write_gradindex(other, world["stage"], world["documents"], f"{STAGE_REPO}@v1", dims=8, seed=3)
    manifest = json.loads((other / "gradindex.json").read_text())
    manifest["stage"]["model"] = {**manifest["stage"]["model"], "revision": "sha256:" + "0" * 64}
    (other / "gradindex.json").write_text(json.dumps(manifest))
    hub.push_gradindex(other, OTHER_MODEL_REPO)

    pretrained = str(world["pretrained"])
    assert cli_main(["find-factors", "--model", pretrained, "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    assert {f["model"]["revision"] for f in found} == {folder_revision(world["pretrained"])}
    mine = [f for f in found if f["location"] == f"{STAGE_REPO}@v1"]
    assert len(mine) == 1 and mine[0]["stage"] == "pretrained"
    indexes = {g["location"]: g for g in mine[0]["gradient_indexes"]}
    assert set(indexes) == {f"{GRADINDEX_REPO}@v2", f"{GRADINDEX_REPO}@v1", f"{LOCAL_GRADINDEX_REPO}@v1"}
    order = [g["location"] for g in mine[0]["gradient_indexes"]]
    dates = [g["date"] for g in mine[0]["gradient_indexes"]]
    assert all(dates) and dates == sorted(dates, reverse=True)  # newest first
    assert order.index(f"{GRADINDEX_REPO}@v2") < order.index(f"{GRADINDEX_REPO}@v1")
    v2 = indexes[f"{GRADINDEX_REPO}@v2"]
    assert v2["pinned"] is True and v2["stage_location"] == f"{STAGE_REPO}@v1"
    assert v2["commit"] == published["v2"].commit and v2["num_documents"] == len(world["documents"])
    assert v2["bytes_per_document"] == DIMS * 2 + 4 and v2["projection"]["dims"] == DIMS
    assert v2["projection"]["kind"] == "kronecker" and v2["projection"]["seed"] == 1
    assert v2["check"] == {"recall": 0.96, "queries": 25, "sample": 23}
    assert v2["model"] == {k: mine[0]["model"][k] for k in ("id", "revision", "local")}
    assert v2["corpus"]["data"] == "pretrain.jsonl"
    assert indexes[f"{LOCAL_GRADINDEX_REPO}@v1"]["pinned"] is False
    assert indexes[f"{LOCAL_GRADINDEX_REPO}@v1"]["stage_location"] == "factors-v1"  # the folder's name only
    # Another published version of the same model's stage holds none of the pinned indexes.
    for entry in found:
        if entry["location"] != f"{STAGE_REPO}@v1":
            assert not {g["location"] for g in entry["gradient_indexes"]} & {f"{GRADINDEX_REPO}@v1",
                                                                             f"{GRADINDEX_REPO}@v2"}
    # Text: one indented line per index under its stage.
    assert cli_main(["find-factors", "--model", pretrained]) == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith(f"{STAGE_REPO}@v1  pretrained  "))
    below = {line.split(": ")[0].split()[-1]: line for line in lines[at + 1:at + 4]}
    assert all(line.startswith("    gradient index ") for line in below.values())
    assert [below[location] for location in order] == lines[at + 1:at + 4]  # in the JSON's order
    assert "; built from factors-v1" in below[f"{LOCAL_GRADINDEX_REPO}@v1"]
    assert below[f"{GRADINDEX_REPO}@v2"].startswith(
        f"    gradient index {GRADINDEX_REPO}@v2: {len(world['documents'])} documents of pretrain.jsonl, "
        f"{DIMS * 2 + 4} bytes per document, kronecker projection (dims {DIMS}, seed 1); check recall 0.96  (")
    assert "built from" not in below[f"{GRADINDEX_REPO}@v1"] and "check" not in below[f"{GRADINDEX_REPO}@v1"]
    assert OTHER_MODEL_REPO not in "\n".join(lines)
    # Only the pre-trained stage has gradient indexes; the fine-tuned filter lists no stage here.
    assert cli_main(["find-factors", "--model", pretrained, "--stage", "finetuned", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_the_card_names_model_stage_corpus_sizes_projection_check_and_usage(published, world, hub_server):
    from huggingface_hub import HfApi, hf_hub_download

    card = Path(hf_hub_download(GRADINDEX_REPO, "README.md", repo_type="dataset", revision="v2")).read_text()
    model = read_manifest(world["stage"])["stages"]["pretrained"]["model"]
    name = f"pretrained (sha256:{model['revision'][7:19]})"
    assert f"# Gradient index of pretrain.jsonl for {name} (pre-trained stage)" in card
    assert f"| model | `{name}@{model['revision']}` |" in card
    assert f"| stage | pre-trained, factors from `{STAGE_REPO}@v1`" in card
    assert f"| documents | {len(world['documents'])} (fingerprint `" in card
    assert f"| bytes per document | {DIMS * 2 + 4} ({DIMS} float16 numbers + a float32 norm) |" in card
    num_modules = len(read_manifest(world["stage"])["stages"]["pretrained"]["modules"])
    for row in ("| kind | kronecker |", f"| k per module | 4 × 4 (each of {num_modules} modules) |",
                f"| dims | {DIMS} |", "| balance | 0.5 |", "| seed | 1 |", "| damping at build | 0.1 (relative) |"):
        assert row in card, row
    assert "recall@10 of the exact MS-IF top 10 within this index's top 100 is\n**0.96** over 25 queries" in card
    assert f"hub-msif pull gradindex {GRADINDEX_REPO}@v2" in card
    assert (f"hub-msif attribute --factors-pretrained {STAGE_REPO}@v1 --factors-finetuned <FINETUNED_REPO>@<TAG> "
            f"--gradindex {GRADINDEX_REPO}@v2") in card
    v1 = Path(hf_hub_download(GRADINDEX_REPO, "README.md", repo_type="dataset", revision="v1")).read_text()
    assert "## Check" not in v1 and "| seed | 0 |" in v1
    # Metadata: found by its tags; the documents load as the train split.
    info = HfApi().dataset_info(GRADINDEX_REPO, revision="v2")
    data = info.card_data.to_dict()
    assert set(data["tags"]) == {"hub-msif", "gradient-index", "influence-functions"}
    meta = data["hub_msif"]
    assert meta["artifact"] == "gradindex" and meta["bytes_per_document"] == DIMS * 2 + 4
    assert meta["model"] == {"id": name, "revision": model["revision"]}
    assert meta["stage"]["location"] == f"{STAGE_REPO}@v1" and meta["num_documents"] == len(world["documents"])
    assert meta["projection"]["dims"] == DIMS and meta["check"]["recall"] == 0.96
    assert data["configs"] == [{"config_name": "default", "data_files": [{"split": "train",
                                                                           "path": "documents.parquet"}]}]
    listed = {d.id for d in HfApi().list_datasets(filter=["hub-msif", "gradient-index"])}
    assert GRADINDEX_REPO in listed and STAGE_REPO not in listed


def test_nothing_published_names_a_path_of_this_machine(world, hub_server, tmp_path, capsys):
    folder = tmp_path / "gradindex-paths"
    corpus = {"data": str((world["artifacts_root"] / "pretrain.jsonl").resolve()), "documents_sha256": "0" * 64}
    write_gradindex(folder, world["stage"], world["documents"], str(world["stage"].resolve()), dims=8, seed=4,
                    corpus=corpus, check={"recall": 1.0, "queries": str(world["root"] / "queries.jsonl"),
                                          "sample": 23})
    assert cli_main(["push", "gradindex", str(folder), "--repo", PATHLESS_REPO, "--model-name", "tiny-base"]) == 0
    capsys.readouterr()
    paths = [p for p in {str(Path.home()), os.getcwd(), str(world["root"]), str(world["root"].resolve()),
                         str(world["artifacts_root"]), str(tmp_path)} if len(p) > 1]
    assert not machine_paths_published([(PATHLESS_REPO, "dataset")], paths, tmp_path / "downloads")
    pulled = read_manifest(hub.pull_gradindex(f"{PATHLESS_REPO}@v1"), GRADINDEX)
    assert pulled["stage"]["location"] == "factors-v1" and pulled["corpus"]["data"] == "pretrain.jsonl"
    assert pulled["check"]["queries"] == "queries.jsonl"
    assert pulled == public_gradindex_manifest(read_manifest(folder, GRADINDEX))

    # A path under a key the publisher does not know: refused in one line, nothing pushed.
    manifest = json.loads((folder / "gradindex.json").read_text())
    manifest["build"] = {"scratch": str(tmp_path / "scratch")}
    (folder / "gradindex.json").write_text(json.dumps(manifest))
    with pytest.raises(HubValueError, match=r"gradindex.json records a path of this machine at build\.scratch: "
                                            r"refusing to publish it"):
        hub.push_gradindex(folder, "alice/gi-never-created")
    from huggingface_hub import HfApi

    assert "alice/gi-never-created" not in {d.id for d in HfApi().list_datasets(author="alice")}


def test_a_broken_gradient_index_is_never_pushed(world, hub_server, tmp_path):
    import shutil

    from safetensors.numpy import load_file, save_file

    def copy(name: str) -> Path:
        folder = tmp_path / name
        shutil.copytree(world["folders"]["v1"], folder)
        return folder

    altered = copy("altered")
    data = bytearray((altered / "shards/r0-0.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (altered / "shards/r0-0.safetensors").write_bytes(bytes(data))
    with pytest.raises(HubValueError, match=r"refusing to push gradindex .*shards/r0-0.safetensors"):
        hub.push_gradindex(altered, "alice/gi-never-pushed")
    # A shard missing a row (its sha256 recorded anew): the rows no longer add up to the documents.
    short = copy("short")
    tensors = load_file(short / "shards/r1-0.safetensors")
    save_file({k: v[:-1] for k, v in tensors.items()}, short / "shards/r1-0.safetensors")
    manifest = json.loads((short / "gradindex.json").read_text())
    manifest["files"]["shards/r1-0.safetensors"]["sha256"] = file_sha256(short / "shards/r1-0.safetensors")
    (short / "gradindex.json").write_text(json.dumps(manifest))
    with pytest.raises(HubValueError, match=rf"its shards hold {len(world['documents']) - 1} rows, the manifest "
                                            rf"records {len(world['documents'])} documents"):
        hub.push_gradindex(short, "alice/gi-never-pushed")
    # float32 vectors instead of float16.
    wide = copy("wide")
    tensors = load_file(wide / "shards/r0-0.safetensors")
    save_file({**tensors, "vectors": tensors["vectors"].astype("float32")}, wide / "shards/r0-0.safetensors")
    manifest = json.loads((wide / "gradindex.json").read_text())
    manifest["files"]["shards/r0-0.safetensors"]["sha256"] = file_sha256(wide / "shards/r0-0.safetensors")
    (wide / "gradindex.json").write_text(json.dumps(manifest))
    with pytest.raises(HubValueError, match=r"shards/r0-0.safetensors lacks a F16 tensor 'vectors'"):
        hub.push_gradindex(wide, "alice/gi-never-pushed")
    # A listed file through a link to outside the folder: refused before it is opened.
    linked = copy("linked")
    (linked / "shards/r0-0.safetensors").unlink()
    (linked / "shards/r0-0.safetensors").symlink_to(world["folders"]["v1"] / "shards/r0-0.safetensors")
    with pytest.raises(HubValueError, match=r"symbolic link"):
        hub.push_gradindex(linked, "alice/gi-never-pushed")
    from huggingface_hub import HfApi

    assert "alice/gi-never-pushed" not in {d.id for d in HfApi().list_datasets(author="alice")}
