"""Publishing a factor or index folder as one version of a Hub dataset repo (docs/design.md, "Hub artifacts").

One version is one atomic commit (``HfApi.create_commit`` with the manifest's files, the manifest
and a card) followed by a tag ``v1``, ``v2``, ... (or one the user names). The folder is verified
first, so a broken artifact is never published; a tag that exists is refused before anything is
uploaded.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from hub_msif import __version__
from hub_msif.artifacts.integrity import verify_file
from hub_msif.artifacts.manifest import FACTORS, INDEX, check_stage_pair, factor_files, index_files, read_manifest
from hub_msif.errors import HubValueError, IntegrityError, TokenRefusedError
from hub_msif.hub.cards import CARD_NAME, DEFAULT_LICENSE, factors_card, index_card
from hub_msif.hub.failures import NO_TOKEN, hub_failures
from hub_msif.hub.location import REPO_TYPE, check_repo_id
from hub_msif.models import is_commit_sha

logger = logging.getLogger(__name__)
_VERSION_TAG = re.compile(r"v(\d+)")
_TAG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Pushed(NamedTuple):
    """What a push made: the commit sha and the version tag pointing at it."""

    commit: str
    tag: str


def version_number(tag: str) -> int | None:
    """``N`` of a version tag ``vN``, else None."""
    match = _VERSION_TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


def _verify_local(folder: Path, files: dict[str, str], what: str) -> dict[str, int]:
    """Checks every file against its sha256 before a push; returns the sizes."""
    sizes = {}
    for relative, expected in files.items():
        if not (folder / relative).is_file():
            raise HubValueError(f"refusing to push {what} {folder}: {relative}, listed in the manifest, is missing")
        try:
            sizes[relative] = verify_file(folder / relative, expected)
        except IntegrityError as err:
            raise HubValueError(f"refusing to push {what} {folder}: {err}") from err
    return sizes


def _push(folder: Path, repo_id: str, manifest_name: str, files: dict[str, str], render: Callable,
          what: str, tag: str | None, private: bool, token: str | None, commit_message: str | None) -> Pushed:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import get_token

    check_repo_id(repo_id)
    if tag is not None and (not _TAG_NAME.fullmatch(tag) or is_commit_sha(tag) or tag == "main"):
        raise HubValueError(f"tag {tag!r} is not a usable version name (letters, digits, '.', '_', '-'; not 'main', "
                       "not a commit sha)")
    sizes = _verify_local(folder, files, what)  # never push a broken artifact
    sizes[manifest_name] = (folder / manifest_name).stat().st_size
    token = token or get_token()
    if not token:
        raise TokenRefusedError(f"cannot push to {repo_id}: {NO_TOKEN}")
    api = HfApi(token=token)
    with hub_failures(repo_id, None, f"cannot push to {repo_id}", token):
        api.create_repo(repo_id, repo_type=REPO_TYPE, private=True if private else None, exist_ok=True)
        refs = api.list_repo_refs(repo_id, repo_type=REPO_TYPE)
    tags = {t.name: t.target_commit for t in refs.tags}
    versions = {n: name for name in tags if (n := version_number(name)) is not None}
    if tag is not None and tag in tags:
        raise HubValueError(f"{repo_id} already has a tag {tag!r} (commit {tags[tag]}); versions are immutable: name "
                       f"another tag, or leave --tag out for the next version v{max(versions, default=0) + 1}")
    if tag is None and versions:
        latest = versions[max(versions)]
        if _same_manifest(api, repo_id, latest, manifest_name, folder / manifest_name):
            logger.info("%s is unchanged since %s@%s: not pushed again", folder, repo_id, latest)
            return Pushed(tags[latest], latest)
    tag = tag or f"v{max(versions, default=0) + 1}"
    card = render(repo_id, tag, sizes)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(folder / p)) for p in files]
    operations.append(CommitOperationAdd(path_in_repo=manifest_name, path_or_fileobj=str(folder / manifest_name)))
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=str(card).encode("utf-8")))
    with hub_failures(repo_id, None, f"cannot push to {repo_id}", token):
        info = api.create_commit(
            repo_id, operations, repo_type=REPO_TYPE,
            commit_message=commit_message or f"hub_msif {what} {tag}",
            commit_description=f"{what.capitalize()} pushed with hub_msif {__version__} from {folder.name}; "
                               f"{len(operations)} files.",
        )
    with hub_failures(repo_id, None, f"pushed commit {info.oid} to {repo_id} but could not tag it {tag}", token):
        api.create_tag(repo_id, tag=tag, revision=info.oid, repo_type=REPO_TYPE,
                       tag_message=f"hub_msif {what} {tag}")
    logger.info("pushed %s to %s@%s (commit %s)", folder, repo_id, tag, info.oid)
    return Pushed(info.oid, tag)


def _same_manifest(api, repo_id: str, revision: str, manifest_name: str, local: Path) -> bool:
    """Whether the manifest at ``revision`` equals the local one (then the push would add nothing)."""
    try:
        remote = api.hf_hub_download(repo_id, manifest_name, repo_type=REPO_TYPE, revision=revision)
        return json.loads(Path(remote).read_text()) == json.loads(local.read_text())
    except Exception:  # no manifest there, or unreadable: a new version it is
        return False


def push_factors(folder: str | Path, repo_id: str, tag: str | None = None, private: bool = False,
                 token: str | None = None, commit_message: str | None = None,
                 license: str = DEFAULT_LICENSE) -> Pushed:
    """Publishes a pair factor folder as one commit to the dataset repo ``repo_id``, then tags it.

    The folder is checked first (manifest, both stages over the same modules, every file's
    sha256); only the manifest's files are pushed (no temporary files or checkpoints), with a
    card rendered from ``model_cards/factors.md``. The repo is created when missing. ``tag``
    defaults to the next ``vN``; a tag that exists is refused before anything is uploaded.
    Pushing a folder identical to the latest version returns that version. Returns
    ``(commit sha, tag)``.
    """
    folder = Path(folder)
    manifest = read_manifest(folder, FACTORS)
    check_stage_pair(manifest)
    files = factor_files(manifest)

    def render(repo, version, sizes):
        return factors_card(manifest, repo, version, sizes, license)

    return _push(folder, repo_id, FACTORS.manifest_name, files, render, "factors", tag, private, token, commit_message)


def push_index(folder: str | Path, repo_id: str, tag: str | None = None, private: bool = False,
               token: str | None = None, commit_message: str | None = None,
               license: str = DEFAULT_LICENSE) -> Pushed:
    """Publishes an index folder like ``push_factors``; its card makes the documents loadable with
    ``datasets.load_dataset(repo_id)``. Returns ``(commit sha, tag)``."""
    folder = Path(folder)
    manifest = read_manifest(folder, INDEX)
    files = index_files(manifest)

    def render(repo, version, sizes):
        return index_card(manifest, repo, version, sizes, license)

    return _push(folder, repo_id, INDEX.manifest_name, files, render, "index", tag, private, token, commit_message)
