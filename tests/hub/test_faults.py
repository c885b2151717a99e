"""Faults around the Hub from the attack report of issue 12: local paths that are no artifact,
pushes that write nothing, Ctrl-C during a push, files left from an earlier version, uploads no
commit references, a corrupted cache, and a Hub that is down.

Everything runs against the loopback server of the ``hub_server`` fixture with the real
``huggingface_hub`` client, and reuses the artifacts of ``test_push_pull.py`` (built once per
session). Repos of this module carry a random suffix and are never ``FACTORS_REPO``, whose
versions ``test_push_pull.py`` counts.
"""

import json
import logging
import os
import pickle
import re
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import conftest
import pytest
from test_push_pull import (
    FACTORS_REPO,
    KILL_AFTER_FIRST_LFS_UPLOAD,
    LOOPBACK_GUARD,
    edited_copy,
    hub_api,
    publish_once,
    shared_artifacts,
)

from hub_msif import hub
from hub_msif.apps.cli import main as cli_main
from hub_msif.artifacts.atomic import file_sha256
from hub_msif.artifacts.manifest import read_manifest
from hub_msif.errors import (
    FactorsNotFoundError,
    HubIntegrityError,
    HubUnreachableError,
    IndexNotFoundError,
    Interrupted,
    NotCachedError,
    TokenRefusedError,
)
from hub_msif.factors.storage import load_stage, save_stage

pytestmark = pytest.mark.usefixtures("one_thread")

VICTIM = "finetuned/mlp/gpt_neox.layers.1.mlp.dense_4h_to_h.safetensors"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return shared_artifacts(tmp_path_factory)


@pytest.fixture
def published(hub_server, artifacts) -> dict:
    return publish_once(artifacts)


def _repo(stem: str) -> str:
    return f"alice/msif-faults-{stem}-{uuid.uuid4().hex[:8]}"


def _tags(repo: str) -> dict[str, str]:
    return {t.name: t.target_commit for t in hub_api().list_repo_refs(repo, repo_type="dataset").tags}


def _head(repo: str) -> str:
    refs = hub_api().list_repo_refs(repo, repo_type="dataset")
    return next(b.target_commit for b in refs.branches if b.name == "main")


def _commit_count(repo: str) -> int:
    return len(hub_api().list_repo_commits(repo, repo_type="dataset"))


def _module_files(folder: Path) -> set[str]:
    return {m["file"] for s in read_manifest(folder)["stages"].values() for m in s["modules"]}


# -- 4: a local path that is no artifact folder ----------------------------------------------------
def test_a_local_path_that_is_no_artifact_folder_is_an_error(tmp_path, capsys):
    missing, plain = tmp_path / "does-not-exist", tmp_path / "plain.txt"
    plain.write_text("not a folder")
    for pull, error, label, manifest in ((hub.pull_factors, FactorsNotFoundError, "factor", "msif.json"),
                                         (hub.pull_index, IndexNotFoundError, "index", "index.json")):
        with pytest.raises(error, match=f"{label} folder {re.escape(str(missing))} does not exist"):
            pull(str(missing))
        with pytest.raises(error, match="does not exist"):
            pull("../no-such-artifact-folder-for-hub-msif")
        with pytest.raises(error, match=f"/etc has no manifest {manifest}"):
            pull("/etc")
        with pytest.raises(error, match="is a file, not a folder"):
            pull(str(plain))
    # A folder whose manifest reads is returned as it is.
    good = tmp_path / "factors"
    good.mkdir()
    (good / "msif.json").write_text('{"format": "hub_msif.factors", "format_version": 1, "stages": {}}')
    assert hub.pull_factors(str(good)) == good
    assert cli_main(["pull", "factors", str(missing)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines() == [f"hub-msif pull: error: factor folder {missing} does not exist"]


# -- 5: a push that writes nothing ----------------------------------------------------------------
def test_a_push_that_writes_nothing_still_needs_write_rights_and_says_so(artifacts, hub_server, capsys):
    repo = _repo("rights")
    first = hub.push_factors(artifacts.factors["v1"], repo)
    assert first.created and first.tag == "v1"
    again = hub.push_factors(artifacts.factors["v1"], repo)
    commit, tag = again  # still unpacks as (commit, tag)
    assert (commit, tag) == tuple(first) and again.created is False
    assert pickle.loads(pickle.dumps(again)).created is False
    assert cli_main(["push", "factors", str(artifacts.factors["v1"]), "--repo", repo]) == 0
    assert capsys.readouterr().out.strip() == (f"factors {artifacts.factors['v1']} is already published as "
                                               f"{repo}@v1 (commit {commit}): nothing written")
    assert cli_main(["push", "factors", str(artifacts.factors["v1"]), "--repo", repo, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["created"] is False
    tags, head = _tags(repo), _head(repo)
    with pytest.raises(TokenRefusedError, match=f"user carol may not write to {repo}: it is read-only"):
        hub.push_factors(artifacts.factors["v1"], repo, token="test-token-carol-read")
    with pytest.raises(TokenRefusedError, match=f"user bob may not write to {repo}: bob is neither alice nor"):
        hub.push_factors(artifacts.factors["v1"], repo, token="test-token-bob")
    assert _tags(repo) == tags and _head(repo) == head


# -- 10: Ctrl-C during a push -----------------------------------------------------------------------
def _interrupt(monkeypatch, method: str, after: bool = False) -> None:
    """Makes ``HfApi.<method>`` raise KeyboardInterrupt, before or after doing its work."""
    from huggingface_hub import HfApi

    real = getattr(HfApi, method)

    def interrupted(self, *args, **kwargs):
        if after:
            real(self, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(HfApi, method, interrupted)


def _interrupted_push(folder: Path, repo: str) -> str:
    """The message of the ``Interrupted`` a push raises (a bare KeyboardInterrupt fails the test
    instead of stopping the test session)."""
    try:
        hub.push_factors(folder, repo)
    except Interrupted as err:
        return str(err)
    except KeyboardInterrupt as err:
        pytest.fail(f"a bare {err!r}, not hub_msif.errors.Interrupted")
    pytest.fail("the push was not interrupted")


def test_ctrl_c_during_a_push_says_what_was_published(artifacts, hub_server, monkeypatch, tmp_path):
    repo = _repo("interrupt")
    with monkeypatch.context() as patch:  # during the uploads
        _interrupt(patch, "preupload_lfs_files")
        message = _interrupted_push(artifacts.factors["v1"], repo)
    assert message == f"interrupted before the commit: nothing was published to {repo}"
    assert _tags(repo) == {} and _commit_count(repo) == 1  # the repo's first commit only

    with monkeypatch.context() as patch:  # between the commit and the tag
        _interrupt(patch, "create_tag")
        message = _interrupted_push(artifacts.factors["v1"], repo)
    match = re.fullmatch(f"interrupted after commit ([0-9a-f]{{40}}) reached {repo}, before tagging it v1: run the "
                         "push again to tag it", message)
    assert match, message
    commit = match.group(1)
    assert _head(repo) == commit and _tags(repo) == {}
    # Run again, the push tags that commit instead of making a second one.
    assert hub.push_factors(artifacts.factors["v1"], repo) == (commit, "v1")
    assert _tags(repo) == {"v1": commit} and _head(repo) == commit and _commit_count(repo) == 2

    with monkeypatch.context() as patch:  # the commit landed, its answer did not
        _interrupt(patch, "create_commit", after=True)
        message = _interrupted_push(artifacts.factors["v2"], repo)
    assert message == f"interrupted after commit {_head(repo)} reached {repo}, before tagging it v2: run the push " \
                      "again to tag it"
    pushed = hub.push_factors(artifacts.factors["v2"], repo)
    assert pushed == (_head(repo), "v2") and _commit_count(repo) == 3

    edited = edited_copy(artifacts.factors["v1"], tmp_path / "edited")
    with monkeypatch.context() as patch:  # after the tag
        _interrupt(patch, "create_tag", after=True)
        message = _interrupted_push(edited, repo)
    head = _head(repo)
    assert message == f"interrupted after publishing {repo}@v3 (commit {head})"
    assert _tags(repo)["v3"] == head
    assert issubclass(Interrupted, KeyboardInterrupt)


SIGINT_BEFORE_THE_TAG = LOOPBACK_GUARD + textwrap.dedent("""
    import os, signal, sys, time
    from huggingface_hub import HfApi

    def ctrl_c(self, *args, **kwargs):  # the user presses Ctrl-C as the tag is about to be sent
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(60)

    HfApi.create_tag = ctrl_c
    # As `hub-msif` does: Python installs no handler when started with SIGINT ignored (a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from hub_msif.errors import Interrupted
    from hub_msif.hub import push_factors

    try:
        push_factors(sys.argv[1], sys.argv[2])
    except Interrupted as err:
        print(err, flush=True)
        sys.exit(130)
""")


def test_a_real_sigint_after_the_commit_is_reported(artifacts, hub_server):
    repo = _repo("sigint")
    done = subprocess.run([sys.executable, "-c", SIGINT_BEFORE_THE_TAG, str(artifacts.factors["v1"]), repo],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    head = _head(repo)
    assert done.stdout.strip() == (f"interrupted after commit {head} reached {repo}, before tagging it v1: run the "
                                   "push again to tag it")
    assert hub.push_factors(artifacts.factors["v1"], repo) == (head, "v1")


# -- 11: a version is exactly its manifest's files --------------------------------------------------
def _first_layer_only(source: Path, folder: Path) -> Path:
    """A valid factor folder of layer 0's modules only (as fitted on a one-layer model)."""
    for stage in ("pretrained", "finetuned"):
        loaded = load_stage(source, stage)
        kept = {name: m for name, m in loaded.modules.items() if ".layers.0." in name}
        save_stage(folder, stage, kept, {k: v for k, v in loaded.info.items() if k != "modules"})
    return folder


def test_a_version_holds_exactly_its_manifests_files(artifacts, hub_server, tmp_path):
    repo = _repo("shrink")
    full = hub.push_factors(artifacts.factors["v1"], repo)
    small = _first_layer_only(artifacts.factors["v1"], tmp_path / "one-layer")
    fewer = hub.push_factors(small, repo)
    extra = {"msif.json", "README.md", ".gitattributes"}
    assert set(hub_api().list_repo_files(repo, repo_type="dataset", revision=fewer.tag)) == _module_files(small) | extra
    assert _module_files(small) < _module_files(artifacts.factors["v1"])
    # The earlier version keeps its files, and each version pulls as what was pushed.
    assert set(hub_api().list_repo_files(repo, repo_type="dataset", revision=full.tag)) == \
        _module_files(artifacts.factors["v1"]) | extra
    assert read_manifest(hub.pull_factors(f"{repo}@{fewer.tag}")) == read_manifest(small)


# -- 12: uploads no commit references ---------------------------------------------------------------
def _unreferenced_lfs(root: Path, repo: str) -> set[Path]:
    import json

    repo_dir = root / "datasets" / repo
    named = {e["lfs"] for c in (repo_dir / "commits").glob("*.json")
             for e in json.loads(c.read_text())["files"].values() if e.get("lfs")}
    return {p for p in (repo_dir / "objects" / "lfs").iterdir() if p.name not in named}


def _age(*paths: Path, days: float = 2) -> None:
    then = time.time() - days * 86400
    for path in paths:
        os.utime(path, (then, then))


def _upload_without_commit(repo: str, data: bytes) -> None:
    """What a client killed between its upload and its commit leaves: an LFS object, no commit."""
    import hashlib

    from huggingface_hub.utils import get_session

    oid = hashlib.sha256(data).hexdigest()
    auth = {"authorization": "Bearer test-token-alice"}
    batch = get_session().post(f"{os.environ['HF_ENDPOINT']}/datasets/{repo}.git/info/lfs/objects/batch",
                               headers=auth, json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]})
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    assert get_session().put(href, content=data).status_code == 200


def test_uploads_no_commit_references_are_removed_after_a_grace_period(artifacts, hub_server, hub_root, tmp_path,
                                                                        monkeypatch, capsys):
    from huggingface_hub import HfApi

    from hub_msif.hub.server import HubServer, collect_garbage

    root, repo = Path(hub_root), _repo("gc")
    hub.push_factors(artifacts.factors["v1"], repo)
    folder = edited_copy(artifacts.factors["v1"], tmp_path / "edited")
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_LFS_UPLOAD, str(folder), repo],
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    left = _unreferenced_lfs(root, repo)
    assert left  # the killed push's uploads
    _upload_without_commit(repo, b"abandoned upload " * 1000)
    junk = _unreferenced_lfs(root, repo) - left
    partial = root / "datasets" / repo / "objects" / "tmp" / "abc.part"
    partial.parent.mkdir(parents=True, exist_ok=True)
    partial.write_bytes(b"\0" * 4096)
    # Young, they may belong to a commit in flight: kept.
    collect_garbage(root)
    assert junk and left | junk <= _unreferenced_lfs(root, repo) and partial.exists()

    # Old, they go; but the push of the killed folder, run again, re-uses its old uploads (the LFS
    # batch reports them stored and renews them), and a collection while its commit is in flight
    # must not take them.
    left = _unreferenced_lfs(root, repo) - junk
    _age(*left, *junk, partial)
    real_commit = HfApi.create_commit

    def collect_then_commit(self, *args, **kwargs):
        collect_garbage(root)
        return real_commit(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(HfApi, "create_commit", collect_then_commit)
        pushed = hub.push_factors(folder, repo)
    assert not (junk & _unreferenced_lfs(root, repo)) and not partial.exists()
    assert all(p.exists() for p in left)
    pulled = hub.pull_factors(f"{repo}@{pushed.tag}", cache_dir=tmp_path / "cache")
    assert read_manifest(pulled) == read_manifest(folder)

    # The server collects at start-up.
    _upload_without_commit(repo, b"another abandoned upload " * 1000)
    orphans = _unreferenced_lfs(root, repo)
    trash = root / ".trash" / "left-by-a-killed-delete"
    trash.mkdir(parents=True)
    (trash / "repo.json").write_text("{}")
    _age(*orphans, trash)
    hub_server.stop()
    server = HubServer(hub_root, host="127.0.0.1", port=conftest.HUB_PORT, tokens=conftest.HUB_TOKENS).start()
    try:
        assert orphans and not any(p.exists() for p in orphans) and not trash.exists()
        for version in ("v1", pushed.tag):
            pulled = hub.pull_factors(f"{repo}@{version}", cache_dir=tmp_path / "cache-after")
            assert all(file_sha256(pulled / f) == e for f, e in
                       ((m["file"], m["sha256"]) for s in read_manifest(pulled)["stages"].values()
                        for m in s["modules"]))
    finally:
        server.stop()
    # What it returns: files (or folders) and bytes removed.
    blob = root / "datasets" / repo / "objects" / "blobs" / ("0" * 40)
    blob.write_bytes(b"x" * 100)
    partial.write_bytes(b"y" * 50)
    _age(blob, partial)
    assert collect_garbage(root, grace_seconds=3600) == (2, 150)
    # ... and from the command line, where --grace-seconds 0 takes young leftovers too.
    blob.write_bytes(b"x" * 100)
    assert cli_main(["hub", "gc", "--root", str(root), "--json"]) == 0  # young: kept
    assert json.loads(capsys.readouterr().out)["removed"] == 0 and blob.exists()
    assert cli_main(["hub", "gc", "--root", str(root), "--grace-seconds", "0"]) == 0
    assert capsys.readouterr().out.strip() == f"removed 1 unreferenced file(s), 100 bytes, from {root}"
    assert not blob.exists()
    assert cli_main(["hub", "gc", "--root", str(tmp_path / "no-such-root")]) == 2
    assert "no-such-root" in capsys.readouterr().err


# -- 13: a corrupted cache is not a file altered on the Hub -----------------------------------------
def _resolve_gets(server, start: int, path: str) -> int:
    return sum(r["method"] == "GET" and "/resolve/" in r["path"] and r["path"].endswith(path)
               for r in server.request_log[start:])


def test_a_corrupted_cached_copy_is_downloaded_again_not_blamed_on_the_hub(published, artifacts, hub_server,
                                                                          tmp_path):
    cache = tmp_path / "cache"
    good = (artifacts.factors["v1"] / VICTIM).read_bytes()
    folder = hub.pull_factors(f"{FACTORS_REPO}@v1", cache_dir=cache)
    blob = (folder / VICTIM).resolve()
    blob.write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    start = len(hub_server.request_log)
    assert hub.pull_factors(f"{FACTORS_REPO}@v1", cache_dir=cache) == folder
    assert (folder / VICTIM).read_bytes() == good
    assert _resolve_gets(hub_server, start, VICTIM) == 1  # downloaded again, once

    # A file whose bytes on the Hub differ from what its manifest records is altered on the Hub:
    # reported without downloading it again.
    lying = tmp_path / "lying"
    lying.mkdir()
    for name in ["msif.json", *_module_files(artifacts.factors["v1"])]:
        (lying / name).parent.mkdir(parents=True, exist_ok=True)
        (lying / name).write_bytes((artifacts.factors["v1"] / name).read_bytes())
    (lying / VICTIM).write_bytes(good[:-1] + bytes([good[-1] ^ 0x01]))
    repo = _repo("lying")
    hub_api().create_repo(repo, repo_type="dataset")
    hub_api().upload_folder(repo_id=repo, repo_type="dataset", folder_path=lying)
    start = len(hub_server.request_log)
    with pytest.raises(HubIntegrityError, match=f"{VICTIM} is corrupted or was altered on the Hub .*sha256"):
        hub.pull_factors(repo, cache_dir=cache)
    assert _resolve_gets(hub_server, start, VICTIM) == 1
    assert not list(cache.glob(f"datasets--*--{repo.split('/')[1]}/snapshots/*/{VICTIM}"))

    # With the Hub out of reach, a corrupted cached copy is removed and said so.
    blob = (folder / VICTIM).resolve()
    blob.write_bytes(b"garbage")
    hub_server.stop()
    with pytest.raises(NotCachedError, match=f"cached copy of {VICTIM} was corrupted .* removed from the cache; the Hub "
                                             f"at {re.escape(os.environ['HF_ENDPOINT'])} cannot be reached"):
        hub.pull_factors(f"{FACTORS_REPO}@v1", cache_dir=cache)
    assert not (folder / VICTIM).exists() and not blob.exists()


# -- 14: the Hub is down ----------------------------------------------------------------------------
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_with_the_hub_down_commands_fail_within_seconds_and_cached_versions_still_pull(
        published, artifacts, hub_server, tmp_path, capsys):
    cache = tmp_path / "cache"
    folder = hub.pull_factors(f"{FACTORS_REPO}@v1", cache_dir=cache)
    hub_server.stop()
    endpoint = re.escape(os.environ["HF_ENDPOINT"])
    records = _Records()
    logging.getLogger("huggingface_hub").addHandler(records)
    try:
        started = time.monotonic()
        assert hub.pull_factors(f"{FACTORS_REPO}@v1", cache_dir=cache) == folder  # cached: served as offline
        assert time.monotonic() - started < 5
        for call, error, what in [
            (lambda: hub.pull_factors(f"{FACTORS_REPO}@v2", cache_dir=cache), NotCachedError,
             f"cannot pull factors {FACTORS_REPO}@v2: .* not \\(completely\\) in the Hugging Face cache"),
            (lambda: hub.push_factors(artifacts.factors["v1"], _repo("down")), HubUnreachableError,
             "cannot push to alice/msif-faults-down"),
            (lambda: hub.find_factors(str(artifacts.pretrained), str(artifacts.finetuned)), HubUnreachableError,
             "cannot search the Hub for factors"),
        ]:
            started = time.monotonic()
            with pytest.raises(error, match=f"{what}.* the Hub at {endpoint} cannot be reached \\(connection refused"):
                call()
            assert time.monotonic() - started < 5, what
        capsys.readouterr()
        started = time.monotonic()
        assert cli_main(["pull", "factors", "alice/msif-never-pulled@v1"]) == 2
        assert time.monotonic() - started < 5
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("hub-msif pull: error:") and os.environ["HF_ENDPOINT"] in err[0]
    finally:
        logging.getLogger("huggingface_hub").removeHandler(records)
    assert not [m for m in records.messages if "Retrying" in m or "thrown while requesting" in m]


# -- issue 21, item 7: the Hub fails during an upload or the commit ---------------------------------
class _Failing:
    """ASGI wrapper of the loopback server's app: answers ``status`` to every request of ``method``
    whose path holds ``part`` while ``on`` (a 500 is retried by huggingface_hub: each try fails),
    passes everything else on."""

    def __init__(self, app, method: str, part: str, status: int):
        self.app, self.method, self.part, self.status, self.on, self.failed = app, method, part, status, False, 0

    async def __call__(self, scope, receive, send):
        if self.on and scope["type"] == "http" and scope["method"] == self.method and self.part in scope["path"]:
            self.failed += 1
            while (await receive()).get("more_body"):
                pass
            await send({"type": "http.response.start", "status": self.status,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"No space left on device"})
            return
        await self.app(scope, receive, send)


@pytest.fixture
def quick_retries(monkeypatch):
    """huggingface_hub retries 5xx answers and broken connections 5 times over ~23 s: the same
    retries, without the waits."""
    import functools

    from huggingface_hub import _commit_api, lfs
    from huggingface_hub.utils import http_backoff

    quick = functools.partial(http_backoff, base_wait_time=0.01, max_wait_time=0.01)
    monkeypatch.setattr(lfs, "http_backoff", quick)
    monkeypatch.setattr(_commit_api, "http_backoff", quick)


def _one_error_line(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert cli_main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and len(lines) == 1, captured.err
    assert captured.out == ""
    return lines[0]


@pytest.mark.parametrize("method, part, status, expected", [
    ("PUT", "", 507, "failed: the Hub answered 507 \\(the server is out of space\\)"),
    ("PUT", "", 500, "failed: the Hub answered 500 \\(a server failure\\)"),
    ("POST", "/commit/", 500, "the Hub answered 500: .*a failure of the server at .*try again later"),
], ids=["upload-disk-full", "upload-server-error", "commit-server-error"])
def test_a_server_failure_during_a_push_is_one_line_and_a_rerun_completes(artifacts, hub_root, quick_retries,
                                                                          tmp_path, capsys, method, part, status,
                                                                          expected):
    from hub_msif.hub.server import HubServer

    repo = _repo("5xx")
    folder = edited_copy(artifacts.factors["v1"], tmp_path / "edited")
    server = HubServer(hub_root, host="127.0.0.1", port=conftest.HUB_PORT, tokens=conftest.HUB_TOKENS)
    failing = server.app = _Failing(server.app, method, part, status)
    server.start()
    try:
        hub.push_factors(artifacts.factors["v1"], repo)
        tags, head = _tags(repo), _head(repo)
        failing.on = True
        line = _one_error_line(["push", "factors", str(folder), "--repo", repo], capsys)
        failing.on = False
        assert failing.failed
        assert re.match(f"hub-msif push: error: cannot push to {repo}: ", line), line
        assert re.search(expected, line), line
        if method == "PUT":
            endpoint = re.escape(os.environ["HF_ENDPOINT"])
            assert re.search(f"uploading [^ ]+\\.safetensors to {endpoint} failed", line), line
            assert "nothing was committed, the repo is as it was: run the push again" in line
        assert _tags(repo) == tags and _head(repo) == head  # the repo is as it was
        pushed = hub.push_factors(folder, repo)  # run again: it completes
        assert pushed.tag == "v2" and _tags(repo)["v2"] == _head(repo) != head
        assert read_manifest(hub.pull_factors(f"{repo}@v2", cache_dir=tmp_path / "cache")) == read_manifest(folder)
        hub_api().delete_repo(repo, repo_type="dataset")  # find_factors in test_push_pull counts the pair's versions
    finally:
        server.stop()


SERVER_KILLED_MID_UPLOAD = textwrap.dedent("""
    import json, os, signal, sys, time
    from hub_msif.hub.server import HubServer

    server = HubServer(sys.argv[1], host="127.0.0.1", port=int(sys.argv[2]), tokens=json.loads(sys.argv[3]))
    app = server.app

    async def killed_mid_upload(scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "PUT":
            await receive()  # the first bytes of the upload arrived
            os.kill(os.getpid(), signal.SIGKILL)
        await app(scope, receive, send)

    server.app = killed_mid_upload
    server.start()
    print("serving", flush=True)
    time.sleep(600)
""")


def test_a_server_killed_mid_upload_is_one_line_and_a_rerun_completes(artifacts, hub_root, quick_retries, tmp_path,
                                                                       capsys):
    from hub_msif.hub.server import HubServer

    repo = _repo("killed")
    folder = edited_copy(artifacts.factors["v1"], tmp_path / "edited")
    with HubServer(hub_root, host="127.0.0.1", port=conftest.HUB_PORT, tokens=conftest.HUB_TOKENS):
        hub.push_factors(artifacts.factors["v1"], repo)
        tags, head = _tags(repo), _head(repo)
    dying = subprocess.Popen([sys.executable, "-c", SERVER_KILLED_MID_UPLOAD, str(hub_root), str(conftest.HUB_PORT),
                              json.dumps(conftest.HUB_TOKENS)], stdout=subprocess.PIPE, text=True)
    try:
        assert dying.stdout.readline().strip() == "serving"
        line = _one_error_line(["push", "factors", str(folder), "--repo", repo], capsys)
        assert dying.wait(timeout=30) == -9  # it was killed by the upload, not before
    finally:
        if dying.poll() is None:
            dying.kill()
            dying.wait()
    endpoint = re.escape(os.environ["HF_ENDPOINT"])
    assert re.match(f"hub-msif push: error: cannot push to {repo}: uploading [^ ]+\\.safetensors to {endpoint} "
                    "failed: the connection broke off \\(", line), line
    assert line.endswith("nothing was committed, the repo is as it was: run the push again (uploads that finished "
                         "are not sent again)"), line
    with HubServer(hub_root, host="127.0.0.1", port=conftest.HUB_PORT, tokens=conftest.HUB_TOKENS):
        assert _tags(repo) == tags and _head(repo) == head  # the repo is as it was
        pushed = hub.push_factors(folder, repo)  # run again: it completes
        assert pushed.tag == "v2" and _tags(repo)["v2"] == _head(repo)
        assert read_manifest(hub.pull_factors(f"{repo}@v2", cache_dir=tmp_path / "cache")) == read_manifest(folder)
        hub_api().delete_repo(repo, repo_type="dataset")


# -- issue 23 item 5: a pull that the local disk refuses names the disk, not the Hub ------------------


def test_a_pull_into_a_cache_path_too_long_names_the_local_disk(published, tmp_path, capsys):
    cache = tmp_path / ("x" * 300)  # one path component longer than any file system allows
    with pytest.raises(OSError) as err:
        hub.pull_factors(f"{FACTORS_REPO}@v1", cache_dir=cache)
    message = str(err.value)
    assert not isinstance(err.value, HubUnreachableError), message
    assert "the local disk failed, not the Hub" in message and "File name too long" in message
    assert "could not be reached" not in message and "\n" not in message


def _can_mount_tmpfs() -> bool:
    return subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                          capture_output=True).returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespace to mount a small tmpfs in")
def test_a_pull_onto_a_full_disk_names_the_local_disk(published, tmp_path):
    """``hub-msif pull factors`` with HF_HOME on a 24 KiB tmpfs (its own mount namespace; the
    network is the test's loopback): exit 2, one line naming the local disk, no traceback."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "HF_HOME": str(home),
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    command = (f"mount -t tmpfs -o size=24k tmpfs {home} && exec {sys.executable} -m hub_msif.apps.cli pull factors "
               f"{FACTORS_REPO}@v1")
    run = subprocess.run(["unshare", "-r", "-m", "sh", "-c", command], capture_output=True, text=True, env=env,
                         timeout=300)
    err = run.stderr.strip()
    assert run.returncode == 2, err[-2000:]
    last = err.splitlines()[-1]  # huggingface_hub warns about the free space first, on lines of its own
    assert last.startswith("hub-msif pull: error: ") and "the local disk failed, not the Hub" in last, err[-2000:]
    assert "No space left on device" in last and "could not be reached" not in err and "Traceback" not in err
