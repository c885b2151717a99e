"""The one place that turns an artifact location into a local folder (docs/design.md, "Hub artifacts").

``pull_factors`` / ``pull_index`` take a folder (returned as is) or ``REPO[@REV]``: the manifest
is read at the revision, the commit it resolved to is pinned, and exactly the files needed
(``modules="mlp"``: MLP files only) are downloaded into the Hugging Face cache, each checked
against the manifest's sha256; a file altered on the server is reported and dropped from the
cache instead of loaded. After one pull the same location resolves offline
(``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import glob
import logging
from collections.abc import Callable
from pathlib import Path

from hub_msif.artifacts.integrity import verify_file
from hub_msif.artifacts.manifest import FACTORS, INDEX, MODULE_CHOICES, factor_files, index_files, read_manifest
from hub_msif.errors import HubError, HubIntegrityError, IntegrityError, MsifValueError
from hub_msif.hub.cards import CARD_NAME
from hub_msif.hub.failures import hub_failures
from hub_msif.hub.location import REPO_TYPE, Location, parse_location
from hub_msif.models import is_commit_sha

logger = logging.getLogger(__name__)


def _pull(location: Location, manifest_name: str, select: Callable[[Path], dict[str, str]], what: str,
          token, cache_dir) -> Path:
    """Downloads the manifest at the revision, then exactly the files ``select`` names, at the
    commit the manifest came from; checks every file's sha256."""
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id, revision = location.repo_id, location.revision or "main"
    doing = f"cannot pull {what} {repo_id}@{revision}"
    with hub_failures(repo_id, revision, doing, token):
        manifest_path = Path(hf_hub_download(repo_id, manifest_name, repo_type=REPO_TYPE, revision=revision,
                                             token=token, cache_dir=cache_dir))
    folder = manifest_path.parent
    commit = folder.name if is_commit_sha(folder.name) else revision
    try:
        files = select(folder)
    except ValueError as err:
        raise type(err)(f"{repo_id}@{revision}: {err}") from err
    patterns = [glob.escape(p) for p in [manifest_name, CARD_NAME, *files]]
    with hub_failures(repo_id, revision, doing, token):
        folder = Path(snapshot_download(repo_id, repo_type=REPO_TYPE, revision=commit, allow_patterns=patterns,
                                        token=token, cache_dir=cache_dir))
    for relative, expected in files.items():
        path = folder / relative
        if not path.is_file():
            raise HubError(f"{doing}: {relative} was not downloaded (the Hub could not be reached or the repo lacks it)")
        try:
            verify_file(path, expected)
        except IntegrityError as err:
            _evict(path)
            raise HubIntegrityError(
                f"{repo_id}@{revision} (commit {commit}): {relative} is corrupted or was altered on the Hub ({err}); "
                "the bad copy was removed from the cache"
            ) from err
    logger.info("pulled %s %s@%s (commit %s) into %s", what, repo_id, revision, commit, folder)
    return folder


def _evict(path: Path) -> None:
    """Removes a bad file from the Hugging Face cache (the snapshot link and the blob it points to)."""
    try:
        blob = path.resolve()
        path.unlink(missing_ok=True)
        if blob != path and "blobs" in blob.parts:
            blob.unlink(missing_ok=True)
    except OSError as err:
        logger.warning("could not remove %s from the cache: %s", path, err)


def pull_factors(location: str | Path, modules: str = "all", stages=None, token: str | None = None,
                 cache_dir: str | Path | None = None) -> Path:
    """The local folder of the factors at ``location`` (a folder, or ``REPO[@REV]`` pulled into
    the Hugging Face cache). Only the manifest, the card and the files of ``stages`` (default
    both) and ``modules`` (``all`` or ``mlp``) are downloaded; each is sha256-checked."""
    if modules not in MODULE_CHOICES:
        raise MsifValueError(f"modules must be one of {', '.join(MODULE_CHOICES)}, not {modules!r}")
    where = parse_location(location)
    if where.is_local:
        return where.folder

    def select(folder: Path) -> dict[str, str]:
        return factor_files(read_manifest(folder, FACTORS), modules, stages)

    return _pull(where, FACTORS.manifest_name, select, "factors", token, cache_dir)


def pull_index(location: str | Path, token: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local folder of the index at ``location`` (a folder, or ``REPO[@REV]`` pulled into the
    Hugging Face cache, every file sha256-checked)."""
    where = parse_location(location)
    if where.is_local:
        return where.folder
    return _pull(where, INDEX.manifest_name, lambda folder: index_files(read_manifest(folder, INDEX)), "index", token,
                 cache_dir)
