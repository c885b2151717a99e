"""The one place that turns an artifact location into a local folder (docs/design.md, "Hub artifacts").

``pull_factors`` / ``pull_index`` / ``pull_gradindex`` take a folder (checked to be an artifact folder: its manifest
must read) or ``REPO[@REV]``: the manifest is read at the revision, the commit it resolved to is
pinned, and exactly the files needed (``modules="mlp"``: MLP files only) are downloaded into the
Hugging Face cache, each checked against the manifest's sha256. A file that fails the check is
removed from the cache; when the Hub lists the manifest's hash for it, the cached copy was the
bad one and is downloaded again, otherwise the file was altered on the Hub and is reported
(``HubIntegrityError``). After one pull the same location resolves offline (``HF_HUB_OFFLINE=1``),
and also while the Hub cannot be reached, which is found out in seconds (``hub.connectivity``).
"""

from __future__ import annotations

import contextlib
import glob
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from hub_msif.artifacts.integrity import verify_file
from hub_msif.artifacts.manifest import (
    FACTORS,
    GRADINDEX,
    INDEX,
    KINDS,
    MODULE_CHOICES,
    ArtifactKind,
    artifact_path,
    factor_files,
    gradindex_files,
    index_files,
    read_manifest,
)
from hub_msif.errors import HubError, HubIntegrityError, IntegrityError, MsifValueError, NotCachedError
from hub_msif.hub.cards import CARD_NAME
from hub_msif.hub.connectivity import hub_unreachable
from hub_msif.hub.hub_errors import endpoint, hub_failures, offline
from hub_msif.hub.location import REPO_TYPE, Location, parse_location
from hub_msif.hub.push import git_blob_id
from hub_msif.models import is_commit_sha

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _cache_only(reason: str | None, doing: str, where: str) -> Iterator[None]:
    """While the Hub cannot be reached (``reason``), a file missing from the cache is a
    ``NotCachedError`` that says so (``huggingface_hub`` would blame the connection vaguely)."""
    from huggingface_hub import errors

    try:
        yield
    except errors.LocalEntryNotFoundError as err:
        if reason is None:
            raise
        raise NotCachedError(f"{doing}: {where} is not (completely) in the Hugging Face cache and the Hub at "
                             f"{endpoint()} cannot be reached ({reason})") from err


def _pull(location: Location, manifest_name: str, select: Callable[[Path], dict[str, str]], what: str,
          token, cache_dir) -> Path:
    """Downloads the manifest at the revision, then exactly the files ``select`` names, at the
    commit the manifest came from; checks every file's sha256 (``_check_files``)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    if location.repo_id is None:
        raise MsifValueError(f"{location} is a local folder, not a Hub location REPO[@REV]")
    repo_id, revision = location.repo_id, location.revision or "main"
    where = f"{repo_id}@{revision}"
    doing = f"cannot pull {what} {where}"
    down = hub_unreachable()  # then only the cache is asked: no retries for half a minute
    cached_only = down is not None
    with hub_failures(repo_id, revision, doing, token), _cache_only(down, doing, where):
        manifest_path = Path(hf_hub_download(repo_id, manifest_name, repo_type=REPO_TYPE, revision=revision,
                                             token=token, cache_dir=cache_dir, local_files_only=cached_only))
    folder = manifest_path.parent
    commit = folder.name if is_commit_sha(folder.name) else revision
    try:
        files = select(folder)
    except ValueError as err:
        raise type(err)(f"{where}: {err}") from err
    patterns = [glob.escape(p) for p in [manifest_name, CARD_NAME, *files]]
    with hub_failures(repo_id, revision, doing, token), _cache_only(down, doing, where):
        folder = Path(snapshot_download(repo_id, repo_type=REPO_TYPE, revision=commit, allow_patterns=patterns,
                                        token=token, cache_dir=cache_dir, local_files_only=cached_only))
    _check_files(folder, files, repo_id, revision, commit, doing, down, token, cache_dir, KINDS[what])
    logger.info("pulled %s %s (commit %s) into %s", what, where, commit, folder)
    return folder


def _check_files(folder: Path, files: dict[str, str], repo_id: str, revision: str, commit: str, doing: str,
                 down: str | None, token, cache_dir, kind: ArtifactKind = FACTORS) -> None:
    """Checks each pulled file against the manifest's sha256. A bad file leaves the cache; it is
    downloaded once more when the Hub lists the manifest's hash for it (the cached copy was bad),
    and reported as altered on the Hub when the Hub lists another hash or serves bad bytes again."""
    bad: dict[str, IntegrityError] = {}
    for relative, expected in files.items():
        path = artifact_path(folder, relative, kind)
        if not path.is_file():
            raise HubError(f"{doing}: {relative} was not downloaded (the Hub could not be reached or the repo lacks it)")
        try:
            verify_file(path, expected)
        except IntegrityError as err:
            bad[relative] = err
    if not bad:
        return

    def altered(relative: str, err: Exception) -> HubIntegrityError:
        return HubIntegrityError(f"{repo_id}@{revision} (commit {commit}): {relative} is corrupted or was altered on the "
                                 f"Hub ({err}); the bad copy was removed from the cache")

    if down is not None or offline():
        for relative in bad:
            _evict(folder / relative)
        why = "HF_HUB_OFFLINE=1 is set" if down is None else f"the Hub at {endpoint()} cannot be reached ({down})"
        raise NotCachedError(f"{doing}: the cached copy of {', '.join(sorted(bad))} was corrupted (its sha256 differs "
                             f"from the manifest's) and was removed from the cache; {why}, so it cannot be downloaded "
                             "again now")
    from huggingface_hub import HfApi, RepoFile, hf_hub_download

    with hub_failures(repo_id, revision, doing, token):
        listed = {e.path: e for e in HfApi(token=token).get_paths_info(repo_id, sorted(bad), repo_type=REPO_TYPE,
                                                                        revision=commit)}
    # What the Hub lists for a file (an LFS file's sha256, a regular file's git blob id) says whose copy is bad.
    hub_is_wrong = {}
    for relative in bad:
        entry = listed.get(relative)
        if not isinstance(entry, RepoFile):  # not listed, or a folder where the manifest names a file
            hub_is_wrong[relative] = True
        elif entry.lfs is not None:
            hub_is_wrong[relative] = entry.lfs.sha256 != files[relative]
        else:
            hub_is_wrong[relative] = entry.blob_id == git_blob_id((folder / relative).read_bytes())
    for relative in bad:
        _evict(folder / relative)
    for relative, failure in bad.items():
        if hub_is_wrong[relative]:
            raise altered(relative, failure)
    for relative in bad:
        logger.warning("the cached copy of %s of %s (commit %s) differs from its manifest while the Hub lists the "
                       "manifest's sha256: downloading it again", relative, repo_id, commit)
        with hub_failures(repo_id, revision, doing, token):
            path = Path(hf_hub_download(repo_id, relative, repo_type=REPO_TYPE, revision=commit, token=token,
                                        cache_dir=cache_dir, force_download=True))
        try:
            verify_file(path, files[relative])
        except IntegrityError as again:  # the Hub lists the right hash but serves other bytes
            _evict(path)
            raise altered(relative, again) from again


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
    """The local folder of the factors at ``location``: a factor folder (returned as is once its
    manifest reads, else ``FactorsNotFoundError`` / ``FactorError``), or ``REPO[@REV]`` pulled into
    the Hugging Face cache. Only the manifest, the card and the files of ``stages`` (default both)
    and ``modules`` (``all`` or ``mlp``) are downloaded; each is sha256-checked."""
    if modules not in MODULE_CHOICES:
        raise MsifValueError(f"modules must be one of {', '.join(MODULE_CHOICES)}, not {modules!r}")
    where = parse_location(location)
    if where.folder is not None:  # where.is_local
        read_manifest(where.folder, FACTORS)  # a missing folder, /etc or a file is no factor folder
        return where.folder

    def select(folder: Path) -> dict[str, str]:
        return factor_files(read_manifest(folder, FACTORS), modules, stages)

    return _pull(where, FACTORS.manifest_name, select, "factors", token, cache_dir)


def pull_index(location: str | Path, token: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local folder of the index at ``location``: an index folder (returned as is once its
    manifest reads, else ``IndexNotFoundError`` / ``RetrievalError``), or ``REPO[@REV]`` pulled into
    the Hugging Face cache, every file sha256-checked."""
    where = parse_location(location)
    if where.folder is not None:  # where.is_local
        read_manifest(where.folder, INDEX)
        return where.folder
    return _pull(where, INDEX.manifest_name, lambda folder: index_files(read_manifest(folder, INDEX)), "index", token,
                 cache_dir)


def pull_gradindex(location: str | Path, token: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local folder of the gradient index at ``location``: a gradient index folder (returned as
    is once its manifest ``gradindex.json`` reads), or ``REPO[@REV]`` pulled into the Hugging Face
    cache: the manifest, the card, the documents and every shard, each sha256-checked."""
    where = parse_location(location)
    if where.folder is not None:  # where.is_local
        read_manifest(where.folder, GRADINDEX)
        return where.folder
    return _pull(where, GRADINDEX.manifest_name, lambda folder: gradindex_files(read_manifest(folder, GRADINDEX)),
                 "gradindex", token, cache_dir)


def reuse_stage(location: str | Path, out: str | Path, stage: str = "pretrained", token: str | None = None,
                cache_dir: str | Path | None = None, check: Callable[[dict], None] | None = None) -> dict:
    """Copies the ``stage`` factors published at ``location`` (``REPO[@REV]`` or a folder, holding
    that stage alone or in a pair) into the factor folder ``out``, as if fitted there: each module
    file verified against its sha256 and written atomically, then the stage's manifest entry, with
    ``reused_from`` naming the Hub repo and commit it came from (``hub-msif fit --reuse-pretrained``;
    a pre-trained stage serves every fine-tune of its base). ``check(entry)`` runs on the stage's
    manifest entry before anything is copied. Returns the stage's manifest entry."""
    from hub_msif.artifacts.atomic import atomic_write_bytes
    from hub_msif.artifacts.integrity import read_verified
    from hub_msif.artifacts.manifest import check_module_record, stage_info, write_stage_manifest
    from hub_msif.errors import FactorError, FactorIntegrityError

    where = parse_location(location)
    folder = pull_factors(location, stages=[stage], token=token, cache_dir=cache_dir)
    info = stage_info(read_manifest(folder, FACTORS), stage, str(location))
    if check is not None:
        check(info)
    out = Path(out)
    for entry in info["modules"]:
        relative = entry["file"]
        path = artifact_path(folder, relative)
        if not path.is_file():
            raise FactorError(f"factor file {path} listed in the manifest is missing")
        data = read_verified(path, entry["sha256"], FactorIntegrityError)
        check_module_record(path, entry, stage, data)
        atomic_write_bytes(artifact_path(out, relative), data)
    reused = None if where.is_local else {
        "repo": where.repo_id, "revision": where.revision or "main",
        "commit": folder.name if is_commit_sha(folder.name) else None,
    }
    extra = {k: v for k, v in info.items() if k not in ("modules", "reused_from")}
    write_stage_manifest(out, stage, info["modules"], {**extra, "reused_from": reused or info.get("reused_from")})
    logger.info("reused the %s stage of %s in %s", stage, location, out)
    return info
