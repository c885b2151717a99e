"""Repos on disk: metadata, refs (branches, tags, pull requests), commit snapshots and objects.

Layout under the server's root (a restarted server on the same root serves the same repos)::

    {models,datasets,spaces}/<namespace>/<name>/
        repo.json                     {"_id", "id", "type", "private", "createdAt"; a Space also
                                       "sdk" and "hardware" (the requested flavour, or null)}
        refs.json                     {"branches": {name: sha}, "tags": {name: sha}, "pulls": {"1": sha}}
        commits/<sha>.json            {"id", "parent", "title", "message", "date", "author",
                                       "files": {path: {"oid", "size", "lfs": sha256 | null}}}
        objects/blobs/<git blob sha1> contents of regular files
        objects/lfs/<sha256>          contents of LFS files

A commit is a full snapshot of the file table, so reading any revision reads one JSON file.
Every file is written atomically (``hub_msif.artifacts.atomic``); a commit writes its objects and
its snapshot first and moves its ref last, so it lands whole or not at all. A repo exists once
its ``repo.json`` does (written last on creation, moved away first on deletion). Objects no
commit references (uploads of a push that never committed) are removed by ``garbage.py``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from hub_msif.artifacts.atomic import atomic_write_bytes, atomic_write_json
from hub_msif.hub.server.api_errors import HubApiError, revision_not_found
from hub_msif.hub.server.card_metadata import parse_front_matter
from hub_msif.hub.server.gitattributes import DEFAULT_GITATTRIBUTES

RESERVED_NAMESPACES = {"api", "datasets", "models", "spaces", "_lfs"}  # they would shadow URL routes
SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,96}$")


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a file with content ``data`` (the Hub's id of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git LFS pointer file that stands in git for an LFS file of this sha256 and size."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def now_iso() -> str:
    """The current UTC time as the Hub writes it: ``YYYY-MM-DDTHH:MM:SS.sssZ``."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def valid_name(name: str) -> bool:
    """Whether ``name`` may be a namespace or repo name (the client's repo id rules)."""
    return (bool(_NAME_RE.match(name)) and "--" not in name and ".." not in name and not name.endswith(".git")
            and name.strip(".") != "")


FORBIDDEN_FOLDERS = (".git", ".cache")  # the Hub refuses these as any part of a path (huggingface_hub's too)


def valid_repo_path(path: str) -> bool:
    """Whether ``path`` may name a file in a repo: relative, '/'-separated, no '.', '..', '.git' or
    '.cache' part at any depth (``a/.git/hooks/x`` is refused, as on the Hub)."""
    if not path or path.startswith("/") or path.endswith("/") or "\0" in path or "\\" in path:
        return False
    return all(p not in ("", ".", "..", *FORBIDDEN_FOLDERS) for p in path.split("/"))


def valid_ref_name(name: str) -> bool:
    """Whether ``name`` may name a branch or a tag (git's ref name rules, roughly)."""
    if any(c in name for c in " ~^:?*[\\\0") or name.startswith("/") or name.endswith("/") or name.endswith(".lock"):
        return False
    return all(p not in ("", ".", "..") and not p.startswith(".") for p in name.split("/"))


@dataclass(frozen=True)
class Change:
    """One operation of a commit on ``path``: ``kind`` "file" (content ``data``), "lfsFile" (an
    uploaded LFS object ``oid`` of ``size`` bytes; size None for a copy), "deletedFile" or
    "deletedFolder"."""

    kind: str
    path: str
    data: bytes = b""
    oid: str = ""
    size: int | None = None


class Store:
    """Every repo under ``root``, with caches of immutable commits and parsed cards, and the LFS
    uploads that batch requests announced (an upload URL carries no token)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        # Held for every change, so that no two writers interleave a commit's read of its base,
        # its objects and its ref move, whichever threads serve the requests.
        self.lock = threading.RLock()
        self._commits: dict[tuple[Path, str], dict] = {}
        self._cards: dict[tuple[Path, str], tuple[dict | None, str | None]] = {}
        self._announced: dict[tuple[Path, str], int] = {}

    def repo(self, repo_type: str, namespace: str, name: str) -> Repo:
        """The repo ``namespace/name`` of ``repo_type`` ("model", "dataset" or "space"), existing or not."""
        return Repo(self, repo_type, namespace, name)

    def repos(self, repo_type: str, namespace: str | None = None) -> Iterator[Repo]:
        """The existing repos of ``repo_type`` (of ``namespace`` only, when given), sorted by id."""
        folder = self.root / f"{repo_type}s"
        namespaces = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        for ns_dir in namespaces:
            if namespace is not None and ns_dir.name != namespace:
                continue
            for repo_dir in sorted(p for p in ns_dir.iterdir() if p.is_dir()):
                repo = self.repo(repo_type, ns_dir.name, repo_dir.name)
                if repo.exists():
                    yield repo

    def create_repo(self, repo_type: str, namespace: str, name: str, private: bool, author: str,
                    extra: dict | None = None) -> Repo | None:
        """A new repo whose ``main`` holds the Hub's first commit (a default ``.gitattributes``);
        None when the repo exists already. ``extra`` goes into ``repo.json`` (a Space's sdk and hardware)."""
        repo = self.repo(repo_type, namespace, name)
        with self.lock:
            if repo.exists():
                return None
            if repo.dir.exists():  # debris of an interrupted creation or deletion
                shutil.rmtree(repo.dir)
            data = DEFAULT_GITATTRIBUTES.encode()
            files = {".gitattributes": {"oid": repo.store_blob(data), "size": len(data), "lfs": None}}
            sha = repo.new_commit(None, files, "initial commit", "", author)
            repo.write_refs({"branches": {"main": sha}, "tags": {}, "pulls": {}})
            repo.write_meta({"_id": uuid.uuid4().hex[:24], "id": repo.id, "type": repo_type, "private": private,
                             "createdAt": now_iso(), **(extra or {})})
        return repo

    def delete_repo(self, repo: Repo) -> None:
        """Removes ``repo`` and everything in it; it disappears at once (one rename)."""
        trash = self.root / ".trash" / uuid.uuid4().hex
        trash.parent.mkdir(parents=True, exist_ok=True)
        with self.lock:
            os.replace(repo.dir, trash)
        shutil.rmtree(trash, ignore_errors=True)
        for cache in (self._commits, self._cards, self._announced):
            for key in [k for k in cache if k[0] == repo.dir]:
                cache.pop(key, None)

    def announce_lfs(self, repo: Repo, oid: str, size: int) -> None:
        """Allows uploads of the LFS object ``oid`` of ``size`` bytes to ``repo``, until one succeeds."""
        self._announced[(repo.dir, oid)] = size

    def announced_lfs_size(self, repo: Repo, oid: str) -> int | None:
        """The size an LFS batch request announced for ``oid`` in ``repo``; None if never announced."""
        return self._announced.get((repo.dir, oid))


class Repo:
    """One repo folder: metadata, refs, immutable commit snapshots and a content-addressed store."""

    def __init__(self, store: Store, repo_type: str, namespace: str, name: str) -> None:
        self.store = store
        self.type, self.namespace, self.name = repo_type, namespace, name
        self.id = f"{namespace}/{name}"
        self.dir = store.root / f"{repo_type}s" / namespace / name

    def exists(self) -> bool:
        """Whether the repo exists (its ``repo.json`` does)."""
        return (self.dir / "repo.json").is_file()

    def read_meta(self) -> dict | None:
        """The contents of ``repo.json``; None when the repo does not exist (or is being deleted)."""
        try:
            return json.loads((self.dir / "repo.json").read_text())
        except (OSError, ValueError):
            return None

    def write_meta(self, meta: dict) -> None:
        """Replaces ``repo.json`` with ``meta``."""
        atomic_write_json(self.dir / "repo.json", meta)

    def refs(self) -> dict[str, dict[str, str]]:
        """``{"branches": {name: sha}, "tags": {...}, "pulls": {number: sha}}``."""
        refs = json.loads((self.dir / "refs.json").read_text())
        for kind in ("branches", "tags", "pulls"):
            refs.setdefault(kind, {})
        return refs

    def write_refs(self, refs: dict) -> None:
        """Replaces ``refs.json`` with ``refs`` (the one write that moves branches and tags)."""
        atomic_write_json(self.dir / "refs.json", refs)

    def commit(self, sha: str) -> dict:
        """The commit record of ``sha`` (a shared cached dict: do not change it)."""
        key = (self.dir, sha)
        record = self.store._commits.get(key)
        if record is None:
            record = json.loads((self.dir / "commits" / f"{sha}.json").read_text())
            self.store._commits[key] = record
        return record

    def find(self, rev: str) -> str | None:
        """The commit sha of a branch, tag, ``refs/heads|tags|pr/...`` name or full sha; None if unknown."""
        refs = self.refs()
        for prefix, kind in (("refs/pr/", "pulls"), ("refs/heads/", "branches"), ("refs/tags/", "tags")):
            if rev.startswith(prefix):
                return refs[kind].get(rev[len(prefix):])
        sha = refs["branches"].get(rev) or refs["tags"].get(rev)
        if sha is None and SHA1_RE.match(rev) and (self.dir / "commits" / f"{rev}.json").is_file():
            sha = rev
        return sha

    def resolve(self, rev: str) -> str:
        """``find(rev)``, raising ``HubApiError`` RevisionNotFound when the revision is unknown."""
        sha = self.find(rev)
        if sha is None:
            raise revision_not_found(rev)
        return sha

    def add_ref(self, kind: str, name: str, sha: str) -> bool:
        """Points the new ref ``name`` of ``kind`` ("branches" or "tags") at ``sha``; False if it exists."""
        with self.store.lock:
            refs = self.refs()
            if name in refs[kind]:
                return False
            refs[kind][name] = sha
            self.write_refs(refs)
        return True

    def remove_ref(self, kind: str, name: str) -> bool:
        """Removes the ref ``name`` of ``kind`` ("branches" or "tags"); False if there is none."""
        with self.store.lock:
            refs = self.refs()
            if refs[kind].pop(name, None) is None:
                return False
            self.write_refs(refs)
        return True

    # -- objects

    def blob_path(self, oid: str) -> Path:
        """Where the regular file content of git blob id ``oid`` is stored."""
        return self.dir / "objects" / "blobs" / oid

    def lfs_path(self, sha256: str) -> Path:
        """Where the LFS object ``sha256`` is stored."""
        return self.dir / "objects" / "lfs" / sha256

    def content_path(self, entry: dict) -> Path:
        """Where the content of a file entry ``{"oid", "size", "lfs"}`` of a commit is stored."""
        return self.lfs_path(entry["lfs"]) if entry.get("lfs") else self.blob_path(entry["oid"])

    def read_content(self, entry: dict) -> bytes:
        """The content of a file entry of a commit."""
        return self.content_path(entry).read_bytes()

    def store_blob(self, data: bytes) -> str:
        """Stores a regular file's content (once) and returns its git blob sha1. A blob stored
        already has its age renewed: the commit about to name it must not lose it to ``garbage``."""
        oid = git_blob_sha1(data)
        path = self.blob_path(oid)
        try:
            os.utime(path)
        except FileNotFoundError:
            atomic_write_bytes(path, data)
        return oid

    def has_lfs(self, sha256: str, size: int | None = None) -> bool:
        """Whether the LFS object ``sha256`` is stored (with ``size`` bytes, when given)."""
        path = self.lfs_path(sha256)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def keep_lfs(self, sha256: str) -> None:
        """Renews the age of the stored LFS object ``sha256``, which a commit is about to name
        without uploading it, so that ``garbage.collect_garbage`` leaves it alone."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self.lfs_path(sha256))

    def referenced_lfs(self) -> set[str]:
        """The LFS sha256s that some commit record of the repo names (reachable or not)."""
        found: set[str] = set()
        for record in (self.dir / "commits").glob("*.json"):
            found.update(e["lfs"] for e in json.loads(record.read_text()).get("files", {}).values() if e.get("lfs"))
        return found

    def release_uploads(self, oids: list[str]) -> None:
        """Removes the stored LFS objects ``oids`` (those of a commit that failed) that no commit
        of the repo references: a failed push gives back its disk space at once instead of after
        the grace period of ``garbage``. A rerun uploads them again."""
        if not oids:
            return
        with self.store.lock:
            try:
                referenced = self.referenced_lfs()
            except (OSError, ValueError, AttributeError):  # unreadable records: keep everything
                return
            for oid in set(oids) - referenced:
                self.lfs_path(oid).unlink(missing_ok=True)

    def lfs_upload(self, sha256: str, size: int) -> LfsUpload:
        """A writer for the content of the LFS object ``sha256`` of ``size`` bytes (see ``LfsUpload``)."""
        return LfsUpload(self, sha256, size)

    def card(self, files: dict) -> tuple[dict | None, str | None]:
        """``parse_front_matter`` of the ``README.md`` in a commit's ``files`` (cached by blob id)."""
        entry = files.get("README.md")
        if entry is None:
            return None, None
        key = (self.dir, entry["oid"])
        if key not in self.store._cards:
            try:
                text = self.read_content(entry).decode("utf-8", errors="replace")
            except OSError:
                return None, None
            self.store._cards[key] = parse_front_matter(text)
        return self.store._cards[key]

    # -- history

    def new_commit(self, parent: str | None, files: dict, title: str, message: str, author: str | None) -> str:
        """Writes a commit record (a snapshot of ``files``) and returns its sha; moves no ref."""
        record = {"parent": parent, "title": title, "message": message, "date": now_iso(), "author": author,
                  "files": dict(sorted(files.items()))}
        # the repo is part of the hash: the same snapshot in two repos gets two commit ids
        digest_input = json.dumps({"repo": f"{self.type}/{self.id}", **record}, sort_keys=True).encode()
        sha = hashlib.sha1(digest_input).hexdigest()
        atomic_write_json(self.dir / "commits" / f"{sha}.json", {**record, "id": sha})
        return sha

    def commit_changes(self, rev: str, changes: list[Change], summary: str, description: str,
                       author: str | None, parent: str | None = None, create_pr: bool = False) -> tuple[str, str | None]:
        """Applies ``changes`` on top of branch ``rev`` (or, with ``create_pr``, on a new pull request
        ``refs/pr/N`` based on ``rev``) as one commit. Returns ``(commit sha, N or None)``.

        Raises ``HubApiError``: 404 for an unknown branch or a deleted path that is missing, 412 when
        ``parent`` (a sha prefix) is no longer the branch head, 422 for an LFS object never
        uploaded, 400 for a path that would be both a file and a folder. Nothing lands then.
        """
        with self.store.lock:
            refs = self.refs()
            base: str | None  # a str past the checks below
            if create_pr:
                base = self.resolve(parent or rev)
                kind, ref = "pulls", str(max((int(n) for n in refs["pulls"]), default=0) + 1)
            else:
                kind, ref = ("pulls", rev[len("refs/pr/"):]) if rev.startswith("refs/pr/") else (
                    "branches", rev.removeprefix("refs/heads/"))
                base = refs[kind].get(ref)
                if base is None:
                    if self.find(rev) is not None:
                        raise HubApiError(400, f"Invalid rev id: {rev} is not a branch; commits go to branches")
                    raise revision_not_found(rev)
                if parent and not (len(parent) >= 7 and base.startswith(parent)):
                    raise HubApiError(412, f"A commit has happened since {parent}: {rev} is now at {base}. "
                                           "Please refresh and try again.")
            files = self._apply(dict(self.commit(base)["files"]), changes)
            for change in changes:  # objects first, the ref last: all or nothing
                if change.kind == "file":
                    self.store_blob(change.data)
            sha = self.new_commit(base, files, summary, description, author)
            refs[kind][ref] = sha
            self.write_refs(refs)
        return sha, ref if kind == "pulls" else None

    def _apply(self, files: dict, changes: list[Change]) -> dict:
        """The file table ``files`` after ``changes``; raises ``HubApiError`` for an impossible change."""
        for change in changes:
            path = change.path
            if change.kind == "file":
                files[path] = {"oid": git_blob_sha1(change.data), "size": len(change.data), "lfs": None}
            elif change.kind == "lfsFile":
                stored = self.lfs_path(change.oid)
                if not stored.is_file():
                    raise HubApiError(422, f"LFS object {change.oid} for {path} was never uploaded to {self.id}")
                size = stored.stat().st_size
                if change.size is not None and change.size != size:
                    raise HubApiError(422, f"LFS object {change.oid} for {path} has {size} bytes, not {change.size}")
                files[path] = {"oid": git_blob_sha1(lfs_pointer(change.oid, size)), "size": size, "lfs": change.oid}
            elif change.kind == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubApiError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            else:  # deletedFolder
                inside = [p for p in files if p.startswith(path + "/")]
                if not inside:
                    raise HubApiError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                for p in inside:
                    del files[p]
        for path in files:
            parts = path.split("/")
            for i in range(1, len(parts)):
                if "/".join(parts[:i]) in files:
                    raise HubApiError(400, f"{path} conflicts with the file {'/'.join(parts[:i])}: a path cannot "
                                           "be both a file and a folder")
        return files

    def last_commits(self, head: str, targets: dict[str, bool]) -> dict[str, dict]:
        """``{path: {"id", "title", "date"}}``: the newest commit from ``head`` back that touched each
        path of ``targets`` (``{path: is a folder}``; a folder is touched by any change inside it)."""
        found: dict[str, dict] = {}
        remaining = dict(targets)
        sha: str | None = head
        while remaining and sha:
            commit = self.commit(sha)
            parent = self.commit(commit["parent"]) if commit.get("parent") else None
            current, previous = commit["files"], (parent["files"] if parent else {})
            changed = {p for p in set(current) | set(previous) if current.get(p) != previous.get(p)}
            for path, is_dir in list(remaining.items()):
                touched = any(c.startswith(path + "/") for c in changed) if is_dir else path in changed
                if touched or parent is None:
                    found[path] = {"id": sha, "title": commit["title"], "date": commit["date"]}
                    del remaining[path]
            sha = commit.get("parent")
        return found


class LfsUpload:
    """Receives the content of one announced LFS object: ``write`` its chunks inside a ``with``
    block; leaving the block checks the sha256 and size and stores the object, or raises
    ``HubApiError`` (400 bad content, 413 more bytes than announced, 507 disk full) leaving nothing
    behind, its part file included.

    The part file ``objects/tmp/<sha256>.<random>.part`` is held under an exclusive ``flock`` while
    it is written: ``garbage.collect_garbage`` (in this process or in ``hub gc``) skips a part file
    it cannot lock, so an upload in progress is never collected, whatever the grace period.
    """

    def __init__(self, repo: Repo, sha256: str, size: int) -> None:
        self.repo, self.sha256, self.size = repo, sha256, size
        self._digest = hashlib.sha256()
        self._received = 0

    def __enter__(self) -> LfsUpload:
        # atomic_write_bytes wants the whole content at once; an upload streams in, so the same
        # temporary-file, fsync and rename steps are taken here chunk by chunk
        tmp_dir = self.repo.dir / "objects" / "tmp"
        try:
            tmp_dir.mkdir(parents=True, exist_ok=True)
            for _ in range(5):
                fd, self._tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f"{self.sha256}.", suffix=".part")
                fcntl.flock(fd, fcntl.LOCK_EX)
                # a collector may have removed the file between its creation and the lock: start over
                if _same_file(fd, self._tmp):
                    break
                os.close(fd)
            else:
                raise HubApiError(503, "the upload's part file keeps being removed; try again")
        except OSError as err:
            raise _storage_error(err, self.repo) from err
        self._handle = os.fdopen(fd, "wb")
        return self

    def write(self, chunk: bytes) -> None:
        if self._received + len(chunk) > self.size:
            raise HubApiError(413, f"size mismatch: the body has more than the {self.size} bytes the LFS batch "
                                   "announced")
        self._digest.update(chunk)
        self._received += len(chunk)
        try:
            self._handle.write(chunk)
        except OSError as err:
            raise _storage_error(err, self.repo) from err

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                try:
                    self._handle.flush()
                    os.fsync(self._handle.fileno())
                except OSError as err:
                    raise _storage_error(err, self.repo) from err
                if self._digest.hexdigest() != self.sha256:
                    raise HubApiError(400, f"sha256 mismatch: the body hashes to {self._digest.hexdigest()}, "
                                           f"not {self.sha256}")
                if self._received != self.size:
                    raise HubApiError(400, f"size mismatch: got {self._received} bytes, expected {self.size}")
                target = self.repo.lfs_path(self.sha256)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self._tmp, target)  # still under the lock: no collector sees it half done
                self.repo.store._announced.pop((self.repo.dir, self.sha256), None)
        finally:
            # closing may fail again on a full disk (buffered bytes): the part file goes regardless
            with contextlib.suppress(OSError):
                self._handle.close()
            Path(self._tmp).unlink(missing_ok=True)


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _storage_error(err: OSError, repo: Repo) -> HubApiError:
    """A failed write of the server's storage as an answer: 507 for a full disk, else 500."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return HubApiError(507, f"Insufficient Storage: the server's disk is full, the upload to {repo.id} was "
                                "discarded; free space on the server and push again")
    return HubApiError(500, f"the server could not store the upload to {repo.id}: {err.strerror or err}")
