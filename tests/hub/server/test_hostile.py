"""The loopback server under hostile requests (issue 23 items 1, 2, 5; issue 21 items 8, 9).

Memory cases run the server in a subprocess on loopback and send it one bounded request over a
raw socket (headers, then at most ``SEND_BYTES`` of body from a thread, while the answer is read);
the server's peak resident memory (``VmHWM``) is read from ``/proc`` before and after. Nothing is
mocked: the rest drives the ``hub_server`` fixture with the real ``huggingface_hub`` client.
"""

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from hub_msif.hub.server import collect_garbage

ROOT = Path(__file__).resolve().parents[3]
TOKEN = "hostile-test-token"
MiB = 1024 * 1024
SEND_BYTES = 160 * MiB  # the most any one request here sends
LIMIT = 8 * MiB  # --max-request-bytes of the subprocess server
GROWTH_ALLOWED = 40 * MiB  # the server's peak memory may grow this much for one refused request


def _name(stem: str) -> str:
    return f"hostile-{stem}-{uuid.uuid4().hex[:8]}"


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


@pytest.fixture(scope="module")
def server_process(tmp_path_factory):
    """``hub-msif hub serve`` in a subprocess on a free loopback port, --max-request-bytes LIMIT."""
    root = tmp_path_factory.mktemp("hostile-root")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hub_msif.apps.cli", "hub", "serve", "--root", str(root), "--port", "0",
         "--token", f"{TOKEN}=alice", "--max-request-bytes", str(LIMIT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    line = proc.stdout.readline()
    if not line.startswith("Hub server at "):
        proc.kill()
        pytest.fail(f"hub serve did not start: {line!r} {proc.stderr.read()[-2000:]}")
    url = line.split()[3]
    assert url.startswith("http://127.0.0.1:")
    port = int(url.rsplit(":", 1)[1])
    headers = {"authorization": f"Bearer {TOKEN}"}
    created = httpx.post(f"{url}/api/repos/create", json={"type": "dataset", "name": "fw-factors"}, headers=headers)
    assert created.status_code == 200, created.text
    yield proc, port
    proc.terminate()
    proc.wait(timeout=20)


def _hostile_request(port: int, request_line: str, headers: dict[str, str], send: int) -> tuple[int, bytes]:
    """Sends ``request_line`` and ``headers``, then up to ``send`` bytes of body from a thread, and
    returns ``(status, body of the answer)`` as soon as the answer comes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    head = request_line + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode())
    chunked = headers.get("Transfer-Encoding") == "chunked"

    def push() -> None:
        chunk = b"x" * MiB
        sent = 0
        try:
            while sent < send:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                sent += len(chunk)
        except OSError:  # the server answered and closed: what a refusal looks like
            pass

    sender = threading.Thread(target=push, daemon=True)
    sender.start()
    answer = b""
    try:
        while b"\r\n\r\n" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            data = sock.recv(65536)
            if not data:
                break
            body += data
    finally:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()
        sender.join(timeout=60)
    assert answer.startswith(b"HTTP/1.1 "), answer[:200]
    return int(answer.split()[1]), body


def _peak_growth(proc, port: int, request_line: str, headers: dict[str, str], send: int = SEND_BYTES):
    before = _kib(proc.pid, "VmHWM")
    status, body = _hostile_request(port, request_line, headers, send)
    time.sleep(0.2)
    return status, body, _kib(proc.pid, "VmHWM") - before


@pytest.mark.parametrize("path", [
    "/api/datasets/alice/fw-factors/commit/main",
    "/api/datasets/alice/fw-factors/preupload/main",
    "/api/repos/create",
    "/api/datasets/alice/fw-factors/settings",
])
def test_a_huge_body_without_a_token_is_refused_before_it_is_read(server_process, path):
    proc, port = server_process
    method = "PUT" if path.endswith("/settings") else "POST"
    status, body, growth = _peak_growth(proc, port, f"{method} {path} HTTP/1.1",
                                        {"Host": f"127.0.0.1:{port}", "Content-Length": str(400 * 1000 * 1000),
                                         "Content-Type": "application/x-ndjson"})
    assert status == 401, body[:300]
    assert growth < GROWTH_ALLOWED, f"peak RSS grew by {growth / MiB:.0f} MiB for a refused request"


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "chunked"])
def test_a_body_over_max_request_bytes_is_refused_with_413(server_process, declare):
    proc, port = server_process
    headers = {"Host": f"127.0.0.1:{port}", "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/x-ndjson"}
    headers.update({"Content-Length": str(SEND_BYTES)} if declare else {"Transfer-Encoding": "chunked"})
    status, body, growth = _peak_growth(proc, port, "POST /api/datasets/alice/fw-factors/commit/main HTTP/1.1", headers)
    assert status == 413, body[:300]
    assert str(LIMIT) in json.loads(body)["error"]
    assert growth < GROWTH_ALLOWED, f"peak RSS grew by {growth / MiB:.0f} MiB for a refused request"


def test_anonymous_bodies_are_capped_and_validate_yaml_too(server_process):
    proc, port = server_process
    status, body, growth = _peak_growth(
        proc, port, "POST /api/validate-yaml HTTP/1.1",
        {"Host": f"127.0.0.1:{port}", "Transfer-Encoding": "chunked", "Content-Type": "application/json"})
    assert status == 413, body[:300]
    assert growth < GROWTH_ALLOWED
    # an ordinary body still goes through
    ok = httpx.post(f"http://127.0.0.1:{port}/api/validate-yaml", json={"content": "---\nlicense: mit\n---\n"})
    assert ok.status_code == 200, ok.text


def test_an_lfs_upload_longer_than_announced_is_cut_off(server_process, tmp_path):
    proc, port = server_process
    url, headers = f"http://127.0.0.1:{port}", {"authorization": f"Bearer {TOKEN}"}
    data = b"y" * 1000
    oid = hashlib.sha256(data).hexdigest()
    batch = httpx.post(f"{url}/datasets/alice/fw-factors.git/info/lfs/objects/batch", headers=headers,
                       json={"operation": "upload", "objects": [{"oid": oid, "size": len(data)}]})
    href = batch.json()["objects"][0]["actions"]["upload"]["href"]
    put_line = f"PUT {href[len(url):]} HTTP/1.1"
    status, body, growth = _peak_growth(proc, port, put_line, {"Host": f"127.0.0.1:{port}",
                                                               "Transfer-Encoding": "chunked"})
    assert status == 413, body[:300]
    assert growth < GROWTH_ALLOWED
    parts = list((Path(proc.args[proc.args.index("--root") + 1]) / "datasets/alice/fw-factors/objects/tmp").glob("*"))
    assert parts == []


# -- cards ------------------------------------------------------------------------------------------

ALIAS_BOMB = "---\n" + "\n".join(
    [f"a0: &a0 [{', '.join(['x'] * 10)}]"]
    + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]) + "\n---\n# card\n"


def test_a_yaml_alias_bomb_card_is_refused_at_push_with_one_line(hub_server):
    assert len(ALIAS_BOMB) < 700
    api = HfApi()
    repo = f"alice/{_name('bomb')}"
    api.create_repo(repo, repo_type="dataset")
    head = api.dataset_info(repo).sha
    # the client checks README.md with validate-yaml first ...
    with pytest.raises(ValueError, match="aliases"):  # huggingface_hub's error for a refused card
        api.upload_file(path_or_fileobj=ALIAS_BOMB.encode(), path_in_repo="README.md", repo_id=repo,
                        repo_type="dataset")
    # ... and the commit refuses it on its own, for a client that skips that check
    payload = (json.dumps({"key": "header", "value": {"summary": "card"}}) + "\n"
               + json.dumps({"key": "file", "value": {"path": "README.md", "encoding": "base64",
                                                      "content": base64.b64encode(ALIAS_BOMB.encode()).decode()}}))
    answer = httpx.post(f"{hub_server.url}/api/datasets/{repo}/commit/main", content=payload,
                        headers={"authorization": f"Bearer {os.environ['HF_TOKEN']}",
                                 "content-type": "application/x-ndjson"})
    assert answer.status_code == 400
    message = answer.json()["error"]
    assert "aliases" in message and "\n" not in message
    assert api.dataset_info(repo).sha == head  # nothing landed
    listing = httpx.get(f"{hub_server.url}/api/datasets", params={"author": "alice", "full": "true"})
    assert len(listing.content) < 2 * MiB


def test_paths_the_hub_refuses_are_refused(hub_server):
    repo = f"alice/{_name('paths')}"
    HfApi().create_repo(repo, repo_type="dataset")
    for path in ("a/.git/hooks/x", ".cache/x", "a/.cache/b", ".git/config"):
        payload = (json.dumps({"key": "header", "value": {"summary": "x"}}) + "\n"
                   + json.dumps({"key": "file", "value": {"path": path, "encoding": "base64", "content": "eA=="}}))
        answer = httpx.post(f"{hub_server.url}/api/datasets/{repo}/commit/main", content=payload,
                            headers={"authorization": f"Bearer {os.environ['HF_TOKEN']}",
                                     "content-type": "application/x-ndjson"})
        assert answer.status_code == 400, (path, answer.text)
        assert "Invalid path" in answer.json()["error"]
    assert [f for f in HfApi().list_repo_files(repo, repo_type="dataset")] == [".gitattributes"]


# -- uploads and the collector ----------------------------------------------------------------------


def _announce(hub_server, repo: str, data: bytes) -> str:
    batch = httpx.post(f"{hub_server.url}/datasets/{repo}.git/info/lfs/objects/batch",
                       headers={"authorization": f"Bearer {os.environ['HF_TOKEN']}"},
                       json={"operation": "upload", "objects": [{"oid": hashlib.sha256(data).hexdigest(),
                                                                 "size": len(data)}]})
    return batch.json()["objects"][0]["actions"]["upload"]["href"]


def test_gc_never_removes_an_upload_in_progress_whatever_the_grace(hub_server, hub_root):
    repo = f"alice/{_name('gc-race')}"
    HfApi().create_repo(repo, repo_type="dataset")
    data = os.urandom(3 * MiB)
    href = _announce(hub_server, repo, data)
    tmp = hub_root / "datasets" / repo / "objects" / "tmp"
    halfway = threading.Event()
    resume = threading.Event()

    def body():
        yield data[:MiB]
        halfway.set()
        resume.wait(30)
        yield data[MiB:]

    result = {}
    sender = threading.Thread(target=lambda: result.setdefault("r", httpx.put(href, content=body(), timeout=60)))
    sender.start()
    assert halfway.wait(30)
    deadline = time.time() + 30
    while not list(tmp.glob("*.part")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(tmp.glob("*.part")), "the upload wrote no part file"
    time.sleep(0.2)  # older than a zero grace
    # gc in another process, as `hub-msif hub gc --grace-seconds 0` beside the running server
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    gc = subprocess.run([sys.executable, "-m", "hub_msif.apps.cli", "hub", "gc", "--root", str(hub_root),
                         "--grace-seconds", "0", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert gc.returncode == 0, gc.stderr
    assert list(tmp.glob("*.part")), "gc removed the part file of an upload in progress"
    collect_garbage(hub_root, grace_seconds=0)  # and in this process, as the server's own start-up does
    assert list(tmp.glob("*.part"))
    resume.set()
    sender.join(60)
    assert result["r"].status_code == 200, result["r"].text
    assert (hub_root / "datasets" / repo / "objects" / "lfs" / hashlib.sha256(data).hexdigest()).is_file()
    assert not list(tmp.glob("*.part"))
    HfApi().delete_repo(repo, repo_type="dataset")  # leave no unreferenced upload to other tests' collections


def test_a_failed_commit_releases_its_uploads(hub_server, hub_root):
    api = HfApi()
    repo = f"alice/{_name('release')}"
    api.create_repo(repo, repo_type="dataset")
    stale = api.dataset_info(repo).sha
    api.upload_file(path_or_fileobj=b"moves main", path_in_repo="a.txt", repo_id=repo, repo_type="dataset")
    data = os.urandom(2 * MiB)
    lfs = hub_root / "datasets" / repo / "objects" / "lfs" / hashlib.sha256(data).hexdigest()
    with pytest.raises(HfHubHTTPError) as err:  # a commit on a stale parent fails after its upload
        api.create_commit(repo, [CommitOperationAdd("w.bin", data)], commit_message="w", repo_type="dataset",
                          parent_commit=stale)
    assert err.value.response.status_code == 412
    assert not lfs.exists(), "the failed commit's upload still holds its disk space"
    # a rerun uploads it again and lands
    api.create_commit(repo, [CommitOperationAdd("w.bin", data)], commit_message="w", repo_type="dataset")
    assert lfs.is_file()
    assert "w.bin" in api.list_repo_files(repo, repo_type="dataset")


def _can_mount_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-r", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="no user namespace to mount a small tmpfs in")
def test_an_upload_refused_for_lack_of_space_cleans_its_part_file(tmp_path):
    """A server whose root is a 4 MiB tmpfs (its own mount namespace): a 6 MiB upload fills the
    disk and is refused with 507; its part file goes, so a 3 MiB upload fits afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    port_file = tmp_path / "port"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = (f"mount -t tmpfs -o size=4m tmpfs {mount} && exec {sys.executable} -m hub_msif.apps.cli hub serve "
              f"--root {mount}/root --port 0 --token {TOKEN}=alice > {port_file}")
    proc = subprocess.Popen(["unshare", "-r", "-m", "sh", "-c", script], env=env, cwd=ROOT, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not (port_file.is_file() and "Hub server at" in port_file.read_text()) and time.time() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        url = port_file.read_text().split()[3]
        headers = {"authorization": f"Bearer {TOKEN}"}
        assert httpx.post(f"{url}/api/repos/create", json={"type": "dataset", "name": "full"},
                          headers=headers).status_code == 200

        def upload(data: bytes) -> httpx.Response:
            batch = httpx.post(f"{url}/datasets/alice/full.git/info/lfs/objects/batch", headers=headers,
                               json={"operation": "upload",
                                     "objects": [{"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}]})
            return httpx.put(batch.json()["objects"][0]["actions"]["upload"]["href"], content=data, timeout=60)

        refused = upload(os.urandom(6 * MiB))
        assert refused.status_code == 507, refused.text
        assert "disk is full" in refused.json()["error"]
        fits = upload(os.urandom(3 * MiB))
        assert fits.status_code == 200, f"the refused upload's part file still fills the disk: {fits.text}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
