"""A Hugging Face Hub compatible HTTP server on loopback, for offline tests and air-gapped sharing.

``HubServer`` speaks the subset of the Hub HTTP API that ``huggingface_hub`` (and ``datasets``
through ``HfFileSystem``) use: repos, commits with regular and LFS files, branches, tags, tree and
paths-info listings, downloads with ``Range``, search, cards and tokens. It follows
``HUB_API_SPEC.md`` (section 10 lists the endpoints). Standard library only (PyYAML reads README
front matter); it never talks to anything but its own clients.

Storage under ``root`` (a restarted server with the same root serves the same repos)::

    tokens.json                                  optional {token: {"user", "orgs", "role"}}
    {models,datasets,spaces}/<ns>/<name>/
        repo.json                                id, type, private, gated, createdAt, ...
        refs.json                                {"branches": {name: sha}, "tags": {...}, "pulls": {"1": sha}}
        commits/<sha>.json                       {"id", "parent", "title", "message", "date", "author",
                                                  "files": {path: {"oid", "size", "lfs": sha256|null}}}
        objects/blobs/<git blob sha1>            regular file contents
        objects/lfs/<sha256>                     LFS file contents

Every JSON file is written atomically (temporary file, fsync, rename). A commit writes its objects
and its snapshot first and moves the branch in ``refs.json`` last, so a commit either lands whole
or not at all. Errors follow the Hub's model: ``X-Error-Code`` / ``X-Error-Message`` headers plus a
JSON body ``{"error": ...}``.

Xet storage is not spoken (``xet-*-token`` answers 501): clients need ``HF_HUB_DISABLE_XET=1``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import logging
import mimetypes
import os
import posixpath
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from .atomic import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
RESERVED_NAMESPACES = {"api", "datasets", "models", "spaces", "_lfs"}  # would shadow URL routes
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # larger files go to LFS, and are refused inline
TREE_PAGE_SIZE = 1000
TREE_PAGE_SIZE_EXPAND = 50
LIST_PAGE_SIZE = 1000
COMMITS_PAGE_SIZE = 100
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,96}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_YAML_BLOCK_RE = re.compile(r"^(\s*---(?:\r\n|\r|\n))([\S\s]*?)((?:\r\n|\r|\n)---[ \t]*(\r\n|\n|$))")
_BODY_CHUNK = 1024 * 1024

DEFAULT_GITATTRIBUTES = """\
*.7z filter=lfs diff=lfs merge=lfs -text
*.arrow filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.bz2 filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.ftz filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.h5 filter=lfs diff=lfs merge=lfs -text
*.joblib filter=lfs diff=lfs merge=lfs -text
*.lfs.* filter=lfs diff=lfs merge=lfs -text
*.mlmodel filter=lfs diff=lfs merge=lfs -text
*.model filter=lfs diff=lfs merge=lfs -text
*.msgpack filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.npz filter=lfs diff=lfs merge=lfs -text
*.onnx filter=lfs diff=lfs merge=lfs -text
*.ot filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pb filter=lfs diff=lfs merge=lfs -text
*.pickle filter=lfs diff=lfs merge=lfs -text
*.pkl filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.rar filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
saved_model/**/* filter=lfs diff=lfs merge=lfs -text
*.tar.* filter=lfs diff=lfs merge=lfs -text
*.tar filter=lfs diff=lfs merge=lfs -text
*.tflite filter=lfs diff=lfs merge=lfs -text
*.tgz filter=lfs diff=lfs merge=lfs -text
*.wasm filter=lfs diff=lfs merge=lfs -text
*.xz filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
*.zst filter=lfs diff=lfs merge=lfs -text
*tfevents* filter=lfs diff=lfs merge=lfs -text
"""


# -- small helpers -------------------------------------------------------------------------------


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def _valid_name(name: str) -> bool:
    return (bool(_NAME_RE.match(name)) and "--" not in name and ".." not in name and not name.endswith(".git")
            and name.strip(".") != "")


def _valid_repo_path(path: str) -> bool:
    if not path or path.startswith("/") or path.endswith("/") or "\0" in path or "\\" in path:
        return False
    parts = path.split("/")
    return all(p not in ("", ".", "..") for p in parts) and parts[0] != ".git"


def _header_safe(value: str) -> str:
    return " ".join(str(value).encode("ascii", "backslashreplace").decode("ascii").split())


def _truthy(value) -> bool:
    return str(value).lower() in ("1", "true", "yes", "on")


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def parse_front_matter(text: str):
    """(front matter dict or None, error message or None) of a README's ``---`` YAML block."""
    match = _YAML_BLOCK_RE.search(text)
    if not match:
        return None, None
    import yaml

    try:
        data = yaml.safe_load(match.group(2))
    except yaml.YAMLError as err:
        return None, f"Invalid YAML in README.md front matter: {err}"
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        return None, f"README.md front matter must be a YAML mapping, got {type(data).__name__}"
    return json.loads(json.dumps(data, default=str)), None


def compute_tags(repo_type: str, card: dict | None) -> list[str]:
    """Tags the Hub derives from README front matter (HUB_API_SPEC section 6), plus ``region:us``."""
    tags: list[str] = []

    def add(tag) -> None:
        if tag is not None and str(tag) not in tags:
            tags.append(str(tag))

    card = card or {}
    for tag in _as_list(card.get("tags")):
        add(tag)
    for lic in _as_list(card.get("license")):
        add(f"license:{lic}")
    if repo_type == "dataset":
        for key in ("task_categories", "task_ids", "language", "size_categories", "multilinguality",
                    "annotations_creators", "language_creators", "source_datasets"):
            for value in _as_list(card.get(key)):
                add(f"{key}:{value}")
    elif repo_type == "model":
        for key in ("library_name", "pipeline_tag"):
            for value in _as_list(card.get(key)):
                add(value)
        for value in _as_list(card.get("language")):
            add(value)
    elif repo_type == "space":
        for value in _as_list(card.get("sdk")):
            add(value)
    add("region:us")
    return tags


def _git_pattern_match(pattern: str, path: str) -> bool:
    """gitattributes-style matching: a pattern without '/' matches the basename at any depth."""
    anchored = pattern.startswith("/")
    pattern = pattern.lstrip("/")
    if "/" not in pattern and not anchored:
        return fnmatch.fnmatchcase(posixpath.basename(path), pattern)
    if pattern.startswith("**/") and fnmatch.fnmatchcase(posixpath.basename(path), pattern[3:]):
        return True
    if pattern.endswith("/**") and path.startswith(pattern[:-3] + "/"):
        return True
    return fnmatch.fnmatchcase(path, pattern)


def lfs_patterns(gitattributes: str) -> list[tuple[str, bool]]:
    out = []
    for line in gitattributes.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        pattern, *attrs = line.split()
        if "filter=lfs" in attrs:
            out.append((pattern, True))
        elif "-filter" in attrs or "!filter" in attrs or any(a.startswith("filter=") for a in attrs):
            out.append((pattern, False))
    return out


def matches_lfs(path: str, patterns: list[tuple[str, bool]]) -> bool:
    result = False
    for pattern, value in patterns:  # later lines win, as in git
        if _git_pattern_match(pattern, path):
            result = value
    return result


def gitignore_match(path: str, gitignore: str) -> bool:
    ignored = False
    parts = path.split("/")
    for line in gitignore.splitlines():
        line = line.rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        if negate:
            line = line[1:]
        dir_only = line.endswith("/")
        line = line.rstrip("/")
        anchored = "/" in line
        line = line.lstrip("/")
        if not line:
            continue
        for i in range(1, len(parts) + 1):
            if dir_only and i == len(parts):
                continue
            target = "/".join(parts[:i]) if anchored else parts[i - 1]
            if fnmatch.fnmatchcase(target, line):
                ignored = not negate
                break
    return ignored


class HubError(Exception):
    """An HTTP error answer: status, message, optional ``X-Error-Code`` and extra body keys."""

    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.body, self.headers = body or {}, headers or {}


def _repo_not_found(caller: Caller) -> HubError:
    return HubError(401 if caller.anonymous else 404, "Repository not found", "RepoNotFound")


def _revision_not_found(rev: str) -> HubError:
    return HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


def _entry_not_found(path: str, commit: str | None = None) -> HubError:
    return HubError(404, f"Entry not found: {path}", "EntryNotFound",
                    headers={"X-Repo-Commit": commit} if commit else None)


class Caller:
    """Who sent a request: anonymous, or a known token's user, orgs and role."""

    def __init__(self, token: str | None = None, info: dict | None = None):
        info = info or {}
        self.token = token
        self.user: str | None = info.get("user")
        self.orgs: list[str] = list(info.get("orgs") or [])
        self.role: str = info.get("role") or "write"

    @property
    def anonymous(self) -> bool:
        return self.user is None

    def namespaces(self) -> set[str]:
        return set() if self.anonymous else {self.user, *self.orgs}


# -- tokens --------------------------------------------------------------------------------------


def load_tokens(root: str | Path) -> dict:
    path = Path(root) / "tokens.json"
    if not path.is_file():
        return {}
    return normalize_tokens(json.loads(path.read_text()))


def save_tokens(root: str | Path, tokens: dict) -> None:
    atomic_write_json(Path(root) / "tokens.json", normalize_tokens(tokens), default=str)


def normalize_tokens(tokens: dict) -> dict:
    out = {}
    for token, info in (tokens or {}).items():
        if isinstance(info, str):
            info = {"user": info}
        role = info.get("role") or "write"
        if role not in ("read", "write"):
            raise ValueError(f"token role must be read or write, got {role!r}")
        if not info.get("user"):
            raise ValueError("every token needs a user")
        out[str(token)] = {"user": str(info["user"]), "orgs": [str(o) for o in info.get("orgs") or []], "role": role}
    return out


def parse_token_spec(spec: str) -> tuple[str, dict]:
    """``TOKEN=USER[:ORG1,ORG2][:read]`` -> (token, {"user", "orgs", "role"})."""
    token, sep, rest = spec.partition("=")
    if not sep or not token or not rest:
        raise ValueError(f"--token must look like TOKEN=USER[:ORG1,ORG2][:read], got {spec!r}")
    parts = rest.split(":")
    user, orgs, role = parts[0], [], "write"
    extra = parts[1:]
    if extra and extra[-1] in ("read", "write"):
        role = extra.pop()
    if len(extra) > 1:
        raise ValueError(f"--token must look like TOKEN=USER[:ORG1,ORG2][:read], got {spec!r}")
    if extra:
        orgs = [o for o in extra[0].split(",") if o]
    for name in (user, *orgs):
        if not _valid_name(name):
            raise ValueError(f"invalid user or org name {name!r} in --token {spec!r}")
    return token, {"user": user, "orgs": orgs, "role": role}


# -- on-disk repos -------------------------------------------------------------------------------


class Repo:
    """One repo folder: metadata, refs, immutable commit snapshots and a content-addressed store."""

    def __init__(self, hub: HubServer, repo_type: str, namespace: str, name: str):
        self.hub = hub
        self.type, self.namespace, self.name = repo_type, namespace, name
        self.id = f"{namespace}/{name}"
        self.dir = hub.root / f"{repo_type}s" / namespace / name

    def exists(self) -> bool:
        return (self.dir / "repo.json").is_file()

    @property
    def meta(self) -> dict:
        return json.loads((self.dir / "repo.json").read_text())

    def write_meta(self, meta: dict) -> None:
        atomic_write_json(self.dir / "repo.json", meta, default=str)

    def refs(self) -> dict:
        refs = json.loads((self.dir / "refs.json").read_text())
        for key in ("branches", "tags", "pulls"):
            refs.setdefault(key, {})
        return refs

    def write_refs(self, refs: dict) -> None:
        atomic_write_json(self.dir / "refs.json", refs, default=str)

    def commit(self, sha: str) -> dict:
        key = (str(self.dir), sha)
        cached = self.hub._commit_cache.get(key)
        if cached is None:
            cached = json.loads((self.dir / "commits" / f"{sha}.json").read_text())
            self.hub._commit_cache[key] = cached
        return cached

    def has_commit(self, sha: str) -> bool:
        return bool(_SHA1_RE.match(sha)) and (self.dir / "commits" / f"{sha}.json").is_file()

    def url(self, base: str) -> str:
        return f"{base}/{URL_PREFIX[self.type]}{self.id}"

    # objects
    def blob_path(self, oid: str) -> Path:
        return self.dir / "objects" / "blobs" / oid

    def lfs_path(self, sha256: str) -> Path:
        return self.dir / "objects" / "lfs" / sha256

    def content_path(self, entry: dict) -> Path:
        return self.lfs_path(entry["lfs"]) if entry.get("lfs") else self.blob_path(entry["oid"])

    def read_content(self, entry: dict) -> bytes:
        return self.content_path(entry).read_bytes()

    def store_blob(self, data: bytes) -> str:
        oid = git_blob_sha1(data)
        path = self.blob_path(oid)
        if not path.is_file():
            atomic_write_bytes(path, data)
        return oid

    def has_lfs(self, sha256: str, size: int | None = None) -> bool:
        path = self.lfs_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    # revisions
    def resolve(self, rev: str) -> str | None:
        """Commit sha of a branch, tag, ``refs/...`` name or full commit sha; None if unknown."""
        refs = self.refs()
        if rev.startswith("refs/pr/"):
            return refs["pulls"].get(rev[len("refs/pr/"):])
        if rev.startswith("refs/heads/"):
            return refs["branches"].get(rev[len("refs/heads/"):])
        if rev.startswith("refs/tags/"):
            return refs["tags"].get(rev[len("refs/tags/"):])
        if rev in refs["branches"]:
            return refs["branches"][rev]
        if rev in refs["tags"]:
            return refs["tags"][rev]
        if self.has_commit(rev):
            return rev
        return None

    def new_commit(self, parent: str | None, files: dict, title: str, message: str, author: str | None) -> str:
        record = {"parent": parent, "title": title, "message": message, "date": now_iso(), "author": author,
                  "files": dict(sorted(files.items()))}
        digest_input = json.dumps({"repo": f"{self.type}/{self.id}", **record}, sort_keys=True).encode()
        sha = hashlib.sha1(digest_input).hexdigest()
        record["id"] = sha
        atomic_write_json(self.dir / "commits" / f"{sha}.json", record, default=str)
        return sha

    def card(self, files: dict) -> tuple[dict | None, str | None]:
        entry = files.get("README.md")
        if entry is None:
            return None, None
        key = (str(self.dir), entry["oid"])
        cached = self.hub._card_cache.get(key)
        if cached is None:
            try:
                text = self.read_content(entry).decode("utf-8", errors="replace")
            except OSError:
                return None, None
            cached = parse_front_matter(text)
            self.hub._card_cache[key] = cached
        return cached


def _entry_json(path: str, entry: dict) -> dict:
    out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry.get("lfs"):
        out["lfs"] = {"oid": entry["lfs"], "size": entry["size"],
                      "pointerSize": len(lfs_pointer(entry["lfs"], entry["size"]))}
    return out


def _directories(files: dict) -> set[str]:
    dirs = set()
    for path in files:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return dirs


def _dir_json(path: str, files: dict) -> dict:
    prefix = path + "/"
    digest = hashlib.sha1()
    for p in sorted(files):
        if p.startswith(prefix):
            digest.update(f"{p[len(prefix):]}\0{files[p]['oid']}\n".encode())
    return {"type": "directory", "oid": digest.hexdigest(), "size": 0, "path": path}


# -- HTTP plumbing -------------------------------------------------------------------------------


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address, handler, hub: HubServer):
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        self.hub = hub
        self.connections: set = set()
        self.connections_lock = threading.Lock()
        super().__init__(address, handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hub-msif-hubserver"
    timeout = 120  # idle keep-alive connections are closed after this many seconds

    # connection bookkeeping, so that stop() can close idle keep-alive connections
    def setup(self):
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    # request bodies
    def _iter_body(self):
        if self._body_started:
            raise RuntimeError("the request body was already read")
        self._body_started = True
        yield from self._iter_body_chunks()
        self._body_done = True

    def _iter_body_chunks(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line:
                    raise HubError(400, "truncated chunked body")
                size = int(line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, _BODY_CHUNK))
                    if not chunk:
                        raise HubError(400, "truncated chunked body")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline(65537)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, _BODY_CHUNK))
                if not chunk:
                    raise HubError(400, "truncated body")
                remaining -= len(chunk)
                yield chunk

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> dict:
        raw = self._read_body()
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HubError(400, f"request body is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise HubError(400, "request body must be a JSON object")
        return data

    def _drain(self) -> None:
        if self._body_done:
            return
        if self._body_started:
            self.close_connection = True  # the body is half read: do not reuse the connection
            return
        try:
            for _ in self._iter_body():
                pass
        except Exception:
            self.close_connection = True

    # responses
    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json",
              headers: dict | None = None, length: int | None = None) -> None:
        self._status = status
        self.send_response(status)
        if self.close_connection:  # tell the client before it tries to reuse the connection
            self.send_header("Connection", "close")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for key, value in (headers or {}).items():
            self.send_header(key, _header_safe(value))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers: dict | None = None, content_type: str = "application/json"):
        self._send(status, json.dumps(obj, default=str).encode(), content_type, headers)

    def _error(self, err: HubError) -> None:
        headers = dict(err.headers)
        headers["X-Error-Message"] = err.message
        if err.code:
            headers["X-Error-Code"] = err.code
        self._json({"error": err.message, **err.body}, status=err.status, headers=headers)

    def _base(self) -> str:
        host = self.headers.get("Host")
        return f"http://{host}" if host else self.server.hub.url

    def _dispatch(self, method: str) -> None:
        hub: HubServer = self.server.hub
        self._status = None
        self._body_started = self._body_done = False
        self.caller = Caller()
        try:
            split = urlsplit(self.path)
            self.query = parse_qs(split.query, keep_blank_values=True)
            self.raw_segments = split.path.split("/")[1:]
            self.segments = [unquote(s) for s in self.raw_segments]
            self.caller = hub._authenticate(self.headers.get("Authorization"), self.segments)
            hub._route(self, method)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:
            if not isinstance(err, HubError):  # a bug: answer 500 with the reason
                logger.exception("hub server error on %s %s", method, self.path)
                err = HubError(500, f"internal server error: {type(err).__name__}: {err}")
            if self._status is not None:  # the answer had begun: the connection cannot be reused
                self.close_connection = True
                return
            self._drain()
            try:
                self._error(err)
            except OSError:
                self.close_connection = True
        finally:
            hub._log(method, self.path, self._status, self.caller.user)

    def q(self, key: str, default=None):
        values = self.query.get(key)
        return values[-1] if values else default

    def qlist(self, key: str) -> list[str]:
        return list(self.query.get(key) or [])


def _take_rev(segments: list[str]) -> tuple[str, list[str]]:
    """The revision at the head of decoded path segments; an unencoded ``refs/pr/N`` is accepted."""
    if not segments:
        raise HubError(400, "missing revision")
    if segments[0] == "refs" and len(segments) >= 3 and segments[1] in ("pr", "heads", "tags"):
        return "/".join(segments[:3]), segments[3:]
    return segments[0], segments[1:]


# -- the server ----------------------------------------------------------------------------------


class HubServer:
    """Hub-compatible HTTP server on loopback, persisting repos under ``root``.

    ``tokens``: ``{token: {"user": "alice", "orgs": ["team"], "role": "write"|"read"}}``; ``None``
    reads ``root/tokens.json`` (re-read when it changes). A token may write to its user's and its
    orgs' namespaces only, and only with role ``write`` (the default).
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, tokens: dict | None = None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, int(port)
        self._tokens_from_file = tokens is None
        self._tokens = normalize_tokens(tokens) if tokens is not None else {}
        self._tokens_mtime: float | None = None
        self.request_log: list[dict] = []
        self._log_lock = threading.Lock()
        self._lock = threading.RLock()  # every mutation of the store
        self._commit_cache: dict = {}
        self._card_cache: dict = {}
        self._pending_lfs: dict = {}  # (repo dir, sha256) -> size announced by an LFS batch
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = self._format_url(self.port)

    def _format_url(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{port}"

    # lifecycle
    def start(self) -> HubServer:
        if self._httpd is not None:
            return self
        self._httpd = _HTTPServer((self.host, self.port), _Handler, self)
        self.port = self._httpd.server_address[1]
        self.url = self._format_url(self.port)
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"hub-server-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with httpd.connections_lock:
            connections = list(httpd.connections)
        for conn in connections:  # idle keep-alive connections would otherwise outlive the server
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Blocks until Ctrl-C (for the command line)."""
        self.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def _log(self, method: str, path: str, status, user) -> None:
        with self._log_lock:
            self.request_log.append({"method": method, "path": path, "status": status, "user": user})

    # auth
    @property
    def tokens(self) -> dict:
        if self._tokens_from_file:
            path = self.root / "tokens.json"
            mtime = path.stat().st_mtime if path.is_file() else None
            if mtime != self._tokens_mtime:
                self._tokens = load_tokens(self.root) if mtime is not None else {}
                self._tokens_mtime = mtime
        return self._tokens

    def _authenticate(self, header: str | None, segments: list[str]) -> Caller:
        if not header or (segments and segments[0] == "_lfs" and len(segments) > 1 and segments[1] == "upload"):
            return Caller()
        scheme, _, value = header.partition(" ")
        value = value.strip()
        if scheme.lower() == "basic":  # git: user:token
            try:
                value = base64.b64decode(value).decode().partition(":")[2]
            except ValueError:
                value = ""
        elif scheme.lower() != "bearer":
            raise HubError(401, INVALID_CREDENTIALS)
        info = self.tokens.get(value)
        if info is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return Caller(value, info)

    def _can_read(self, caller: Caller, repo: Repo, meta: dict) -> bool:
        return not meta.get("private") or repo.namespace in caller.namespaces()

    def _check_write_namespace(self, caller: Caller, namespace: str, what: str) -> None:
        if caller.anonymous:
            raise HubError(401, f"You must be authenticated with a write token to {what}")
        if caller.role != "write":
            raise HubError(403, f"You don't have the rights to {what}: the token of {caller.user} is read-only "
                                "(it needs the write role)")
        if namespace not in caller.namespaces():
            raise HubError(403, f"You don't have the rights to {what}: {caller.user} is neither {namespace} nor a "
                                f"member of the {namespace} organization")

    def _repo(self, caller: Caller, repo_type: str, namespace: str, name: str, write: bool = False) -> Repo:
        if not (_valid_name(namespace) and _valid_name(name)):
            raise _repo_not_found(caller)
        repo = Repo(self, repo_type, namespace, name)
        try:
            meta = repo.meta
        except (OSError, ValueError):
            raise _repo_not_found(caller) from None
        if not self._can_read(caller, repo, meta):
            raise _repo_not_found(caller)
        if write:
            self._check_write_namespace(caller, namespace, f"write to the {repo_type} repo {repo.id}")
        return repo

    @staticmethod
    def _resolve(repo: Repo, rev: str) -> str:
        sha = repo.resolve(rev)
        if sha is None:
            raise _revision_not_found(rev)
        return sha

    # routing
    def _route(self, h: _Handler, method: str) -> None:
        seg = h.segments
        if seg and seg[0] == "api":
            return self._route_api(h, method, seg[1:])
        if seg and seg[0] == "_lfs":
            return self._route_lfs_transfer(h, method, seg[1:])
        repo_type = "model"
        rest = seg
        if seg and seg[0] in ("datasets", "spaces") and len(seg) >= 3:
            repo_type, rest = REPO_TYPES[seg[0]], seg[1:]
        if len(rest) >= 2:
            namespace, name, tail = rest[0], rest[1], rest[2:]
            if name.endswith(".git") and tail == ["info", "lfs", "objects", "batch"] and method == "POST":
                return self._lfs_batch(h, repo_type, namespace, name[:-4])
            if tail and tail[0] in ("resolve", "raw") and method in ("GET", "HEAD"):
                rev, path = _take_rev(tail[1:])
                return self._resolve_file(h, repo_type, namespace, name, rev, "/".join(path))
        raise HubError(404, f"Not found: {method} {h.path.split('?')[0]}")

    def _route_api(self, h: _Handler, method: str, seg: list[str]) -> None:
        head = seg[0] if seg else ""
        if seg == ["whoami-v2"] and method == "GET":
            return self._whoami(h)
        if seg == ["agent-harnesses"] and method == "GET":
            return h._json({"standardEnvVars": [], "harnesses": {}})
        if seg == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(h)
        if head == "repos" and len(seg) == 2:
            action = {("create", "POST"): self._create_repo, ("delete", "DELETE"): self._delete_repo,
                      ("move", "POST"): self._move_repo}.get((seg[1], method))
            if action:
                return action(h)
        if head in REPO_TYPES:
            repo_type = REPO_TYPES[head]
            if len(seg) == 1 and method == "GET":
                return self._list_repos(h, repo_type)
            if len(seg) >= 3:
                return self._route_repo_api(h, method, repo_type, seg[1], seg[2], seg[3:])
        raise HubError(404, f"Not found: {method} {h.path.split('?')[0]}")

    def _route_repo_api(self, h: _Handler, method: str, repo_type: str, ns: str, name: str, rest: list[str]):
        op = rest[0] if rest else ""
        arg = "/".join(rest[1:])
        if op in ("xet-read-token", "xet-write-token"):
            h._drain()
            raise HubError(501, "Xet storage is not supported by this server: set HF_HUB_DISABLE_XET=1")
        routes = {
            ("", "GET"): lambda: self._repo_info(h, repo_type, ns, name, None),
            ("revision", "GET"): lambda: self._repo_info(h, repo_type, ns, name, arg),
            ("settings", "PUT"): lambda: self._settings(h, repo_type, ns, name),
            ("tree", "GET"): lambda: self._tree(h, repo_type, ns, name, rest[1:]),
            ("paths-info", "POST"): lambda: self._paths_info(h, repo_type, ns, name, arg),
            ("refs", "GET"): lambda: self._refs(h, repo_type, ns, name),
            ("commits", "GET"): lambda: self._commits(h, repo_type, ns, name, arg or "main"),
            ("branch", "POST"): lambda: self._create_branch(h, repo_type, ns, name, arg),
            ("branch", "DELETE"): lambda: self._delete_branch(h, repo_type, ns, name, arg),
            ("tag", "POST"): lambda: self._create_tag(h, repo_type, ns, name, arg or "main"),
            ("tag", "DELETE"): lambda: self._delete_tag(h, repo_type, ns, name, arg),
            ("preupload", "POST"): lambda: self._preupload(h, repo_type, ns, name, arg or "main"),
            ("commit", "POST"): lambda: self._commit(h, repo_type, ns, name, arg or "main"),
            ("auth-check", "GET"): lambda: (self._repo(h.caller, repo_type, ns, name), h._json({}))[1],
            ("runtime", "GET"): lambda: h._json(self._space_runtime(self._repo(h.caller, repo_type, ns, name))),
        }
        action = routes.get((op, method))
        if action is None or (op in ("", "refs", "settings", "auth-check", "runtime") and len(rest) > 1):
            raise HubError(404, f"Not found: {method} {h.path.split('?')[0]}")
        return action()

    # -- account ---------------------------------------------------------------------------------

    def _whoami(self, h: _Handler) -> None:
        c = h.caller
        if c.anonymous:
            raise HubError(401, INVALID_CREDENTIALS)
        h._json({
            "type": "user", "id": hashlib.sha1(c.user.encode()).hexdigest()[:24], "name": c.user,
            "fullname": c.user.capitalize(), "email": f"{c.user}@example.invalid", "emailVerified": True,
            "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": "",
            "orgs": [{"type": "org", "name": o, "fullname": o, "roleInOrg": "admin" if c.role == "write" else "read"}
                     for o in c.orgs],
            "auth": {"type": "access_token", "accessToken": {
                "displayName": f"{c.user}-token", "role": c.role, "createdAt": "2024-01-01T00:00:00.000Z"}},
        })

    def _validate_yaml(self, h: _Handler) -> None:
        body = h._json_body()
        content = body.get("content")
        if not isinstance(content, str):
            return h._json({"errors": [{"message": "content must be a string"}], "warnings": []}, status=400)
        _, error = parse_front_matter(content)
        if error:
            return h._json({"errors": [{"message": error}], "warnings": []}, status=400)
        h._json({"errors": [], "warnings": []})

    # -- repos -----------------------------------------------------------------------------------

    def _create_repo(self, h: _Handler) -> None:
        body = h._json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        name = body.get("name") or ""
        namespace = body.get("organization") or h.caller.user
        if namespace is None:
            raise HubError(401, "You must be authenticated with a write token to create a repo")
        if not (_valid_name(namespace) and _valid_name(name)) or namespace in RESERVED_NAMESPACES:
            raise HubError(400, f"Invalid repo name {namespace}/{name}: use letters, digits, '-', '_', '.' "
                                "(at most 96), no '--' or '..', not ending in .git; the namespace must not be one of "
                                f"{', '.join(sorted(RESERVED_NAMESPACES))}")
        self._check_write_namespace(h.caller, namespace, f"create a {repo_type} repo under the namespace {namespace}")
        private = body.get("visibility") == "private" or bool(body.get("private"))
        sdk = body.get("sdk")
        if repo_type == "space" and sdk not in ("gradio", "streamlit", "docker", "static"):
            raise HubError(400, "A Space needs an sdk: gradio, streamlit, docker or static")
        repo = Repo(self, repo_type, namespace, name)
        with self._lock:
            if repo.exists():
                raise HubError(409, f"You already created this {repo_type} repo", body={"url": repo.url(h._base())})
            if repo.dir.exists():  # debris of an interrupted create or delete
                shutil.rmtree(repo.dir)
            files = {}
            for path, text in self._initial_files(repo_type, name, sdk).items():
                data = text.encode()
                files[path] = {"oid": repo.store_blob(data), "size": len(data), "lfs": None}
            sha = repo.new_commit(None, files, "initial commit", "", h.caller.user)
            meta = {"_id": uuid.uuid4().hex[:24], "id": repo.id, "type": repo_type, "private": private,
                    "gated": False, "createdAt": now_iso(), "sdk": sdk}
            repo.write_refs({"branches": {"main": sha}, "tags": {}, "pulls": {}})
            repo.write_meta(meta)  # last: the repo exists once repo.json does
        h._json({"url": repo.url(h._base()), "name": repo.id, "id": meta["_id"]})

    @staticmethod
    def _initial_files(repo_type: str, name: str, sdk: str | None) -> dict:
        files = {".gitattributes": DEFAULT_GITATTRIBUTES}
        if repo_type == "space":
            files["README.md"] = (f"---\ntitle: {name}\nemoji: 🚀\ncolorFrom: blue\ncolorTo: gray\nsdk: {sdk}\n"
                                  "pinned: false\n---\n\nCheck out the configuration reference at "
                                  "https://huggingface.co/docs/hub/spaces-config-reference\n")
        return files

    def _delete_repo(self, h: _Handler) -> None:
        body = h._json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        namespace = body.get("organization") or h.caller.user or ""
        with self._lock:
            repo = self._repo(h.caller, repo_type, namespace, body.get("name") or "", write=True)
            self._remove_dir(repo.dir)
        self._forget(repo)
        h._json({})

    def _remove_dir(self, path: Path) -> None:
        trash = self.root / ".trash" / uuid.uuid4().hex
        trash.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, trash)  # atomic: the repo disappears at once
        shutil.rmtree(trash, ignore_errors=True)

    def _forget(self, repo: Repo) -> None:
        prefix = str(repo.dir)
        for cache in (self._commit_cache, self._card_cache):
            for key in [k for k in list(cache) if k[0] == prefix]:
                cache.pop(key, None)

    def _move_repo(self, h: _Handler) -> None:
        body = h._json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        src_id, dst_id = str(body.get("fromRepo") or ""), str(body.get("toRepo") or "")
        if src_id.count("/") != 1 or dst_id.count("/") != 1:
            raise HubError(400, "fromRepo and toRepo must be namespace/name")
        dst_ns, dst_name = dst_id.split("/")
        if not (_valid_name(dst_ns) and _valid_name(dst_name)) or dst_ns in RESERVED_NAMESPACES:
            raise HubError(400, f"Invalid repo name {dst_id}")
        with self._lock:
            src = self._repo(h.caller, repo_type, *src_id.split("/"), write=True)
            self._check_write_namespace(h.caller, dst_ns, f"move a repo to the namespace {dst_ns}")
            dst = Repo(self, repo_type, dst_ns, dst_name)
            if dst.exists():
                raise HubError(409, f"A {repo_type} repo {dst_id} already exists")
            if dst.dir.exists():
                shutil.rmtree(dst.dir)
            dst.dir.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src.dir, dst.dir)
            meta = dst.meta
            meta["id"] = dst.id
            dst.write_meta(meta)
        self._forget(src)
        h._json({})

    def _settings(self, h: _Handler, repo_type: str, ns: str, name: str) -> None:
        body = h._json_body()
        with self._lock:
            repo = self._repo(h.caller, repo_type, ns, name, write=True)
            meta = repo.meta
            if "visibility" in body:
                if body["visibility"] not in ("private", "public"):
                    raise HubError(400, "visibility must be private or public")
                meta["private"] = body["visibility"] == "private"
            if "private" in body:
                meta["private"] = bool(body["private"])
            if "gated" in body:
                if body["gated"] not in (False, "auto", "manual"):
                    raise HubError(400, "gated must be false, auto or manual")
                meta["gated"] = body["gated"]
            repo.write_meta(meta)
        h._json({"private": meta["private"], "gated": meta["gated"]})

    def _space_runtime(self, repo: Repo) -> dict:
        return {"stage": "STOPPED", "hardware": {"current": None, "requested": "cpu-basic"},
                "storage": None, "gcTimeout": None, "replicas": {"current": 0, "requested": 1}}

    def _info_json(self, h: _Handler, repo: Repo, meta: dict, sha: str, siblings: bool, blobs: bool,
                   card_data: bool = True) -> dict:
        commit = repo.commit(sha)
        files = commit["files"]
        card, _ = repo.card(files)
        info = {
            "_id": meta.get("_id"), "id": repo.id, "author": repo.namespace, "sha": sha,
            "lastModified": commit["date"], "createdAt": meta.get("createdAt"), "private": bool(meta.get("private")),
            "gated": meta.get("gated", False), "disabled": False, "downloads": 0, "downloadsAllTime": 0,
            "likes": 0, "trendingScore": 0, "tags": compute_tags(repo.type, card),
            "usedStorage": sum(e["size"] for e in files.values()),
        }
        if card is not None and card_data:
            info["cardData"] = card
        if siblings:
            out = []
            for path in sorted(files):
                entry = files[path]
                sib = {"rfilename": path}
                if blobs:
                    sib["size"] = entry["size"]
                    sib["blobId"] = entry["oid"]
                    if entry.get("lfs"):
                        sib["lfs"] = {"size": entry["size"], "sha256": entry["lfs"],
                                      "pointerSize": len(lfs_pointer(entry["lfs"], entry["size"]))}
                out.append(sib)
            info["siblings"] = out
        card = card or {}
        if repo.type == "model":
            info["modelId"] = repo.id
            for key in ("library_name", "pipeline_tag"):
                if card.get(key):
                    info[key] = card[key]
        elif repo.type == "dataset":
            info["description"] = card.get("pretty_name") or ""
            info["citation"] = None
            info["paperswithcode_id"] = card.get("paperswithcode_id")
        elif repo.type == "space":
            info["sdk"] = card.get("sdk") or meta.get("sdk")
            info["subdomain"] = f"{repo.namespace}-{repo.name}".lower().replace(".", "-").replace("_", "-")
            info["runtime"] = self._space_runtime(repo)
        return info

    def _repo_info(self, h: _Handler, repo_type: str, ns: str, name: str, rev: str | None) -> None:
        repo = self._repo(h.caller, repo_type, ns, name)
        sha = self._resolve(repo, rev or "main")
        h._json(self._info_json(h, repo, repo.meta, sha, siblings=True, blobs=_truthy(h.q("blobs", "false"))))

    def _list_repos(self, h: _Handler, repo_type: str) -> None:
        folder = self.root / f"{repo_type}s"
        filters = h.qlist("filter")
        author = h.q("author")
        searches = [s.lower() for s in h.qlist("search") if s]
        expand = h.qlist("expand") + h.qlist("expand[]")
        full = _truthy(h.q("full", "false")) or "siblings" in expand
        with_card = full or _truthy(h.q("cardData", "false")) or "cardData" in expand
        items = []
        if folder.is_dir():
            for ns_dir in sorted(folder.iterdir()):
                if author and ns_dir.name != author:
                    continue
                if not ns_dir.is_dir():
                    continue
                for repo_dir in sorted(ns_dir.iterdir()):
                    repo = Repo(self, repo_type, ns_dir.name, repo_dir.name)
                    try:
                        meta = repo.meta
                        sha = repo.refs()["branches"]["main"]
                    except (OSError, ValueError, KeyError):
                        continue
                    if not self._can_read(h.caller, repo, meta):
                        continue
                    if searches and not all(s in repo.id.lower() for s in searches):
                        continue
                    info = self._info_json(h, repo, meta, sha, siblings=full, blobs=False, card_data=True)
                    if filters and not all(f in info["tags"] for f in filters):
                        continue
                    if not with_card:
                        info.pop("cardData", None)
                    items.append(info)
        sort = h.q("sort")
        if sort:
            reverse = str(h.q("direction", "-1")) != "1"
            items.sort(key=lambda i: (i.get(sort) is not None, i.get(sort) or 0), reverse=reverse)
        limit = h.q("limit")
        if limit is not None:
            try:
                items = items[: max(0, int(limit))]
            except ValueError:
                raise HubError(400, f"limit must be an integer, got {limit!r}") from None
        self._paginated(h, items, LIST_PAGE_SIZE)

    def _paginated(self, h: _Handler, items: list, page_size: int) -> None:
        try:
            start = int(h.q("cursor", "0"))
        except ValueError:
            raise HubError(400, "invalid cursor") from None
        page = items[start:start + page_size]
        headers = {}
        if start + page_size < len(items):
            params = [(k, v) for k, vs in h.query.items() if k != "cursor" for v in vs]
            params.append(("cursor", str(start + page_size)))
            path = "/" + "/".join(h.raw_segments)
            headers["Link"] = f'<{h._base()}{path}?{urlencode(params)}>; rel="next"'
        h._json(page, headers=headers)

    # -- refs, commits, tree ---------------------------------------------------------------------

    def _refs(self, h: _Handler, repo_type: str, ns: str, name: str) -> None:
        repo = self._repo(h.caller, repo_type, ns, name)
        refs = repo.refs()
        out = {
            "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in sorted(refs["branches"].items())],
            "converts": [],
            "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in sorted(refs["tags"].items())],
        }
        if _truthy(h.q("include_prs", "0")):
            out["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                                   for n, s in sorted(refs["pulls"].items(), key=lambda kv: int(kv[0]))]
        h._json(out)

    def _commits(self, h: _Handler, repo_type: str, ns: str, name: str, rev: str) -> None:
        repo = self._repo(h.caller, repo_type, ns, name)
        sha = self._resolve(repo, rev)
        formatted = "formatted" in h.qlist("expand[]") + h.qlist("expand")
        items = []
        while sha:
            commit = repo.commit(sha)
            item = {"id": sha, "title": commit["title"], "message": commit["message"], "date": commit["date"],
                    "authors": [{"user": commit["author"], "avatar": ""}] if commit.get("author") else []}
            if formatted:
                import html

                item["formatted"] = {"title": html.escape(commit["title"]), "message": html.escape(commit["message"])}
            items.append(item)
            sha = commit.get("parent")
        self._paginated(h, items, COMMITS_PAGE_SIZE)

    def _last_commits(self, repo: Repo, head: str, targets: dict[str, bool]) -> dict[str, dict]:
        """The newest commit touching each path (file, or anything under a directory)."""
        found: dict[str, dict] = {}
        remaining = dict(targets)
        sha = head
        while remaining and sha:
            commit = repo.commit(sha)
            parent = repo.commit(commit["parent"]) if commit.get("parent") else None
            cur, prev = commit["files"], (parent["files"] if parent else {})
            changed = {p for p in set(cur) | set(prev) if cur.get(p) != prev.get(p)}
            for path, is_dir in list(remaining.items()):
                hit = any(c.startswith(path + "/") for c in changed) if is_dir else path in changed
                if hit or parent is None:
                    found[path] = {"id": sha, "title": commit["title"], "date": commit["date"]}
                    remaining.pop(path)
            sha = commit.get("parent")
        return found

    def _with_last_commits(self, repo: Repo, head: str, entries: list[dict]) -> list[dict]:
        last = self._last_commits(repo, head, {e["path"]: e["type"] == "directory" for e in entries})
        for e in entries:
            if e["path"] in last:
                e["lastCommit"] = last[e["path"]]
        return entries

    def _tree(self, h: _Handler, repo_type: str, ns: str, name: str, rest: list[str]) -> None:
        repo = self._repo(h.caller, repo_type, ns, name)
        rev, path_parts = _take_rev(rest)
        sha = self._resolve(repo, rev)
        path = "/".join(path_parts).strip("/")
        recursive = _truthy(h.q("recursive", "false"))
        expand = _truthy(h.q("expand", "false"))
        files = repo.commit(sha)["files"]
        dirs = _directories(files)
        if path and path in files:
            entries = [_entry_json(path, files[path])]
        elif path and path not in dirs:
            raise _entry_not_found(path, sha)
        else:
            prefix = path + "/" if path else ""

            def wanted(p: str) -> bool:
                return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

            dir_entries = [_dir_json(d, files) for d in sorted(dirs) if wanted(d)]
            file_entries = [_entry_json(p, files[p]) for p in sorted(files) if wanted(p)]
            if recursive:
                entries = sorted(dir_entries + file_entries, key=lambda e: e["path"])
            else:
                entries = dir_entries + file_entries
        page_size = TREE_PAGE_SIZE_EXPAND if expand else TREE_PAGE_SIZE
        if expand:
            try:
                start = int(h.q("cursor", "0"))
            except ValueError:
                raise HubError(400, "invalid cursor") from None
            self._with_last_commits(repo, sha, entries[start:start + page_size])
        self._paginated(h, entries, page_size)

    def _paths_info(self, h: _Handler, repo_type: str, ns: str, name: str, rev: str) -> None:
        raw = h._read_body()
        content_type = (h.headers.get("Content-Type") or "").lower()
        if "json" in content_type:
            try:
                body = json.loads(raw or b"{}")
            except ValueError:
                raise HubError(400, "request body is not valid JSON") from None
            paths, expand = _as_list(body.get("paths")), _truthy(body.get("expand", False))
        else:
            form = parse_qs(raw.decode("utf-8", errors="replace"), keep_blank_values=True)
            paths, expand = form.get("paths", []), _truthy((form.get("expand") or ["false"])[-1])
        repo = self._repo(h.caller, repo_type, ns, name)
        sha = self._resolve(repo, rev or "main")
        files = repo.commit(sha)["files"]
        dirs = _directories(files)
        out = []
        for path in paths:
            path = str(path).strip("/")
            if path in files:
                out.append(_entry_json(path, files[path]))
            elif path in dirs:
                out.append(_dir_json(path, files))
        if expand:
            self._with_last_commits(repo, sha, out)
        h._json(out)

    def _create_branch(self, h: _Handler, repo_type: str, ns: str, name: str, branch: str) -> None:
        body = h._json_body()
        if not branch or branch.startswith("refs/") or _SHA1_RE.match(branch) or not _valid_ref_name(branch):
            raise HubError(400, f"Invalid reference for a branch: {branch!r}")
        with self._lock:
            repo = self._repo(h.caller, repo_type, ns, name, write=True)
            start = body.get("startingPoint") or "main"
            sha = self._resolve(repo, start)
            refs = repo.refs()
            if branch in refs["branches"]:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            refs["branches"][branch] = sha
            repo.write_refs(refs)
        h._json({})

    def _delete_branch(self, h: _Handler, repo_type: str, ns: str, name: str, branch: str) -> None:
        h._drain()
        with self._lock:
            repo = self._repo(h.caller, repo_type, ns, name, write=True)
            refs = repo.refs()
            if branch == "main":
                raise HubError(403, "Cannot delete the default branch main")
            if branch not in refs["branches"]:
                raise _revision_not_found(branch)
            del refs["branches"][branch]
            repo.write_refs(refs)
        h._json({})

    def _create_tag(self, h: _Handler, repo_type: str, ns: str, name: str, rev: str) -> None:
        body = h._json_body()
        tag = body.get("tag")
        if not isinstance(tag, str) or not tag or tag.startswith("refs/") or not _valid_ref_name(tag):
            raise HubError(400, f"Invalid tag name: {tag!r}")
        with self._lock:
            repo = self._repo(h.caller, repo_type, ns, name, write=True)
            sha = self._resolve(repo, rev)
            refs = repo.refs()
            if tag in refs["tags"]:
                raise HubError(409, f"Tag {tag} already exists")
            refs["tags"][tag] = sha
            repo.write_refs(refs)
        h._json({})

    def _delete_tag(self, h: _Handler, repo_type: str, ns: str, name: str, tag: str) -> None:
        h._drain()
        with self._lock:
            repo = self._repo(h.caller, repo_type, ns, name, write=True)
            refs = repo.refs()
            if tag not in refs["tags"]:
                raise _revision_not_found(tag)
            del refs["tags"][tag]
            repo.write_refs(refs)
        h._json({})

    # -- uploads ---------------------------------------------------------------------------------

    def _preupload(self, h: _Handler, repo_type: str, ns: str, name: str, rev: str) -> None:
        body = h._json_body()
        repo = self._repo(h.caller, repo_type, ns, name, write=True)
        sha = self._resolve(repo, rev)
        files = repo.commit(sha)["files"]
        patterns = lfs_patterns(repo.read_content(files[".gitattributes"]).decode("utf-8", "replace")
                                if ".gitattributes" in files else "")
        gitignore = body.get("gitIgnore")
        if gitignore is None and ".gitignore" in files:
            gitignore = repo.read_content(files[".gitignore"]).decode("utf-8", "replace")
        out = []
        for item in _as_list(body.get("files")):
            if not isinstance(item, dict) or not isinstance(item.get("path"), str):
                raise HubError(400, "every file needs a path")
            path = item["path"]
            size = int(item.get("size") or 0)
            try:
                sample = base64.b64decode(item.get("sample") or "")
            except ValueError:
                raise HubError(400, f"sample of {path} is not base64") from None
            lfs = size > LFS_SIZE_THRESHOLD or b"\0" in sample or matches_lfs(path, patterns)
            remote = files.get(path)
            oid = None
            if remote is not None:
                oid = remote["lfs"] or remote["oid"]
            out.append({"path": path, "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": bool(gitignore) and gitignore_match(path, gitignore), "oid": oid})
        h._json({"files": out, "commitOid": sha})

    def _lfs_batch(self, h: _Handler, repo_type: str, ns: str, name: str) -> None:
        body = h._json_body()
        repo = self._repo(h.caller, repo_type, ns, name, write=body.get("operation", "upload") == "upload")
        if body.get("operation", "upload") != "upload":
            raise HubError(400, "this server only supports the LFS upload operation")
        base = h._base()
        out = []
        for obj in _as_list(body.get("objects")):
            oid, size = str(obj.get("oid", "")), obj.get("size")
            if not _SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
                out.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid or size"}})
                continue
            if repo.has_lfs(oid, size):
                out.append({"oid": oid, "size": size})
                continue
            with self._lock:
                self._pending_lfs[(str(repo.dir), oid)] = size
            where = f"{repo_type}/{quote(ns)}/{quote(name)}/{oid}"
            out.append({"oid": oid, "size": size, "authenticated": True, "actions": {
                "upload": {"href": f"{base}/_lfs/upload/{where}?size={size}", "header": {}, "expires_in": 86400},
                "verify": {"href": f"{base}/_lfs/verify/{where}", "header": {}, "expires_in": 86400},
            }})
        h._json({"transfer": "basic", "objects": out, "hash_algo": "sha256"},
                content_type="application/vnd.git-lfs+json")

    def _route_lfs_transfer(self, h: _Handler, method: str, seg: list[str]) -> None:
        if len(seg) != 5 or seg[0] not in ("upload", "verify") or seg[1] not in URL_PREFIX:
            raise HubError(404, "Not found")
        action, repo_type, ns, name, oid = seg
        if not _SHA256_RE.match(oid):
            raise HubError(404, "Not found")
        if action == "upload" and method == "PUT":
            return self._lfs_put(h, repo_type, ns, name, oid)
        if action == "verify" and method == "POST":
            body = h._json_body()
            repo = self._repo(h.caller, repo_type, ns, name)
            size = body.get("size")
            if body.get("oid", oid) != oid or not repo.has_lfs(oid, size if isinstance(size, int) else None):
                raise HubError(404, f"LFS object {oid} was not uploaded (or has another size)")
            return h._json({})
        raise HubError(405, f"{method} is not allowed here")

    def _lfs_put(self, h: _Handler, repo_type: str, ns: str, name: str, oid: str) -> None:
        repo = Repo(self, repo_type, ns, name)
        if not (_valid_name(ns) and _valid_name(name)) or not repo.exists():
            raise HubError(404, "Repository not found", "RepoNotFound")
        key = (str(repo.dir), oid)
        with self._lock:
            expected = self._pending_lfs.get(key)
        if expected is None and not repo.has_lfs(oid):
            raise HubError(403, f"LFS object {oid} was not announced by an LFS batch request")
        try:
            declared = int(h.q("size")) if h.q("size") is not None else expected
        except ValueError:
            raise HubError(400, "size must be an integer") from None
        tmp_dir = repo.dir / "objects" / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f"{oid}.", suffix=".part")
        digest, size = hashlib.sha256(), 0
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in h._iter_body():
                    digest.update(chunk)
                    size += len(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            if digest.hexdigest() != oid:
                raise HubError(400, f"sha256 mismatch: the body hashes to {digest.hexdigest()}, not {oid}")
            if declared is not None and size != declared:
                raise HubError(400, f"size mismatch: got {size} bytes, expected {declared}")
            target = repo.lfs_path(oid)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        with self._lock:
            self._pending_lfs.pop(key, None)
        h._send(200, b"", content_type="text/plain")

    def _commit(self, h: _Handler, repo_type: str, ns: str, name: str, rev: str) -> None:
        raw = h._read_body()
        repo = self._repo(h.caller, repo_type, ns, name, write=True)
        create_pr = _truthy(h.q("create_pr", "0"))
        header, ops = None, []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, f"line {number} of the commit payload is not a {{key, value}} JSON object") from None
            if key == "header":
                header = value
            elif key in ("file", "lfsFile", "deletedFile", "deletedFolder"):
                ops.append((key, value))
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        if not isinstance(header, dict) or not str(header.get("summary") or "").strip():
            raise HubError(400, "the commit needs a header line with a non-empty summary")
        # decode inline files before taking the lock
        decoded = []
        for key, value in ops:
            path = str(value.get("path", ""))
            if key == "deletedFolder":
                path = path.rstrip("/")
            if not _valid_repo_path(path):
                raise HubError(400, f"Invalid path in repo: {value.get('path')!r}")
            if key == "file":
                try:
                    content = value.get("content", "")
                    data = (base64.b64decode(content, validate=True) if value.get("encoding", "base64") == "base64"
                            else str(content).encode())
                except ValueError:
                    raise HubError(400, f"content of {path} is not valid base64") from None
                if len(data) > LFS_SIZE_THRESHOLD:
                    raise HubError(400, f"Your push was rejected: {path} is larger than 10 MiB and must be "
                                        "uploaded with LFS")
                decoded.append((key, path, data))
            elif key == "lfsFile":
                oid = str(value.get("oid", ""))
                if value.get("algo", "sha256") != "sha256" or not _SHA256_RE.match(oid):
                    raise HubError(400, f"invalid LFS oid for {path}")
                decoded.append((key, path, (oid, value.get("size"))))
            else:
                decoded.append((key, path, None))

        with self._lock:
            refs = repo.refs()
            parent_commit = header.get("parentCommit")
            if create_pr:
                base = self._resolve(repo, rev)
                if parent_commit:
                    base = self._resolve(repo, str(parent_commit))
                ref_kind, ref_name = "pulls", str(max([int(n) for n in refs["pulls"]] + [0]) + 1)
            else:
                if rev.startswith("refs/pr/"):
                    ref_kind, ref_name = "pulls", rev[len("refs/pr/"):]
                else:
                    ref_kind, ref_name = "branches", rev[len("refs/heads/"):] if rev.startswith("refs/heads/") else rev
                base = refs[ref_kind].get(ref_name)
                if base is None:
                    if repo.resolve(rev) is not None:
                        raise HubError(400, f"Invalid rev id: {rev} is not a branch; commits go to branches")
                    raise _revision_not_found(rev)
                if parent_commit and not (len(str(parent_commit)) >= 7 and base.startswith(str(parent_commit))):
                    raise HubError(412, f"A commit has happened since {parent_commit}: {rev} is now at {base}. "
                                        "Please refresh and try again.")
            files = dict(repo.commit(base)["files"])
            for key, path, payload in decoded:
                if key == "file":
                    files[path] = {"oid": git_blob_sha1(payload), "size": len(payload), "lfs": None}
                elif key == "lfsFile":
                    oid, size = payload
                    stored = repo.lfs_path(oid)
                    if not stored.is_file():
                        raise HubError(422, f"LFS object {oid} for {path} was never uploaded to {repo.id}")
                    actual = stored.stat().st_size
                    if size is not None and size != actual:
                        raise HubError(422, f"LFS object {oid} for {path} has {actual} bytes, not {size}")
                    files[path] = {"oid": git_blob_sha1(lfs_pointer(oid, actual)), "size": actual, "lfs": oid}
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                else:  # deletedFolder
                    inside = [p for p in files if p.startswith(path + "/")]
                    if not inside:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in inside:
                        del files[p]
            for path in files:
                parts = path.split("/")
                for i in range(1, len(parts)):
                    if "/".join(parts[:i]) in files:
                        raise HubError(400, f"{path} conflicts with the file {'/'.join(parts[:i])}: a path cannot be "
                                            "both a file and a folder")
            for key, _path, payload in decoded:  # objects first, the ref last: all or nothing
                if key == "file":
                    repo.store_blob(payload)
            sha = repo.new_commit(base, files, str(header["summary"]), str(header.get("description") or ""),
                                  h.caller.user)
            refs = repo.refs()
            refs[ref_kind][ref_name] = sha
            repo.write_refs(refs)
        url = repo.url(h._base())
        h._json({"success": True, "commitOid": sha, "commitUrl": f"{url}/commit/{sha}",
                 "commitMessage": header["summary"], "hookOutput": "",
                 "pullRequestUrl": f"{url}/discussions/{ref_name}" if ref_kind == "pulls" else None})

    # -- downloads -------------------------------------------------------------------------------

    def _resolve_file(self, h: _Handler, repo_type: str, ns: str, name: str, rev: str, path: str) -> None:
        repo = self._repo(h.caller, repo_type, ns, name)
        meta = repo.meta
        if meta.get("gated") and repo.namespace not in h.caller.namespaces():
            kind = {"model": "model", "dataset": "dataset", "space": "space"}[repo_type]
            raise HubError(401 if h.caller.anonymous else 403,
                           f"Access to {kind} {repo.id} is restricted. You must have access to it and be "
                           "authenticated to access it.", "GatedRepo")
        sha = self._resolve(repo, rev)
        entry = repo.commit(sha)["files"].get(path)
        if entry is None:
            raise _entry_not_found(path, sha)
        size = entry["size"]
        etag = entry["lfs"] or entry["oid"]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Cache-Control": "private, max-age=0"}
        if entry.get("lfs"):
            headers["X-Linked-Etag"] = f'"{etag}"'
            headers["X-Linked-Size"] = str(size)
        content_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
        if content_type.startswith("text/"):
            content_type += "; charset=utf-8"
        start, end, status = 0, size - 1, 200
        range_header = h.headers.get("Range")
        if range_header and h.command == "GET":
            parsed = _parse_range(range_header, size)
            if parsed is None:
                raise HubError(416, f"Range not satisfiable: {range_header}", headers={"Content-Range": f"bytes */{size}"})
            if parsed != (0, size - 1) or size == 0:
                start, end = parsed
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(0, end - start + 1)
        h._status = status
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(length))
        for key, value in headers.items():
            h.send_header(key, value)
        h.end_headers()
        if h.command == "HEAD" or length == 0:
            return
        with open(repo.content_path(entry), "rb") as handle:
            handle.seek(start)
            remaining = length
            while remaining > 0:
                chunk = handle.read(min(remaining, _BODY_CHUNK))
                if not chunk:
                    break
                h.wfile.write(chunk)
                remaining -= len(chunk)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(first, last) byte of a single ``bytes=`` range, clipped to the size; None if unsatisfiable."""
    match = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if not match or (not match.group(1) and not match.group(2)):
        return None
    first, last = match.group(1), match.group(2)
    if first:
        start = int(first)
        end = min(int(last), size - 1) if last else size - 1
    else:
        suffix = int(last)
        if suffix == 0:
            return None
        start, end = max(0, size - suffix), size - 1
    if start >= size or start > end:
        return None
    return start, end


def _valid_ref_name(name: str) -> bool:
    if any(c in name for c in " ~^:?*[\\\0") or name.startswith("/") or name.endswith("/") or name.endswith(".lock"):
        return False
    return all(p not in ("", ".", "..") and not p.startswith(".") for p in name.split("/"))
