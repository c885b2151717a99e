"""Publishing a factor, index or gradient index folder as one version of a Hub dataset repo (docs/design.md,
"Hub artifacts").

One version is one atomic commit (``HfApi.create_commit`` with the manifest's files, the manifest
and a card, and the deletion of every other file but ``.gitattributes``, so that a version holds
exactly its manifest's files) followed by a tag ``v1``, ``v2``, ... (or one the user names). The
folder is verified first, so a broken artifact is never published; the token's right to write
and a tag that exists are checked before anything is uploaded. Ctrl-C raises ``Interrupted``,
whose message says what reached the Hub; a push interrupted between its commit and its tag,
run again, tags that commit instead of making another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from hub_msif import __version__
from hub_msif.artifacts.atomic import sha256_bytes
from hub_msif.artifacts.integrity import verify_file
from hub_msif.artifacts.manifest import (
    FACTORS,
    GRADINDEX,
    INDEX,
    KINDS,
    STAGES,
    artifact_path,
    check_module_record,
    check_stage_pair,
    factor_files,
    gradindex_files,
    index_files,
    read_manifest,
)
from hub_msif.errors import FactorError, HubValueError, IntegrityError, Interrupted, MsifValueError, TokenRefusedError
from hub_msif.hub.cards import (
    CARD_NAME,
    DEFAULT_LICENSE,
    factors_card,
    gradindex_card,
    index_card,
    public_gradindex_manifest,
    public_index_manifest,
    public_manifest,
)
from hub_msif.hub.connectivity import require_hub
from hub_msif.hub.hub_errors import NO_TOKEN, hub_failures
from hub_msif.hub.location import REPO_TYPE, check_repo_id
from hub_msif.hub.permissions import require_write_access
from hub_msif.models import is_commit_sha

if TYPE_CHECKING:
    from huggingface_hub import HfApi

logger = logging.getLogger(__name__)
_VERSION_TAG = re.compile(r"v(\d+)")
_TAG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KEPT = (".gitattributes",)  # files of the repo a push never deletes (the card is replaced, not deleted)


class _Version(NamedTuple):
    commit: str
    tag: str


class Pushed(_Version):
    """What a push made: the commit sha and the version tag pointing at it; unpacks as
    ``commit, tag = push_factors(...)``.

    ``created`` is False when the folder was already published as ``tag`` and nothing was written
    (no commit, no tag); True when this push tagged a version (after a new commit, or on the
    commit of an earlier push interrupted before its tag).
    """

    created: bool = True

    def __new__(cls, commit: str, tag: str, created: bool = True) -> Pushed:
        self = super().__new__(cls, commit, tag)
        self.created = created
        return self

    def __getnewargs__(self) -> tuple:
        return (self.commit, self.tag, self.created)

    def __repr__(self) -> str:
        return f"Pushed(commit={self.commit!r}, tag={self.tag!r}, created={self.created!r})"


def version_number(tag: str) -> int | None:
    """``N`` of a version tag ``vN``, else None."""
    match = _VERSION_TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


def _verify_local(folder: Path, files: dict[str, str], what: str) -> dict[str, int]:
    """Checks every file against its sha256 before a push (its path first: ``artifact_path``);
    returns the sizes."""
    sizes = {}
    for relative, expected in files.items():
        try:
            artifact_path(folder, relative, KINDS[what])
        except MsifValueError as err:
            raise HubValueError(f"refusing to push {what} {folder}: {err}") from err
        if not (folder / relative).is_file():
            raise HubValueError(f"refusing to push {what} {folder}: {relative}, listed in the manifest, is missing")
        try:
            sizes[relative] = verify_file(folder / relative, expected)
        except IntegrityError as err:
            raise HubValueError(f"refusing to push {what} {folder}: {err}") from err
    return sizes


@dataclass
class _Progress:
    """How far a push got, so that a Ctrl-C can say what it left on the Hub.

    ``step``: ``prepare`` (nothing sent that publishes), ``commit`` (the commit request is out),
    ``tag`` (the commit landed, the tag request is out), ``done`` (tagged).
    """

    repo_id: str
    api: HfApi | None = None
    step: str = "prepare"
    base: str | None = None  # main's head before the commit
    commit: str | None = None
    tag: str | None = None

    def settle(self) -> bool:
        """After a Ctrl-C while a request was out: asks the Hub's refs whether it landed. False when
        that cannot be told (the Hub does not answer, or a second Ctrl-C)."""
        if self.step not in ("commit", "tag"):
            return True
        if self.api is None:  # no request was sent through it
            return False
        try:
            refs = self.api.list_repo_refs(self.repo_id, repo_type=REPO_TYPE)
        except (Exception, KeyboardInterrupt):
            return False
        if self.step == "commit":
            head = next((b.target_commit for b in refs.branches if b.name == "main"), None)
            if head == self.base:
                return True  # the commit did not land
            self.commit, self.step = head, "tag"
        tags: dict[str | None, str] = {t.name: t.target_commit for t in refs.tags}  # looked up by self.tag
        if tags.get(self.tag) == self.commit:
            self.step = "done"
        return True

    def interrupted(self) -> str:
        """The one-line account of an interrupted push."""
        known = self.settle()
        repo = self.repo_id
        if self.step == "done":
            return f"interrupted after publishing {repo}@{self.tag} (commit {self.commit})"
        if self.step == "tag":
            if not known:
                return (f"interrupted after commit {self.commit} reached {repo}, while tagging it {self.tag}: run the "
                        "push again to make sure it is tagged")
            return (f"interrupted after commit {self.commit} reached {repo}, before tagging it {self.tag}: run the push "
                    "again to tag it")
        if self.step == "commit" and not known:
            return (f"interrupted while the commit to {repo} was being sent; whether it landed is unknown: run the push "
                    "again (it tags that commit if it landed, and makes it otherwise)")
        return f"interrupted before the commit: nothing was published to {repo}"


def _push(folder: Path, repo_id: str, manifest_name: str, files: dict[str, str], render: Callable,
          what: str, tag: str | None, private: bool, token: str | None, commit_message: str | None,
          manifest: bytes | None = None) -> Pushed:
    check_repo_id(repo_id)
    if tag is not None and (not _TAG_NAME.fullmatch(tag) or is_commit_sha(tag) or tag == "main"):
        raise HubValueError(f"tag {tag!r} is not a usable version name (letters, digits, '.', '_', '-'; not 'main', "
                            "not a commit sha)")
    progress = _Progress(repo_id)
    try:
        return _publish(folder, repo_id, manifest_name, files, render, what, tag, private, token, commit_message,
                        progress, manifest if manifest is not None else (folder / manifest_name).read_bytes())
    except Interrupted:
        raise
    except KeyboardInterrupt as err:
        raise Interrupted(progress.interrupted()) from err


def _publish(folder: Path, repo_id: str, manifest_name: str, files: dict[str, str], render: Callable, what: str,
             tag: str | None, private: bool, token: str | None, commit_message: str | None,
             progress: _Progress, manifest: bytes) -> Pushed:
    """The steps of ``_push``, recording in ``progress`` what has reached the Hub; ``manifest`` is
    the manifest as published (it may differ from the folder's: one stage of two, no paths)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.utils import get_token

    sizes = _verify_local(folder, files, what)  # never push a broken artifact
    sizes[manifest_name] = len(manifest)
    token = token or get_token()
    doing = f"cannot push to {repo_id}"
    if not token:
        raise TokenRefusedError(f"{doing}: {NO_TOKEN}")
    require_hub(doing)  # one line at once, rather than retries for half a minute
    api = progress.api = HfApi(token=token)
    with hub_failures(repo_id, None, doing, token):
        require_write_access(api, repo_id, doing)  # also when nothing turns out to be written
        api.create_repo(repo_id, repo_type=REPO_TYPE, private=True if private else None, exist_ok=True)
        refs = api.list_repo_refs(repo_id, repo_type=REPO_TYPE)
    tags = {t.name: t.target_commit for t in refs.tags}
    versions = {n: name for name in tags if (n := version_number(name)) is not None}
    if tag is not None and tag in tags:
        raise HubValueError(f"{repo_id} already has a tag {tag!r} (commit {tags[tag]}); versions are immutable: name "
                            f"another tag, or leave --tag out for the next version v{max(versions, default=0) + 1}")
    if tag is None and versions:
        latest = versions[max(versions)]
        if _same_manifest(api, repo_id, latest, manifest_name, manifest):
            logger.info("%s is unchanged since %s@%s: nothing written", folder, repo_id, latest)
            return Pushed(tags[latest], latest, created=False)
    tag = progress.tag = tag or f"v{max(versions, default=0) + 1}"
    card = str(render(repo_id, tag, sizes)).encode("utf-8")
    local: dict[str, Path | bytes] = {p: folder / p for p in files}
    local[manifest_name] = manifest
    local[CARD_NAME] = card
    head = progress.base = next((b.target_commit for b in refs.branches if b.name == "main"), None)
    with hub_failures(repo_id, None, doing, token):
        remote = _files_at(api, repo_id, head)
    if head is not None and _holds_exactly(remote, local, files):
        # main holds exactly this version already (a push of it was interrupted before its tag): tag that
        # commit rather than make an identical one.
        logger.info("main of %s (commit %s) already holds %s: tagging it", repo_id, head, folder)
        progress.commit = head
    else:
        additions = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=c if isinstance(c, bytes) else str(c))
                     for p, c in local.items()]
        # A version is exactly its manifest's files: whatever an earlier version had beside them goes.
        deletions = [CommitOperationDelete(path_in_repo=p) for p in sorted(remote) if p not in local and p not in _KEPT]
        with hub_failures(repo_id, None, doing, token):
            api.preupload_lfs_files(repo_id, additions, repo_type=REPO_TYPE)
            progress.step = "commit"
            info = api.create_commit(
                repo_id, [*additions, *deletions], repo_type=REPO_TYPE, parent_commit=head,
                commit_message=commit_message or f"hub_msif {what} {tag}",
                commit_description=f"{what.capitalize()} pushed with hub_msif {__version__} from {folder.name}; "
                                   f"{len(additions)} files" + (f", {len(deletions)} removed." if deletions else "."),
            )
        progress.commit = info.oid
    progress.step = "tag"
    with hub_failures(repo_id, None, f"pushed commit {progress.commit} to {repo_id} but could not tag it {tag}", token):
        api.create_tag(repo_id, tag=tag, revision=progress.commit, repo_type=REPO_TYPE,
                       tag_message=f"hub_msif {what} {tag}")
    progress.step = "done"
    logger.info("pushed %s to %s@%s (commit %s)", folder, repo_id, tag, progress.commit)
    return Pushed(progress.commit, tag)


def _files_at(api, repo_id: str, commit: str | None) -> dict:
    """``{path: RepoFile}`` of every file of ``repo_id`` at ``commit`` (none without a commit)."""
    from huggingface_hub.hf_api import RepoFile

    if commit is None:
        return {}
    entries = api.list_repo_tree(repo_id, repo_type=REPO_TYPE, revision=commit, recursive=True)
    return {e.path: e for e in entries if isinstance(e, RepoFile)}


def git_blob_id(data: bytes) -> str:
    """The git object id of a file with content ``data``: the id the Hub gives a regular file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _holds_exactly(remote: dict, local: dict[str, Path | bytes], sha256s: dict[str, str]) -> bool:
    """Whether the remote files (``_files_at``) are exactly the ``local`` ones (paths to files, or
    contents), ``.gitattributes`` aside; ``sha256s`` gives the known digests of the large files."""
    if set(remote) - set(_KEPT) != set(local):
        return False
    for path, content in local.items():
        entry = remote[path]
        size = len(content) if isinstance(content, bytes) else content.stat().st_size
        if entry.size != size:
            return False
        if entry.lfs is not None:
            digest = sha256s.get(path) or sha256_bytes(content if isinstance(content, bytes) else content.read_bytes())
            if entry.lfs.sha256 != digest:
                return False
        elif entry.blob_id != git_blob_id(content if isinstance(content, bytes) else content.read_bytes()):
            return False
    return True


def _same_manifest(api, repo_id: str, revision: str, manifest_name: str, local: bytes) -> bool:
    """Whether the manifest at ``revision`` equals the one to publish (then the push would add nothing)."""
    try:
        remote = api.hf_hub_download(repo_id, manifest_name, repo_type=REPO_TYPE, revision=revision)
        return json.loads(Path(remote).read_text()) == json.loads(local)
    except Exception:  # no manifest there, or unreadable: a new version it is
        return False
def push_factors(folder: str | Path, repo_id: str, tag: str | None = None, private: bool = False,
                 token: str | None = None, commit_message: str | None = None,
                 license: str = DEFAULT_LICENSE, model_names: dict[str, str] | None = None,
                 stages: str | list[str] | None = None) -> Pushed:
    """Publishes a factor folder's stages as one commit to the dataset repo ``repo_id``, then tags it.

    ``stages``: ``pretrained``, ``finetuned``, ``both`` or None (every stage the folder holds). One
    stage alone is an artifact of its own (a pre-trained stage serves every fine-tune of its base):
    its manifest lists that stage only. The folder is checked first (manifest, two stages over the
    same modules, every file's sha256); only the chosen stages' files are pushed (no temporary files
    or checkpoints), with a manifest holding no path of this machine (``cards.public_manifest``)
    and a card rendered from ``templates/factors.md``. The repo is created when missing. ``tag``
    defaults to the next ``vN``; a tag that exists is refused before anything is uploaded. Pushing
    what the latest version holds returns that version. Returns ``(commit sha, tag)``.
    ``model_names`` (``{stage: name}``) is what the card calls local model folders (default: the
    recorded name and its weights' short sha256; never a path).
    """
    folder = Path(folder)
    manifest = read_manifest(folder, FACTORS)
    chosen = _chosen_stages(folder, manifest, stages)
    _check_records(folder, manifest, chosen)  # paths and module records first: nothing edited by hand is published
    if len(chosen) == len(STAGES):
        check_stage_pair(manifest)
    published = public_manifest(manifest, chosen)
    factors_card(published, repo_id, "v1", {}, license, model_names)  # bad names refused before any upload
    files = factor_files(published, stages=chosen)
    data = (json.dumps(published, indent=2, sort_keys=True) + "\n").encode()

    def render(repo, version, sizes):
        return factors_card(published, repo, version, sizes, license, model_names)

    return _push(folder, repo_id, FACTORS.manifest_name, files, render, "factors", tag, private, token, commit_message,
                 manifest=data)


def _check_records(folder: Path, manifest: dict, stages: list[str]) -> None:
    """Every module file of ``stages`` lies in the folder (``artifact_path``) and records the module
    and stage its manifest entry names (read from the safetensors header, no torch): a manifest
    whose module names were edited is never published."""
    for stage in stages:
        for entry in manifest["stages"][stage]["modules"]:
            try:
                path = artifact_path(folder, entry["file"])
                if path.is_file():  # a missing one is reported with the sha256 checks
                    check_module_record(path, entry, stage)
            except FactorError as err:
                raise HubValueError(f"refusing to push factors {folder}: {err}") from err


def _chosen_stages(folder: Path, manifest: dict, stages) -> list[str]:
    present = [s for s in STAGES if s in manifest.get("stages", {})]
    if stages is None or stages == "both":
        wanted = list(STAGES) if stages == "both" else present
    else:
        wanted = [stages] if isinstance(stages, str) else list(stages)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise HubValueError(f"unknown stage {unknown[0]!r}: use pretrained, finetuned or both")
    missing = [s for s in wanted if s not in present]
    if missing or not wanted:
        raise HubValueError(f"refusing to push factor folder {folder}: it holds no {' or '.join(missing) or 'fitted'} "
                            f"stage (stages present: {', '.join(present) or 'none'})")
    return [s for s in STAGES if s in wanted]


def push_index(folder: str | Path, repo_id: str, tag: str | None = None, private: bool = False,
               token: str | None = None, commit_message: str | None = None,
               license: str = DEFAULT_LICENSE, model_name: str | None = None) -> Pushed:
    """Publishes an index folder like ``push_factors``; its card makes the documents loadable with
    ``datasets.load_dataset(repo_id)``. ``model_name`` names a local embedding model on the card.
    Returns ``(commit sha, tag)``."""
    folder = Path(folder)
    manifest = public_index_manifest(read_manifest(folder, INDEX))
    index_card(manifest, repo_id, "v1", {}, license, model_name)  # a bad name is refused before any upload
    files = index_files(manifest)
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()

    def render(repo, version, sizes):
        return index_card(manifest, repo, version, sizes, license, model_name)

    return _push(folder, repo_id, INDEX.manifest_name, files, render, "index", tag, private, token, commit_message,
                 manifest=data)


def _shard_header(path: Path) -> dict:
    """The tensors of a safetensors file (``{name: {"dtype", "shape", ...}}``), read from its
    header alone (8 bytes little-endian length, then JSON): no torch, no tensor data read."""
    with open(path, "rb") as file:
        head = file.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        header = file.read(size) if 0 < size <= 100_000_000 else b""
    try:
        parsed = json.loads(header) if len(header) == size else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        raise ValueError("not a safetensors file (bad header)")
    return {name: entry for name, entry in parsed.items() if name != "__metadata__"}


_SHARD_TENSORS = {"vectors": ("F16", 2), "norms": ("F32", 1), "rows": ("I64", 1)}


def _check_shards(folder: Path, manifest: dict, files: dict[str, str]) -> int | None:
    """The shards of a gradient index hold ``vectors`` float16 [n, dims], ``norms`` float32 [n] and
    ``rows`` int64 [n] (docs/design.md, "Gradient index"), one ``dims`` for all, and as many rows in
    all as the manifest's documents; read from the headers alone. Returns ``dims``. The sha256s are
    checked separately (``_verify_local``)."""
    refuse = f"refusing to push gradindex {folder}"
    shards = sorted(p for p in files if p.startswith("shards/"))
    if not shards:
        raise HubValueError(f"{refuse}: {GRADINDEX.manifest_name} lists no shards/*.safetensors")
    widths, rows = set(), 0
    for relative in shards:
        try:
            path = artifact_path(folder, relative, GRADINDEX)  # nothing outside the folder is opened
        except MsifValueError as err:
            raise HubValueError(f"{refuse}: {err}") from err
        if not path.is_file():
            continue  # reported by the sha256 checks
        try:
            tensors = _shard_header(path)
        except (OSError, ValueError) as err:
            raise HubValueError(f"{refuse}: {relative}: {err}") from err
        lengths = set()
        for name, (dtype, ndim) in _SHARD_TENSORS.items():
            entry = tensors.get(name)
            shape = entry.get("shape") if isinstance(entry, dict) else None
            if not isinstance(entry, dict) or not isinstance(shape, list) or len(shape) != ndim \
                    or entry.get("dtype") != dtype:
                raise HubValueError(f"{refuse}: {relative} lacks a {dtype} tensor {name!r} of {ndim} dimension(s) "
                                    f"(found {entry!r:.120})")
            lengths.add(shape[0])
        if len(lengths) != 1:
            raise HubValueError(f"{refuse}: {relative} holds vectors, norms and rows of different lengths "
                                f"{sorted(lengths)}")
        widths.add(tensors["vectors"]["shape"][1])
        rows += lengths.pop()
    if len(widths) > 1:
        raise HubValueError(f"{refuse}: its shards hold vectors of different widths {sorted(widths)}")
    dims = widths.pop() if widths else None
    recorded = (manifest.get("projection") or {}).get("dims")
    if dims is not None and isinstance(recorded, int) and recorded != dims:
        raise HubValueError(f"{refuse}: the manifest records {recorded} dims, its shards hold {dims}")
    if dims is not None and rows != manifest.get("num_documents"):
        raise HubValueError(f"{refuse}: its shards hold {rows} rows, the manifest records "
                            f"{manifest.get('num_documents')} documents")
    return dims if dims is not None else (recorded if isinstance(recorded, int) else None)


def push_gradindex(folder: str | Path, repo_id: str, tag: str | None = None, private: bool = False,
                   token: str | None = None, commit_message: str | None = None,
                   license: str = DEFAULT_LICENSE, model_name: str | None = None) -> Pushed:
    """Publishes a gradient index folder (``gradindex.json``: docs/design.md, "Gradient index") like
    ``push_index``: the folder checked first (manifest, every listed file's sha256, the shards'
    tensors and rows against the manifest), then its files, a manifest holding no path of this
    machine (``cards.public_gradindex_manifest``) and a card (``templates/gradindex.md``) in one
    commit, tagged ``vN`` (or ``tag``). ``model_name`` names a local model on the card. Returns
    ``(commit sha, tag)``."""
    folder = Path(folder)
    manifest = public_gradindex_manifest(read_manifest(folder, GRADINDEX))
    files = gradindex_files(manifest)
    dims = _check_shards(folder, manifest, files)
    gradindex_card(manifest, repo_id, "v1", {}, license, model_name, dims)  # a bad name is refused before any upload
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()

    def render(repo, version, sizes):
        return gradindex_card(manifest, repo, version, sizes, license, model_name, dims)

    return _push(folder, repo_id, GRADINDEX.manifest_name, files, render, "gradindex", tag, private, token,
                 commit_message, manifest=data)
