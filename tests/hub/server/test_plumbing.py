"""The server's own plumbing, over raw HTTP: lifecycle, error shape, LFS upload checks, ranges.

Each test runs a ``HubServer`` of its own on a free port with a fresh root (the session's
``hub_server`` fixture is not involved); requests go through ``huggingface_hub``'s HTTP session.
"""

import hashlib
import socket

import pytest
from huggingface_hub.utils import get_session

from hub_msif.hub.server import HubServer

TOKEN = "plumbing-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def server(tmp_path):
    with HubServer(tmp_path / "hub", port=0, tokens={TOKEN: {"user": "dora"}}) as running:
        response = get_session().post(f"{running.url}/api/repos/create", json={"name": "d", "type": "dataset"},
                                      headers=AUTH)
        assert response.status_code == 200, response.text
        yield running


def _lfs_batch(server: HubServer, oid: str, size: int) -> dict:
    """The batch answer's entry for one object of the repo dora/d."""
    batch = get_session().post(f"{server.url}/datasets/dora/d.git/info/lfs/objects/batch", headers=AUTH,
                               json={"operation": "upload", "objects": [{"oid": oid, "size": size}]})
    assert batch.status_code == 200, batch.text
    return batch.json()["objects"][0]


def test_port_zero_picks_a_free_port_and_stop_frees_it(tmp_path):
    server = HubServer(tmp_path / "hub", port=0).start()
    port = server.port
    assert port != 0 and server.url == f"http://127.0.0.1:{port}"
    with pytest.raises(OSError):  # the port is taken while it serves
        HubServer(tmp_path / "other", port=port).start()
    server.stop()
    server.stop()  # twice is harmless
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free again at once


def test_every_error_has_the_hub_shape(server):
    session = get_session()
    for method, path, status in (("GET", "/no/such/route/at/all", 404), ("DELETE", "/api/whoami-v2", 405)):
        response = session.request(method, f"{server.url}{path}")
        assert response.status_code == status
        assert response.headers["X-Error-Message"] == response.json()["error"]
    bad = session.get(f"{server.url}/api/datasets/dora/d", headers={"authorization": "Bearer wrong"})
    assert bad.status_code == 401 and "Invalid credentials" in bad.json()["error"]
    missing = session.get(f"{server.url}/api/datasets/dora/nothing-here", headers=AUTH)
    assert missing.status_code == 404 and missing.headers["X-Error-Code"] == "RepoNotFound"
    assert [(r["status"], r["user"]) for r in server.request_log[-2:]] == [(401, None), (404, "dora")]


def test_a_crash_answers_500_and_the_server_keeps_serving(server, caplog):
    (server.root / "datasets" / "dora" / "d" / "refs.json").write_text("{not json")
    response = get_session().get(f"{server.url}/api/datasets/dora/d/refs")
    assert response.status_code == 500 and "JSONDecodeError" in response.json()["error"]
    assert "hub server error on GET /api/datasets/dora/d/refs" in caplog.text
    assert get_session().get(f"{server.url}/api/datasets").status_code == 200


def test_lfs_uploads_must_be_announced_and_match_their_oid(server):
    data = b"lfs content" * 100
    oid = hashlib.sha256(data).hexdigest()
    unannounced = get_session().put(f"{server.url}/_lfs/datasets/dora/d/{oid}", content=data)
    assert unannounced.status_code == 403
    href = _lfs_batch(server, oid, len(data))["actions"]["upload"]["href"]
    corrupted = get_session().put(href, content=data[:-1] + b"!")
    assert corrupted.status_code == 400 and "sha256 mismatch" in corrupted.json()["error"]
    objects = server.root / "datasets" / "dora" / "d" / "objects"
    assert not (objects / "lfs" / oid).exists() and not list((objects / "tmp").iterdir())

    chunked = get_session().put(href, content=iter([data[:500], data[500:]]))  # no Content-Length
    assert chunked.status_code == 200 and (objects / "lfs" / oid).read_bytes() == data
    assert "actions" not in _lfs_batch(server, oid, len(data))  # stored: nothing more to upload


def test_ranges_and_head_of_a_download(server):
    url = f"{server.url}/datasets/dora/d/resolve/main/.gitattributes"
    whole = get_session().get(url)
    size = len(whole.content)
    part = get_session().get(url, headers={"range": "bytes=2-9"})
    assert part.status_code == 206 and part.content == whole.content[2:10]
    assert part.headers["Content-Range"] == f"bytes 2-9/{size}"
    assert get_session().get(url, headers={"range": f"bytes={size}-"}).status_code == 416
    head = get_session().head(url)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == size and not head.content
    assert head.headers["ETag"] == whole.headers["ETag"] and len(head.headers["X-Repo-Commit"]) == 40
