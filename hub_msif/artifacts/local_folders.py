"""Where this machine keeps the local folders and files that artifacts name only by content.

A published manifest never holds a path of the machine that wrote it (docs/design.md, "No machine
paths"): a local model folder is recorded as a name plus the ``sha256:`` of its weights, a local data
file as its file name plus the sha256 of its bytes. To keep "fit here, attribute here" working
without retyping folders, every folder or file hub_msif hashes is remembered in a small JSON file,
``$HUB_MSIF_CACHE/local_folders.json`` (default ``~/.cache/hub_msif``), that maps the digest to
the paths seen with it. It is never published; on another machine it simply knows nothing, and the
user names the folder (``--model-path NAME=FOLDER``).

A lookup returns only paths that still exist; the caller checks the content again (a model's
revision is compared with the recorded one when it loads). Writes are atomic; two processes writing
at once may lose one entry, which only means that folder must be named by hand once.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hub_msif.artifacts.atomic import atomic_write_json

logger = logging.getLogger(__name__)
REGISTRY_NAME = "local_folders.json"
_MAX_PATHS = 8  # per digest, newest first


def cache_root() -> Path:
    """hub_msif's own cache folder: ``$HUB_MSIF_CACHE``, else ``~/.cache/hub_msif``."""
    return Path(os.environ.get("HUB_MSIF_CACHE") or Path.home() / ".cache" / "hub_msif")


def _registry() -> Path:
    return cache_root() / REGISTRY_NAME


def _read() -> dict[str, list[str]]:
    try:
        data = json.loads(_registry().read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: [p for p in v if isinstance(p, str)] for k, v in data.items() if isinstance(v, list)}


def remember(digest: str, paths: str | Path | list) -> None:
    """Records that ``paths`` (a folder, a file, or a list of files read together) has content ``digest``."""
    value = [str(Path(p).resolve()) for p in (paths if isinstance(paths, list) else [paths])]
    key_paths = json.dumps(value) if len(value) > 1 else value[0]
    data = _read()
    known = data.get(digest, [])
    if known and known[0] == key_paths:
        return
    data[digest] = [key_paths, *[p for p in known if p != key_paths]][:_MAX_PATHS]
    try:
        atomic_write_json(_registry(), data)
    except OSError as err:  # a read-only home: only convenience is lost
        logger.info("cannot record local folder %s in %s: %s", key_paths, _registry(), err)


def lookup(digest: str) -> list[Path] | None:
    """The newest remembered path(s) with content ``digest`` that still exist (a list of files for a
    multi-file corpus), or None."""
    for entry in _read().get(str(digest), []):
        paths = [Path(p) for p in json.loads(entry)] if entry.startswith("[") else [Path(entry)]
        if all(p.exists() for p in paths):
            return paths
    return None
