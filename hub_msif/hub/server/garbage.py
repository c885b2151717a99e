"""Removing stored objects that no commit references: what pushes that never committed left behind.

An LFS object is stored when its upload ends, before the commit that names it (``uploads.py``),
so a client killed between its uploads and its commit leaves objects no commit references; a
server killed mid-upload leaves a partial ``objects/tmp/*.part``; a commit that died before its
snapshot was written leaves regular blobs; an interrupted repo deletion leaves a folder under
``.trash``. ``collect_garbage`` removes all of these; ``HubServer.start`` runs it, and so does
``hub-msif hub gc --root DIR``.

**Why a grace period, not a lock.** An upload and the commit that names it are separate
requests, minutes or hours apart for a large push, and the server keeps no record of which
commit an upload is meant for: no lock the commit holds covers that gap, and a collector in
another process (``hub gc`` beside a running server) could not see an in-process lock anyway. So
an unreferenced file is removed only once it has not been written or touched for
``grace_seconds`` (default 24 hours, the lifetime of the upload URLs the LFS batch hands out: an
upload older than that belongs to a push that is over). An upload still being written is another
matter: it holds an exclusive ``flock`` on its part file (``store.LfsUpload``), which a
collector in any process sees, so it is never removed, whatever the grace. A commit that fails
releases the uploads it named at once (``store.Repo.release_uploads``). A file a commit may name without
uploading it has its age renewed: the LFS batch touches a stored object it reports as present
(the client then names it in its commit), and ``store_blob`` touches a regular blob it finds
already stored.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 24 * 3600


def _repo_dirs(root: Path) -> Iterator[Path]:
    """Every ``{models,datasets,spaces}/<namespace>/<name>`` folder under ``root``, whole repo or not."""
    for kind in ("models", "datasets", "spaces"):
        for namespace in sorted(p for p in (root / kind).glob("*") if p.is_dir()):
            yield from sorted(p for p in namespace.iterdir() if p.is_dir())


def _referenced(repo_dir: Path) -> tuple[set[str], set[str]]:
    """``(LFS sha256s, regular blob ids)`` that some commit record of the repo names; every record
    counts, reachable from a ref or not, since any commit sha can be asked for."""
    lfs, blobs = set(), set()
    for record in (repo_dir / "commits").glob("*.json"):
        files = json.loads(record.read_text()).get("files", {})
        for entry in files.values():
            if entry.get("lfs"):
                lfs.add(entry["lfs"])
            else:
                blobs.add(entry["oid"])
    return lfs, blobs


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
    return path.stat().st_size


def _remove(path: Path) -> int:
    """Removes a file or folder; returns the bytes freed (0 when it went away meanwhile)."""
    try:
        size = _size(path)
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
        return size
    except FileNotFoundError:
        return 0


def _remove_part(path: Path) -> int | None:
    """Removes an upload's part file unless the upload writing it holds its lock (it is in
    progress); returns the bytes freed, None when it was kept or went away meanwhile."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # being written: in-progress uploads are invisible to the collector
        size = os.fstat(fd).st_size
        path.unlink()  # under the lock: the upload re-checks its file after locking
        return size
    except FileNotFoundError:
        return None
    finally:
        os.close(fd)


def collect_garbage(root: str | Path, grace_seconds: float = DEFAULT_GRACE_SECONDS) -> tuple[int, int]:
    """Removes from the server storage at ``root`` the LFS objects and regular blobs no commit
    references, partial uploads, and leftovers of repo deletions, each only when it has not been
    written or touched for ``grace_seconds`` (see the module docstring for why). Returns
    ``(files and folders removed, bytes freed)``; a repo whose commit records cannot be read is skipped and
    logged (its objects may be referenced)."""
    root = Path(root)
    cutoff = time.time() - grace_seconds
    count = freed = 0

    def old(path: Path) -> bool:
        try:
            return path.stat().st_mtime < cutoff
        except FileNotFoundError:
            return False

    for repo_dir in _repo_dirs(root):
        try:
            lfs, blobs = _referenced(repo_dir)
        except (OSError, ValueError, AttributeError) as err:
            logger.warning("not collecting garbage in %s: a commit record cannot be read (%s)", repo_dir, err)
            continue
        objects = repo_dir / "objects"
        candidates = [p for p in (objects / "lfs").glob("*") if p.name not in lfs]
        candidates += [p for p in (objects / "blobs").glob("*") if p.name not in blobs]
        for path in candidates:
            if old(path):
                freed += _remove(path)
                count += 1
        for path in (objects / "tmp").glob("*"):
            if old(path):
                size = _remove_part(path) if path.name.endswith(".part") else _remove(path)
                if size is not None:
                    freed += size
                    count += 1
    for path in (root / ".trash").glob("*"):
        if old(path):
            freed += _remove(path)
            count += 1
    if count:
        logger.info("removed %d unreferenced file(s), %d bytes, from %s", count, freed, root)
    return count, freed
