"""The loopback Hub-compatible server (hub_msif.hub.server) driven by the real clients over HTTP.

Every test talks to the ``hub_server`` fixture (the session's ``HF_ENDPOINT``) with the real
``huggingface_hub`` and ``datasets`` clients; nothing is mocked. Users: alice (``HF_TOKEN``, writes
to alice/ and msif-team/), bob (writes to bob/ only), carol (read-only token). Repo names carry a
random suffix: the server's storage outlives each test and is shared with other test modules.
"""

import base64
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import conftest
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    DatasetCard,
    HfApi,
    HfFileSystem,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    BadRequestError,
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from hub_msif.hub.server import HubServer, git_blob_sha1, parse_token_spec

ALICE, BOB, CAROL = "test-token-alice", "test-token-bob", "test-token-carol-read"
ROOT = Path(__file__).resolve().parents[3]


def _name(stem: str) -> str:
    return f"hs-{stem}-{uuid.uuid4().hex[:8]}"


def _status(err: HfHubHTTPError) -> int:
    return err.response.status_code


@pytest.fixture
def api():
    return HfApi()  # HF_ENDPOINT and HF_TOKEN (alice) from conftest


def _resolve_requests(server: HubServer, start: int, repo_id: str) -> list[str]:
    return [f"{r['method']} {r['path']}" for r in server.request_log[start:] if f"/{repo_id}/resolve/" in r["path"]]


# -- accounts and repos ----------------------------------------------------------------------------


def test_whoami_tokens_and_repo_creation_rights(hub_server, api):
    me = api.whoami()
    assert me["name"] == "alice" and [o["name"] for o in me["orgs"]] == ["msif-team"]
    assert me["auth"]["accessToken"]["role"] == "write"
    assert api.whoami(token=CAROL)["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api.whoami(token="not-a-token")

    name = _name("create")
    url = api.create_repo(f"alice/{name}", repo_type="dataset")
    assert url == f"{hub_server.url}/datasets/alice/{name}" and url.repo_id == f"alice/{name}"
    assert api.list_repo_files(f"alice/{name}", repo_type="dataset") == [".gitattributes"]
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(f"alice/{name}", repo_type="dataset")
    assert _status(err.value) == 409
    assert api.create_repo(f"alice/{name}", repo_type="dataset", exist_ok=True).repo_id == f"alice/{name}"

    assert api.create_repo(_name("bare")).repo_id.startswith("alice/")  # no namespace: the token's user
    assert api.create_repo(f"msif-team/{_name('org')}", private=True).repo_id.startswith("msif-team/")
    with pytest.raises(HfHubHTTPError, match="rights") as err:
        api.create_repo(f"alice/{_name('bob')}", token=BOB)
    assert _status(err.value) == 403
    with pytest.raises(HfHubHTTPError, match="read-only") as err:
        api.create_repo(f"carol/{_name('carol')}", token=CAROL)
    assert _status(err.value) == 403
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(f"alice/{_name('anon')}", token=False)
    assert _status(err.value) == 401
    with pytest.raises(HfHubHTTPError) as err:
        api.create_repo(f"alice/{_name('badtoken')}", token="not-a-token")
    assert _status(err.value) == 401 and "Invalid credentials" in str(err.value)

    api.delete_repo(f"alice/{name}", repo_type="dataset")
    assert not api.repo_exists(f"alice/{name}", repo_type="dataset")
    api.delete_repo(f"alice/{name}", repo_type="dataset", missing_ok=True)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(f"alice/{name}", repo_type="dataset")


# -- commits, LFS, downloads -----------------------------------------------------------------------


@pytest.fixture
def filled(hub_server, api):
    """A dataset repo with regular, LFS (> 10 MiB) and binary-sample files, a tag and a branch."""
    repo_id = f"alice/{_name('files')}"
    api.create_repo(repo_id, repo_type="dataset")
    big = os.urandom(10 * 1024 * 1024 + 7)
    binary = b"\x00\x01 not text" * 10
    readme = b"---\nlicense: mit\ntags: [hubserver-test, influence]\n---\n# Files\n"
    start = len(hub_server.request_log)
    info = api.create_commit(repo_id, [
        CommitOperationAdd("data/a.txt", b"hello"),
        CommitOperationAdd("data/b.csv", b"x,y\n1,2\n"),
        CommitOperationAdd("weights/big.dat", big),
        CommitOperationAdd("weights/small.dat", binary),
        CommitOperationAdd("README.md", readme),
    ], commit_message="add files", repo_type="dataset")
    log = hub_server.request_log[start:]
    api.create_tag(repo_id, tag="v1", repo_type="dataset")
    return {"repo_id": repo_id, "sha": info.oid, "big": big, "binary": binary, "readme": readme, "log": log}


def test_one_commit_with_regular_and_lfs_files(hub_server, api, filled):
    repo_id, log = filled["repo_id"], filled["log"]
    methods = [(r["method"], r["path"].split("?")[0]) for r in log]
    assert ("POST", f"/datasets/{repo_id}.git/info/lfs/objects/batch") in methods
    assert [p for m, p in methods if m == "PUT"] and all(r["status"] == 200 for r in log)
    assert [p for m, p in methods if p.endswith("/commit/main")] == [f"/api/datasets/{repo_id}/commit/main"]

    info = api.dataset_info(repo_id, files_metadata=True)
    assert info.sha == filled["sha"]
    siblings = {s.rfilename: s for s in info.siblings}
    assert set(siblings) == {".gitattributes", "README.md", "data/a.txt", "data/b.csv", "weights/big.dat",
                             "weights/small.dat"}
    assert siblings["data/a.txt"].lfs is None and siblings["data/a.txt"].blob_id == git_blob_sha1(b"hello")
    big = siblings["weights/big.dat"]
    assert big.lfs.sha256 == hashlib.sha256(filled["big"]).hexdigest() and big.size == len(filled["big"])
    assert siblings["weights/small.dat"].lfs.sha256 == hashlib.sha256(filled["binary"]).hexdigest()
    assert info.card_data.license == "mit" and {"hubserver-test", "license:mit"} <= set(info.tags)

    tree = {e.path: e for e in api.list_repo_tree(repo_id, repo_type="dataset", recursive=True)}
    assert tree["weights/big.dat"].lfs.sha256 == big.lfs.sha256 and tree["data"].tree_id
    assert [e.path for e in api.list_repo_tree(repo_id, path_in_repo="data", repo_type="dataset")] == [
        "data/a.txt", "data/b.csv"]
    paths = api.get_paths_info(repo_id, ["data/a.txt", "weights", "missing.txt"], repo_type="dataset")
    assert [(type(p).__name__, p.path) for p in paths] == [("RepoFile", "data/a.txt"), ("RepoFolder", "weights")]
    assert api.file_exists(repo_id, "weights/big.dat", repo_type="dataset")
    assert not api.file_exists(repo_id, "weights/nope.dat", repo_type="dataset")

    # the same content again is a no-op: preupload returns the remote oids and nothing is committed
    again = api.upload_file(path_or_fileobj=b"hello", path_in_repo="data/a.txt", repo_id=repo_id,
                            repo_type="dataset")
    assert again.oid == filled["sha"]


def test_downloads_by_branch_tag_and_sha_with_cache_and_range(hub_server, api, filled, tmp_path):
    repo_id, sha, big = filled["repo_id"], filled["sha"], filled["big"]
    by_branch = hf_hub_download(repo_id, "weights/big.dat", repo_type="dataset")
    assert Path(by_branch).read_bytes() == big
    assert Path(by_branch).resolve().name == hashlib.sha256(big).hexdigest()  # LFS etag = sha256
    assert sha in by_branch
    by_tag = hf_hub_download(repo_id, "data/a.txt", repo_type="dataset", revision="v1")
    assert Path(by_tag).read_bytes() == b"hello" and Path(by_tag).resolve().name == git_blob_sha1(b"hello")
    start = len(hub_server.request_log)
    by_sha = hf_hub_download(repo_id, "data/a.txt", repo_type="dataset", revision=sha)
    assert by_sha == by_tag and len(hub_server.request_log) == start  # cached snapshot: no request at all
    local = hf_hub_download(repo_id, "README.md", repo_type="dataset", local_dir=tmp_path, force_download=True)
    assert Path(local).read_bytes() == filled["readme"]

    start = len(hub_server.request_log)
    with HfFileSystem().open(f"datasets/{repo_id}/weights/big.dat", "rb", block_size=1024) as handle:
        handle.seek(5 * 1024 * 1024)
        assert handle.read(100) == big[5 * 1024 * 1024: 5 * 1024 * 1024 + 100]
    assert any(r["status"] == 206 for r in hub_server.request_log[start:])
    head = get_session().head(f"{hub_server.url}/datasets/{repo_id}/resolve/v1/weights/big.dat",
                              headers={"authorization": f"Bearer {ALICE}"})
    assert head.headers["X-Repo-Commit"] == sha and int(head.headers["Content-Length"]) == len(big)


def test_snapshot_download_with_allow_patterns_fetches_only_matching_files(hub_server, api, filled):
    repo_id = filled["repo_id"]
    start = len(hub_server.request_log)
    folder = Path(snapshot_download(repo_id, repo_type="dataset", revision="v1", allow_patterns=["data/*.txt"]))
    assert (folder / "data" / "a.txt").read_bytes() == b"hello"
    requested = _resolve_requests(hub_server, start, repo_id)
    assert requested and all(r.endswith("/data/a.txt") for r in requested)
    assert not [r for r in requested if "big.dat" in r or "b.csv" in r]


def test_branches_tags_commits_and_pull_requests(hub_server, api, filled):
    repo_id, sha = filled["repo_id"], filled["sha"]
    api.create_branch(repo_id, branch="feature/x", repo_type="dataset")
    api.create_branch(repo_id, branch="feature/x", repo_type="dataset", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as err:
        api.create_branch(repo_id, branch="feature/x", repo_type="dataset")
    assert _status(err.value) == 409
    dev = api.upload_file(path_or_fileobj=b"on a branch", path_in_repo="dev.txt", repo_id=repo_id,
                          repo_type="dataset", revision="feature/x")
    assert hf_hub_download(repo_id, "dev.txt", repo_type="dataset", revision="feature/x")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "dev.txt", repo_type="dataset")  # not on main
    commits = api.list_repo_commits(repo_id, repo_type="dataset", revision="feature/x")
    assert [c.commit_id for c in commits][:2] == [dev.oid, sha] and commits[-1].title == "initial commit"
    assert commits[0].authors == ["alice"]

    with pytest.raises(HfHubHTTPError) as err:
        api.create_tag(repo_id, tag="v1", repo_type="dataset")
    assert _status(err.value) == 409
    api.create_tag(repo_id, tag="v1", repo_type="dataset", exist_ok=True)
    api.create_tag(repo_id, tag="v2", revision="feature/x", repo_type="dataset", tag_message="second")
    refs = api.list_repo_refs(repo_id, repo_type="dataset")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": sha, "feature/x": dev.oid}
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": sha, "v2": dev.oid}
    assert api.revision_exists(repo_id, "v2", repo_type="dataset")
    api.delete_tag(repo_id, tag="v2", repo_type="dataset")
    with pytest.raises(RevisionNotFoundError):
        api.delete_tag(repo_id, tag="v2", repo_type="dataset")
    api.delete_branch(repo_id, branch="feature/x", repo_type="dataset")
    assert not api.revision_exists(repo_id, "feature/x", repo_type="dataset")

    pr = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="pr.txt", repo_id=repo_id,
                         repo_type="dataset", create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    path = hf_hub_download(repo_id, "pr.txt", repo_type="dataset", revision="refs/pr/1")
    assert Path(path).read_bytes() == b"proposal"
    assert [p.name for p in api.list_repo_refs(repo_id, repo_type="dataset", include_pull_requests=True)
            .pull_requests] == ["refs/pr/1"]

    copy = api.create_commit(repo_id, [CommitOperationCopy("weights/big.dat", "copy/big.dat"),
                                       CommitOperationDelete("data/b.csv")],
                             commit_message="copy and delete", repo_type="dataset")
    files = api.list_repo_files(repo_id, repo_type="dataset", revision=copy.oid)
    assert "copy/big.dat" in files and "data/b.csv" not in files


def test_commits_are_atomic_and_checked(hub_server, api, filled):
    repo_id, sha = filled["repo_id"], filled["sha"]
    with pytest.raises(EntryNotFoundError, match="doesn't exist"):
        api.create_commit(repo_id, [CommitOperationAdd("new.txt", b"new"), CommitOperationDelete("missing.txt")],
                          commit_message="half", repo_type="dataset")
    assert api.dataset_info(repo_id).sha == sha  # nothing landed
    assert "new.txt" not in api.list_repo_files(repo_id, repo_type="dataset")

    api.upload_file(path_or_fileobj=b"moved on", path_in_repo="moved.txt", repo_id=repo_id, repo_type="dataset")
    with pytest.raises(HfHubHTTPError) as err:
        api.upload_file(path_or_fileobj=b"stale", path_in_repo="stale.txt", repo_id=repo_id, repo_type="dataset",
                        parent_commit=sha)
    assert _status(err.value) == 412

    headers = {"authorization": f"Bearer {ALICE}", "content-type": "application/x-ndjson"}
    oid = hashlib.sha256(b"never uploaded").hexdigest()
    body = "\n".join(json.dumps(line) for line in [
        {"key": "header", "value": {"summary": "lfs without upload"}},
        {"key": "file", "value": {"path": "ok.txt", "content": base64.b64encode(b"ok").decode(), "encoding": "base64"}},
        {"key": "lfsFile", "value": {"path": "ghost.bin", "algo": "sha256", "oid": oid, "size": 14}},
    ]) + "\n"
    before = api.dataset_info(repo_id).sha
    response = get_session().post(f"{hub_server.url}/api/datasets/{repo_id}/commit/main", content=body, headers=headers)
    assert response.status_code == 422 and oid in response.json()["error"]
    assert api.dataset_info(repo_id).sha == before

    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, repo_type="dataset",
                        revision="no-such-branch")
    with pytest.raises(ValueError, match="Invalid metadata in README.md"):
        api.upload_file(path_or_fileobj=b"---\nlicense: [unclosed\n---\n", path_in_repo="README.md",
                        repo_id=repo_id, repo_type="dataset")
    with pytest.raises(BadRequestError):
        api.create_branch(repo_id, branch="refs/foo/bar", repo_type="dataset")


# -- errors and visibility -------------------------------------------------------------------------


def test_errors_map_to_the_client_exceptions(hub_server, api, filled):
    repo_id = filled["repo_id"]
    with pytest.raises(RepositoryNotFoundError):
        api.dataset_info(f"alice/{_name('missing')}")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"alice/{_name('missing')}", "a.txt", repo_type="dataset")
    with pytest.raises(RevisionNotFoundError):
        api.dataset_info(repo_id, revision="no-such-rev")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "data/a.txt", repo_type="dataset", revision="no-such-rev")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "data/missing.txt", repo_type="dataset")
    with pytest.raises(EntryNotFoundError):
        api.list_repo_tree(repo_id, path_in_repo="nowhere", repo_type="dataset").__next__()

    for token, status, words in ((BOB, 403, "rights"), (CAROL, 403, "read-only"), (False, 401, "authenticated")):
        with pytest.raises(HfHubHTTPError, match=words) as err:
            api.upload_file(path_or_fileobj=b"intruder", path_in_repo="intruder.txt", repo_id=repo_id,
                            repo_type="dataset", token=token)
        assert _status(err.value) == status
        with pytest.raises(HfHubHTTPError) as err:
            api.create_tag(repo_id, tag=_name("t"), repo_type="dataset", token=token)
        assert _status(err.value) == status
    # public repos read without any token, or with a read-only one
    assert api.dataset_info(repo_id, token=False).sha == filled["sha"]
    assert Path(hf_hub_download(repo_id, "data/b.csv", repo_type="dataset", token=CAROL)).read_bytes() == b"x,y\n1,2\n"


def test_private_repos_are_invisible_to_others(hub_server, api):
    repo_id = f"msif-team/{_name('private')}"
    api.create_repo(repo_id, repo_type="dataset", private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="secret.txt", repo_id=repo_id, repo_type="dataset")
    assert api.dataset_info(repo_id).private is True
    for token in (False, BOB, CAROL):
        with pytest.raises(RepositoryNotFoundError):
            api.dataset_info(repo_id, token=token)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(repo_id, "secret.txt", repo_type="dataset", token=token)
        assert repo_id not in [d.id for d in api.list_datasets(author="msif-team", token=token)]
    anonymous = [r for r in hub_server.request_log if r["user"] is None and repo_id in r["path"]]
    assert anonymous and all(r["status"] == 401 for r in anonymous)
    assert repo_id in [d.id for d in api.list_datasets(author="msif-team")]

    api.update_repo_settings(repo_id, private=False, repo_type="dataset")
    assert api.dataset_info(repo_id, token=False).private is False
    with pytest.raises(HfHubHTTPError) as err:
        api.update_repo_settings(repo_id, private=True, repo_type="dataset", token=BOB)
    assert _status(err.value) == 403


def test_cards_and_search(hub_server, api):
    tag = f"topic-{uuid.uuid4().hex[:6]}"
    first, second = f"alice/{_name('card-a')}", f"msif-team/{_name('card-b')}"
    for repo_id, lic in ((first, "mit"), (second, "apache-2.0")):
        api.create_repo(repo_id, repo_type="dataset")
        card = DatasetCard(f"---\nlicense: {lic}\ntags: [{tag}]\nlanguage: [en]\n---\n# {repo_id}\n")
        card.push_to_hub(repo_id)
    loaded = DatasetCard.load(first)
    assert loaded.data.license == "mit" and loaded.data.tags == [tag] and loaded.text.strip() == f"# {first}"
    assert api.dataset_info(first).card_data.to_dict()["language"] == ["en"]

    assert sorted(d.id for d in api.list_datasets(filter=tag)) == sorted([first, second])
    assert [d.id for d in api.list_datasets(filter=[tag, "license:mit"])] == [first]
    assert [d.id for d in api.list_datasets(filter=tag, author="msif-team")] == [second]
    assert [d.id for d in api.list_datasets(search=second.split("/")[1])] == [second]
    assert len(list(api.list_datasets(filter=tag, limit=1))) == 1
    full = next(iter(api.list_datasets(filter=[tag, "license:mit"], full=True)))
    assert {s.rfilename for s in full.siblings} == {".gitattributes", "README.md"}
    assert list(api.list_datasets(filter=tag, token=False))  # public: anonymous sees them

    model = f"alice/{_name('model')}"
    api.create_repo(model)
    api.upload_file(path_or_fileobj=f"---\nlibrary_name: transformers\ntags: [{tag}]\n---\n".encode(),
                    path_in_repo="README.md", repo_id=model)
    assert [m.id for m in api.list_models(filter=[tag, "transformers"])] == [model]
    assert api.model_info(model).library_name == "transformers"


def test_pagination_follows_link_headers(hub_server, api):
    repo_id = f"alice/{_name('many')}"
    api.create_repo(repo_id, repo_type="dataset")
    ops = [CommitOperationAdd(f"f/{i:03d}.txt", str(i).encode()) for i in range(60)]
    api.create_commit(repo_id, ops, commit_message="many", repo_type="dataset")
    start = len(hub_server.request_log)
    entries = list(api.list_repo_tree(repo_id, path_in_repo="f", repo_type="dataset", expand=True))
    assert len(entries) == 60 and all(e.last_commit.title == "many" for e in entries)
    pages = [r for r in hub_server.request_log[start:] if "/tree/" in r["path"]]
    assert len(pages) == 2 and "cursor=50" in pages[1]["path"]


# -- persistence, datasets, command line -----------------------------------------------------------


def test_repos_survive_a_restart_on_the_same_root(hub_server, hub_root, api, filled, tmp_path):
    repo_id = filled["repo_id"]
    hub_server.stop()
    with HubServer(hub_root, port=conftest.HUB_PORT, tokens=conftest.HUB_TOKENS) as again:
        assert again.url == hub_server.url  # the port of a stopped server is free at once
        assert api.dataset_info(repo_id).sha == filled["sha"]
        assert {t.name for t in api.list_repo_refs(repo_id, repo_type="dataset").tags} == {"v1"}
        path = hf_hub_download(repo_id, "weights/big.dat", repo_type="dataset", local_dir=tmp_path,
                               force_download=True)
        assert Path(path).read_bytes() == filled["big"]
        assert any(r["path"].endswith("/weights/big.dat") for r in again.request_log)  # the new server answered
        api.upload_file(path_or_fileobj=b"after restart", path_in_repo="later.txt", repo_id=repo_id,
                        repo_type="dataset")
    hub_server.start()
    assert "later.txt" in api.list_repo_files(repo_id, repo_type="dataset")


def test_load_dataset_reads_a_parquet_repo(hub_server, api, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    # datasets also asks the dataset viewer (datasets-server.<HF_ENDPOINT host>) for exported infos
    # and pings an S3 download counter: neither host is this server, and the session's guard
    # refuses (and reports) both.
    monkeypatch.setattr(datasets.config, "USE_PARQUET_EXPORT", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
    repo_id = f"msif-team/{_name('docs')}"
    api.create_repo(repo_id, repo_type="dataset")
    buffer = io.BytesIO()
    pq.write_table(pa.table({"id": ["d0", "d1", "d2"], "text": ["alpha", "beta", "gamma"]}), buffer)
    readme = "---\nconfigs:\n- config_name: default\n  data_files: documents.parquet\n---\n# Documents\n"
    api.create_commit(repo_id, [CommitOperationAdd("documents.parquet", buffer.getvalue()),
                                CommitOperationAdd("README.md", readme.encode())],
                      commit_message="documents", repo_type="dataset")
    loaded = datasets.load_dataset(repo_id, split="train")
    assert loaded.column_names == ["id", "text"] and loaded["text"] == ["alpha", "beta", "gamma"]
    assert not conftest.NON_LOOPBACK_REQUESTS


def test_token_specs():
    assert parse_token_spec("t1=dave") == ("t1", {"user": "dave", "orgs": [], "role": "write"})
    assert parse_token_spec("t2=erin:lab,team:read") == ("t2", {"user": "erin", "orgs": ["lab", "team"], "role": "read"})
    assert parse_token_spec("t3=frank:read") == ("t3", {"user": "frank", "orgs": [], "role": "read"})
    for bad in ("nouser", "t=", "=u", "t=u:a:b:c", "t=bad--name"):
        with pytest.raises(ValueError):
            parse_token_spec(bad)


def test_hub_serve_command(tmp_path):
    root = tmp_path / "hub"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-m", "hub_msif.apps.cli", "hub", "serve", "--root", str(root), "--port", "0",
         "--token", "dave-token=dave:lab", "--token", "erin-token=erin:read"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) as proc:
        try:
            line = proc.stdout.readline()
            assert line.startswith("Hub server at http://127.0.0.1:"), line + proc.stderr.read()
            url = line.split()[3]
            dave = HfApi(endpoint=url, token="dave-token")
            assert dave.whoami()["orgs"][0]["name"] == "lab"
            assert dave.create_repo("lab/served", repo_type="dataset").repo_id == "lab/served"
            with pytest.raises(HfHubHTTPError, match="read-only"):
                HfApi(endpoint=url, token="erin-token").create_repo("erin/nope")
            tokens = json.loads((root / "tokens.json").read_text())
            assert tokens["erin-token"] == {"user": "erin", "orgs": [], "role": "read"}
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                code = proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()  # leaving the with block would otherwise wait for it forever
                raise
            assert code == 0
    assert (root / "datasets" / "lab" / "served" / "repo.json").is_file()
