"""Factor and index artifacts on the Hugging Face Hub: push, pull, versions, matching (DESIGN.md section 3).

Both artifacts are **dataset** repos. One version is one atomic commit (``HfApi.create_commit``
with every file and a ``README.md`` card rendered from ``model_cards/``) followed by a tag
(``v1``, ``v2``, ... or one the user names). Everything goes through ``huggingface_hub`` and so
honours ``HF_ENDPOINT``, ``HF_TOKEN``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE``.

A location is a local folder or ``REPO[@REV]`` (branch, tag or commit sha; default ``main``); a
folder that exists wins. A pull reads the manifest at the revision, pins the commit it resolved
to, downloads only the files needed (``modules="mlp"``: MLP files only) into the Hugging Face
cache and checks each file's sha256 against the manifest, so a file altered on the server is
reported as such (and dropped from the cache) instead of loaded. After one pull the same location
resolves from the cache with ``HF_HUB_OFFLINE=1``.

Errors of ``huggingface_hub`` (missing repo, revision or file; no token; no write rights; the
Hub unreachable) become a ``HubError`` (a ``ValueError``) that names the repo and revision.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import shlex
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from . import __version__
from .models import ModelRef
from .storage import MANIFEST_NAME, STAGES, FactorError, check_stage_pair, read_manifest

logger = logging.getLogger(__name__)

REPO_TYPE = "dataset"
CARD_NAME = "README.md"
FACTOR_TAGS = ["hub-msif", "ekfac", "influence-functions"]
INDEX_TAGS = ["hub-msif", "document-index", "influence-functions", "sentence-embeddings"]
DEFAULT_LICENSE = "apache-2.0"
MODULE_CHOICES = ("all", "mlp")
_CARD_DIR_ENV = "HUB_MSIF_CARD_TEMPLATES"
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_VERSION_TAG = re.compile(r"v(\d+)")
_TAG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class HubError(ValueError):
    """A Hub artifact cannot be pushed, found or pulled; the message names the repo and revision."""


class IntegrityError(HubError):
    """A pulled file's sha256 differs from the one its manifest records."""


class Pushed(NamedTuple):
    """What a push made: the commit sha and the version tag pointing at it."""

    commit: str
    tag: str


# ---------------------------------------------------------------------------------------------
# Locations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Location:
    """A local ``folder``, or a Hub dataset ``repo_id`` at ``revision`` (None: ``main``)."""

    folder: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return self.folder is not None

    def __str__(self) -> str:
        if self.folder is not None:
            return str(self.folder)
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_location(location: str | Path) -> Location:
    """A folder (a ``Path``, an existing directory, or anything not shaped like ``ns/name[@rev]``)
    or a Hub repo with an optional revision."""
    if isinstance(location, Path):
        return Location(folder=location)
    if not isinstance(location, str) or not location.strip():
        raise HubError(f"a location must be a folder or REPO[@REV], got {location!r}")
    if Path(location).expanduser().is_dir():
        return Location(folder=Path(location).expanduser())
    if location.startswith((".", "/", "~")) or "\\" in location:
        return Location(folder=Path(location).expanduser())
    repo_id, at, revision = location.partition("@")
    if not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id or repo_id.endswith(".git"):
        if at:
            raise HubError(f"{location!r} is neither a local folder nor a Hub location REPO[@REV] "
                           f"(REPO is namespace/name, REV a branch, tag or commit sha)")
        return Location(folder=Path(location))
    if at and not revision.strip():
        raise HubError(f"{location!r}: empty revision after '@' (give a branch, tag or commit sha, or drop the '@')")
    return Location(repo_id=repo_id, revision=revision or None)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, doing: str, token=None) -> Iterator[None]:
    """Turns ``huggingface_hub`` errors raised while ``doing`` into a ``HubError``."""
    from huggingface_hub import errors

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except HubError:
        raise
    except errors.RevisionNotFoundError as err:
        raise HubError(f"{doing}: the dataset repo {repo_id} has no revision {revision!r} "
                       "(no such branch, tag or commit)") from err
    except errors.GatedRepoError as err:
        raise HubError(f"{doing}: {where} is gated; request access on the Hub first") from err
    except errors.RepositoryNotFoundError as err:
        raise HubError(f"{doing}: no dataset repo {repo_id} on {_endpoint()} (or it is private and your token "
                       "cannot see it)") from err
    except errors.OfflineModeIsEnabled as err:
        raise HubError(f"{doing}: {where} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                       "downloading it; pull it once online") from err
    except errors.LocalEntryNotFoundError as err:
        offline = "HF_HUB_OFFLINE=1 is set" if _offline() else f"the Hub at {_endpoint()} could not be reached"
        raise HubError(f"{doing}: {where} is not (completely) in the Hugging Face cache and {offline}: "
                       f"{_first_line(err)}") from err
    except errors.EntryNotFoundError as err:
        raise HubError(f"{doing}: {where} lacks a file it should have ({_first_line(err)})") from err
    except errors.LocalTokenNotFoundError as err:
        raise HubError(f"{doing}: {_NO_TOKEN}") from err
    except errors.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise HubError(f"{doing}: the Hub at {_endpoint()} refused the token (401: invalid or expired); "
                           "set HF_TOKEN or run `hf auth login`") from err
        if status == 403:
            raise HubError(f"{doing}: {_who(token)} may not write to {repo_id} (403 Forbidden); use a token with "
                           f"write access to the namespace {repo_id.split('/')[0]}, or push to your own "
                           "namespace") from err
        raise HubError(f"{doing}: the Hub answered {status}: {_first_line(err)}") from err
    except OSError as err:  # connection refused, reset or timed out; a download cut short
        raise HubError(f"{doing}: the Hub at {_endpoint()} could not be reached or broke off "
                       f"({type(err).__name__}: {_first_line(err)}); nothing was changed, try again") from err
    except Exception as err:
        import httpx2

        if isinstance(err, httpx2.HTTPError):
            raise HubError(f"{doing}: the Hub at {_endpoint()} could not be reached or broke off "
                           f"({type(err).__name__}: {_first_line(err)}); nothing was changed, try again") from err
        raise


_NO_TOKEN = ("pushing needs a Hugging Face token with write access: set HF_TOKEN, run `hf auth login`, "
             "or pass token= (--token)")


def _who(token) -> str:
    """``the token of user NAME`` when the Hub says whose token it is."""
    try:
        from huggingface_hub import HfApi

        return f"the token of user {HfApi().whoami(token=token)['name']}"
    except Exception:
        return "your token"


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id) or "--" in repo_id or ".." in repo_id \
            or repo_id.endswith(".git"):
        raise HubError(f"repo id {repo_id!r} is not of the form namespace/name (letters, digits, '-', '_', '.')")


def _check_relative(path: str, manifest: str) -> str:
    """A file path from a manifest, refused when it could leave the artifact's folder."""
    pure = PurePosixPath(path)
    if not path or pure.is_absolute() or ".." in pure.parts or "\\" in path or path.startswith("."):
        raise HubError(f"{manifest} lists an unsafe file path {path!r}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# What an artifact holds
# ---------------------------------------------------------------------------------------------


def factor_files(manifest: dict, modules: str = "all", stages=None) -> dict[str, str]:
    """``{relative path: sha256}`` of the module files of ``stages`` (default both) and ``modules``."""
    if modules not in MODULE_CHOICES:
        raise ValueError(f"modules must be one of {', '.join(MODULE_CHOICES)}, not {modules!r}")
    stages = list(STAGES if stages is None else ([stages] if isinstance(stages, str) else stages))
    present = manifest.get("stages", {})
    files = {}
    for stage in stages:
        if stage not in present:
            raise FactorError(f"the factors have no {stage!r} stage (stages present: {', '.join(present) or 'none'})")
        for entry in present[stage]["modules"]:
            if modules == "all" or entry["role"] == "mlp":
                files[_check_relative(entry["file"], MANIFEST_NAME)] = entry["sha256"]
    return files


def index_files(manifest: dict) -> dict[str, str]:
    """``{relative path: sha256}`` of an index's data files."""
    from .retrieval import DOCUMENTS_NAME, EMBEDDINGS_NAME, RetrievalError
    from .retrieval import MANIFEST_NAME as INDEX_MANIFEST

    files = manifest.get("files") or {}
    out = {}
    for name in (DOCUMENTS_NAME, EMBEDDINGS_NAME):
        if not isinstance(files.get(name), dict) or "sha256" not in files[name]:
            raise RetrievalError(f"{INDEX_MANIFEST} lists no sha256 for {name}")
        out[_check_relative(name, INDEX_MANIFEST)] = files[name]["sha256"]
    return out


def _verify_local(folder: Path, files: dict[str, str], what: str) -> dict[str, int]:
    """Checks every file against its sha256 before a push; returns the sizes."""
    sizes = {}
    for relative, expected in files.items():
        path = folder / relative
        if not path.is_file():
            raise HubError(f"refusing to push {what} {folder}: {relative}, listed in the manifest, is missing")
        digest = file_sha256(path)
        if digest != expected:
            raise HubError(f"refusing to push {what} {folder}: {relative} is corrupted or was altered (sha256 "
                           f"{digest} does not match the manifest's {expected})")
        sizes[relative] = path.stat().st_size
    return sizes


# ---------------------------------------------------------------------------------------------
# Cards
# ---------------------------------------------------------------------------------------------


def card_template(kind: str) -> Path:
    """``model_cards/<kind>.md`` (``factors`` or ``index``); ``$HUB_MSIF_CARD_TEMPLATES`` overrides the folder."""
    folder = Path(os.environ.get(_CARD_DIR_ENV) or Path(__file__).resolve().parent.parent / "model_cards")
    path = folder / f"{kind}.md"
    if not path.is_file():
        raise HubError(f"card template {path} is missing (set {_CARD_DIR_ENV} to the model_cards folder)")
    return path


def _size_text(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _data_text(data: dict) -> str:
    source = data.get("data")
    text = ", ".join(f"`{d}`" for d in source) if isinstance(source, list) else f"`{source}`"
    extras = [f"split {data['split']}"] if data.get("split") and not _looks_local(source) else []
    if data.get("revision"):
        extras.append(f"revision `{data['revision']}`")
    return text + (f" ({', '.join(extras)})" if extras else "")


def _looks_local(source) -> bool:
    items = source if isinstance(source, list) else [source]
    return any(isinstance(s, str) and (s.startswith(("/", ".")) or Path(s).suffix) for s in items)


def fit_command(stage: str, info: dict, dtype: str = "float32") -> str:
    """The ``hub-msif fit`` command line that reproduces one stage's fit (as recorded)."""
    model, data, fit = info.get("model", {}), info.get("data", {}), info.get("fit", {})
    q = shlex.quote
    parts = ["hub-msif fit", f"--model {q(str(model.get('id')))}"]
    if _COMMIT.fullmatch(str(model.get("revision", ""))):
        parts.append(f"--revision {model['revision']}")
    parts.append(f"--stage {stage}")
    source = data.get("data")
    parts.append("--data " + " ".join(q(str(s)) for s in (source if isinstance(source, list) else [source])))
    if data.get("revision"):
        parts.append(f"--data-revision {q(str(data['revision']))}")
    if data.get("split") and data["split"] != "train":
        parts.append(f"--split {q(data['split'])}")
    for key in ("text_column", "prompt_column", "response_column"):
        if data.get(key):
            parts.append(f"--{key.replace('_', '-')} {q(data[key])}")
    if data.get("prompt_column") and data.get("template"):
        parts.append(f"--template {q(data['template'])}")
    for key in ("max_length", "max_sequences"):
        if data.get(key) is not None:
            parts.append(f"--{key.replace('_', '-')} {data[key]}")
    if fit.get("batch_size"):
        parts.append(f"--batch-size {fit['batch_size']}")
    if fit.get("modules") in MODULE_CHOICES and fit["modules"] != "all":
        parts.append(f"--modules {fit['modules']}")
    if fit.get("split_heads") is False:
        parts.append("--no-split-heads")
    if fit.get("label_mode") and fit["label_mode"] != "sampled":
        parts.append(f"--labels {fit['label_mode']}")
    if fit.get("seed") is not None:
        parts.append(f"--seed {fit['seed']}")
    if dtype != "float32":
        parts.append(f"--dtype {dtype}")
    parts.append("--out factors")
    command = " ".join(parts)
    if (fit.get("num_processes") or 1) > 1:
        command = command.replace("hub-msif fit", f"accelerate launch --num_processes {fit['num_processes']} "
                                  "-m hub_msif.cli fit", 1)
    return command


def factors_card(manifest: dict, repo_id: str, tag: str, sizes: dict[str, int], license: str = DEFAULT_LICENSE):
    """The ``DatasetCard`` of a factor artifact: YAML metadata plus the body of ``model_cards/factors.md``."""
    from huggingface_hub import DatasetCard, DatasetCardData

    stages = []
    for name in STAGES:
        info = manifest["stages"][name]
        fit, data = info.get("fit", {}), info.get("data", {})
        dtype = info["modules"][0].get("dtype", "float32") if info["modules"] else "float32"
        stages.append({
            "name": name, "model": {"id": info["model"]["id"], "revision": info["model"]["revision"]},
            "data": {k: data.get(k) for k in ("data", "split", "revision", "text_column", "prompt_column",
                                              "response_column", "template", "max_length", "max_sequences",
                                              "fingerprint")},
            "num_sequences": fit.get("num_sequences"), "num_tokens": fit.get("num_tokens"),
            "seed": fit.get("seed"), "label_mode": fit.get("label_mode"), "num_processes": fit.get("num_processes"),
            "dtype": dtype, "data_text": _data_text(data), "command": fit_command(name, info, dtype),
        })
    modules = [{"name": m["name"], "role": m["role"], "blocks": len(m.get("blocks") or []) or 1,
                "d_out": m["d_out"], "d_in": m["d_in"]} for m in manifest["stages"]["pretrained"]["modules"]]
    num_mlp = sum(m["role"] == "mlp" for m in modules)
    size = sum(sizes.values())
    meta = {
        "artifact": "factors",
        "format_version": manifest.get("format_version"),
        "library_version": manifest.get("library_version") or __version__,
        "pushed_with": __version__,
        **{s["name"]: {k: s[k] for k in ("model", "data", "num_sequences", "num_tokens", "seed", "label_mode",
                                         "num_processes", "dtype")} for s in stages},
        "modules": [{k: m[k] for k in ("name", "role", "blocks", "d_out", "d_in")} for m in modules],
        "roles": {"mlp": num_mlp, "attention": len(modules) - num_mlp},
        "size_bytes": size,
        "num_files": len(sizes),
    }
    card_data = DatasetCardData(
        license=license,
        pretty_name=f"hub_msif EK-FAC factors for {manifest['stages']['finetuned']['model']['id']}",
        tags=list(FACTOR_TAGS),
        hub_msif=meta,
    )
    return DatasetCard.from_template(
        card_data, template_path=str(card_template("factors")), repo_id=repo_id, tag=tag,
        library_version=meta["library_version"], stages=stages, pretrained=stages[0], finetuned=stages[1],
        modules=modules, num_modules=len(modules), num_mlp=num_mlp, num_attn=len(modules) - num_mlp,
        num_files=len(sizes), size_text=_size_text(size),
    )


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")):
        if n < limit:
            return name
    return "n>1B"


def index_card(manifest: dict, repo_id: str, tag: str, sizes: dict[str, int], license: str = DEFAULT_LICENSE):
    """The ``DatasetCard`` of an index artifact; its ``configs`` make ``load_dataset(repo_id)`` read the documents."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from .retrieval import DOCUMENTS_NAME

    corpus = dict(manifest.get("corpus") or {})
    source = corpus.get("data")
    corpus_text = (", ".join(map(str, source)) if isinstance(source, list) else str(source)) if source else "documents"
    size = sum(sizes.values())
    meta = {
        "artifact": "index",
        "format_version": manifest.get("format_version"),
        "library_version": manifest.get("library_version") or __version__,
        "pushed_with": __version__,
        "embedding_model": manifest.get("embedding_model"),
        "dimension": manifest.get("dimension"),
        "metric": manifest.get("metric"),
        "normalised": manifest.get("normalised"),
        "index_type": manifest.get("index_type"),
        "num_documents": manifest.get("num_documents"),
        "corpus": corpus,
        "size_bytes": size,
    }
    card_data = DatasetCardData(
        license=license,
        pretty_name=f"hub_msif document index of {corpus_text}",
        tags=list(INDEX_TAGS),
        task_categories=["text-retrieval"],
        size_categories=[_size_category(int(manifest.get("num_documents") or 0))],
        configs=[{"config_name": "default", "data_files": [{"split": "train", "path": DOCUMENTS_NAME}]}],
        hub_msif=meta,
    )
    return DatasetCard.from_template(
        card_data, template_path=str(card_template("index")), repo_id=repo_id, tag=tag,
        library_version=meta["library_version"], embedding_model=meta["embedding_model"] or {},
        dimension=meta["dimension"], metric=meta["metric"], index_type=meta["index_type"],
        num_documents=meta["num_documents"], corpus_text=corpus_text,
        corpus_revision=corpus.get("revision") or "not recorded (local files or the default branch)",
        documents_sha256=corpus.get("documents_sha256", ""), size_text=_size_text(size),
    )


# ---------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------


def _version_number(tag: str) -> int | None:
    match = _VERSION_TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


def _push(folder: Path, repo_id: str, manifest_name: str, files: dict[str, str], render: Callable,
          what: str, tag: str | None, private: bool, token: str | None, commit_message: str | None) -> Pushed:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.utils import get_token

    _check_repo_id(repo_id)
    if tag is not None and (not _TAG_NAME.fullmatch(tag) or _COMMIT.fullmatch(tag) or tag == "main"):
        raise HubError(f"tag {tag!r} is not a usable version name (letters, digits, '.', '_', '-'; not 'main', "
                       "not a commit sha)")
    sizes = _verify_local(folder, files, what)  # never push a broken artifact
    sizes[manifest_name] = (folder / manifest_name).stat().st_size
    token = token or get_token()
    if not token:
        raise HubError(f"cannot push to {repo_id}: {_NO_TOKEN}")
    api = HfApi(token=token)
    with _hub_errors(repo_id, None, f"cannot push to {repo_id}", token):
        api.create_repo(repo_id, repo_type=REPO_TYPE, private=True if private else None, exist_ok=True)
        refs = api.list_repo_refs(repo_id, repo_type=REPO_TYPE)
    tags = {t.name: t.target_commit for t in refs.tags}
    versions = {n: name for name in tags if (n := _version_number(name)) is not None}
    if tag is not None and tag in tags:
        raise HubError(f"{repo_id} already has a tag {tag!r} (commit {tags[tag]}); versions are immutable: name "
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
    with _hub_errors(repo_id, None, f"cannot push to {repo_id}", token):
        info = api.create_commit(
            repo_id, operations, repo_type=REPO_TYPE,
            commit_message=commit_message or f"hub_msif {what} {tag}",
            commit_description=f"{what.capitalize()} pushed with hub_msif {__version__} from {folder.name}; "
                               f"{len(operations)} files.",
        )
    with _hub_errors(repo_id, None, f"pushed commit {info.oid} to {repo_id} but could not tag it {tag}", token):
        api.create_tag(repo_id, tag=tag, revision=info.oid, repo_type=REPO_TYPE,
                       tag_message=f"hub_msif {what} {tag}")
    logger.info("pushed %s to %s@%s (commit %s)", folder, repo_id, tag, info.oid)
    return Pushed(info.oid, tag)


def _same_manifest(api, repo_id: str, revision: str, manifest_name: str, local: Path) -> bool:
    """Whether the manifest at ``revision`` equals the local one (then the push would add nothing)."""
    try:
        remote = api.hf_hub_download(repo_id, manifest_name, repo_type=REPO_TYPE, revision=revision)
        return json.loads(Path(remote).read_text()) == json.loads(local.read_text())
    except Exception:  # no manifest there, unreadable: a new version it is
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
    manifest = read_manifest(folder)
    check_stage_pair(manifest)
    files = factor_files(manifest)

    def render(repo, version, sizes):
        return factors_card(manifest, repo, version, sizes, license)

    return _push(folder, repo_id, MANIFEST_NAME, files, render, "factors", tag, private, token, commit_message)


def push_index(folder: str | Path, repo_id: str, tag: str | None = None, private: bool = False,
               token: str | None = None, commit_message: str | None = None,
               license: str = DEFAULT_LICENSE) -> Pushed:
    """Publishes an index folder like ``push_factors``; its card makes the documents loadable with
    ``datasets.load_dataset(repo_id)``. Returns ``(commit sha, tag)``."""
    from .retrieval import MANIFEST_NAME as INDEX_MANIFEST
    from .retrieval import read_index_manifest

    folder = Path(folder)
    manifest = read_index_manifest(folder)
    files = index_files(manifest)

    def render(repo, version, sizes):
        return index_card(manifest, repo, version, sizes, license)

    return _push(folder, repo_id, INDEX_MANIFEST, files, render, "index", tag, private, token, commit_message)


# ---------------------------------------------------------------------------------------------
# Pull
# ---------------------------------------------------------------------------------------------


def _pull(location: Location, manifest_name: str, select: Callable[[Path], dict[str, str]], what: str,
          token, cache_dir) -> Path:
    """Downloads the manifest at the revision, then exactly the files ``select`` names, at the
    commit the manifest came from; checks every file's sha256."""
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id, revision = location.repo_id, location.revision or "main"
    doing = f"cannot pull {what} {repo_id}@{revision}"
    with _hub_errors(repo_id, revision, doing, token):
        manifest_path = Path(hf_hub_download(repo_id, manifest_name, repo_type=REPO_TYPE, revision=revision,
                                             token=token, cache_dir=cache_dir))
    folder = manifest_path.parent
    commit = folder.name if _COMMIT.fullmatch(folder.name) else revision
    try:
        files = select(folder)
    except ValueError as err:
        raise type(err)(f"{repo_id}@{revision}: {err}") from err
    patterns = [glob.escape(p) for p in [manifest_name, CARD_NAME, *files]]
    with _hub_errors(repo_id, revision, doing, token):
        folder = Path(snapshot_download(repo_id, repo_type=REPO_TYPE, revision=commit, allow_patterns=patterns,
                                        token=token, cache_dir=cache_dir))
    for relative, expected in files.items():
        path = folder / relative
        if not path.is_file():
            raise HubError(f"{doing}: {relative} was not downloaded (the Hub could not be reached or the repo lacks it)")
        digest = file_sha256(path)
        if digest != expected:
            _evict(path)
            raise IntegrityError(
                f"{repo_id}@{revision} (commit {commit}): {relative} is corrupted or was altered on the Hub: its "
                f"sha256 {digest} does not match the manifest's {expected}; the bad copy was removed from the cache"
            )
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
        raise ValueError(f"modules must be one of {', '.join(MODULE_CHOICES)}, not {modules!r}")
    where = parse_location(location)
    if where.is_local:
        return where.folder

    def select(folder: Path) -> dict[str, str]:
        return factor_files(read_manifest(folder), modules, stages)

    return _pull(where, MANIFEST_NAME, select, "factors", token, cache_dir)


def pull_index(location: str | Path, token: str | None = None, cache_dir: str | Path | None = None) -> Path:
    """The local folder of the index at ``location`` (a folder, or ``REPO[@REV]`` pulled into the
    Hugging Face cache, every file sha256-checked)."""
    from .retrieval import MANIFEST_NAME as INDEX_MANIFEST
    from .retrieval import read_index_manifest

    where = parse_location(location)
    if where.is_local:
        return where.folder
    return _pull(where, INDEX_MANIFEST, lambda folder: index_files(read_index_manifest(folder)), "index", token,
                 cache_dir)


resolve_factors = pull_factors
resolve_index = pull_index


# ---------------------------------------------------------------------------------------------
# Matching
# ---------------------------------------------------------------------------------------------


def model_ref(model: str | Path | ModelRef, token: str | None = None) -> ModelRef:
    """The ``ModelRef`` of a model given as ``ModelRef``, local folder, ``ID@REV`` or Hub ``ID``
    (resolved to the current commit sha of its ``main``)."""
    if isinstance(model, ModelRef):
        return model
    from .models import folder_revision

    path = Path(model)
    if path.is_dir():
        return ModelRef(str(path.resolve()), folder_revision(path))
    model = str(model)
    model_id, _, revision = model.partition("@")
    if revision and _COMMIT.fullmatch(revision):
        return ModelRef(model_id, revision)
    from huggingface_hub import HfApi, errors

    try:
        info = HfApi(token=token).model_info(model_id, revision=revision or None)
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as err:
        raise HubError(f"model {model!r} is neither a local folder nor a model on {_endpoint()}") from err
    except Exception as err:
        raise HubError(f"cannot resolve the revision of model {model!r}: {_first_line(err)}") from err
    return ModelRef(model_id, info.sha)


def same_model(recorded: dict, ref: ModelRef) -> bool:
    """Whether a manifest's model entry is the model ``ref``: the same revision (a commit sha, or a
    sha256 over the weights, which identifies the weights wherever the folder lies), and for Hub
    commits the same repo id."""
    revision = recorded.get("revision")
    if revision != ref.revision:
        return False
    return str(revision).startswith("sha256:") or recorded.get("id") == ref.id


def find_factors(pretrained: str | Path | ModelRef, finetuned: str | Path | ModelRef, token: str | None = None,
                 author: str | None = None) -> str:
    """``REPO@TAG`` of the newest published factors for this model pair.

    Candidates are the dataset repos tagged ``hub-msif`` and ``ekfac`` (of ``author``, when
    given); in each, versions ``vN`` are read newest first, and the first whose manifest records
    both models (same revisions) is the repo's match. Among repos, the most recently modified wins.
    """
    from huggingface_hub import HfApi

    refs = {"pretrained": model_ref(pretrained, token), "finetuned": model_ref(finetuned, token)}
    api = HfApi(token=token)
    with _hub_errors("(search)", None, "cannot search the Hub for factors", token):
        candidates = list(api.list_datasets(filter=FACTOR_TAGS[:2], author=author))
    matches = []
    for dataset in candidates:
        repo_id = dataset.id
        try:
            tags = api.list_repo_refs(repo_id, repo_type=REPO_TYPE).tags
        except Exception as err:
            logger.info("skipping %s: %s", repo_id, _first_line(err))
            continue
        versions = sorted(((n, t) for t in tags if (n := _version_number(t.name)) is not None), reverse=True,
                          key=lambda item: item[0])
        for _, tag in versions:
            try:
                path = api.hf_hub_download(repo_id, MANIFEST_NAME, repo_type=REPO_TYPE, revision=tag.target_commit)
                manifest = json.loads(Path(path).read_text())
                stages = manifest["stages"]
                if all(same_model(stages[s]["model"], refs[s]) for s in STAGES):
                    matches.append((getattr(dataset, "last_modified", None), repo_id, tag.name))
                    break
            except Exception as err:
                logger.info("skipping %s@%s: %s", repo_id, tag.name, _first_line(err))
    if not matches:
        described = "; ".join(f"{s} {refs[s].id} at {refs[s].revision}" for s in STAGES)
        raise HubError(f"no published factors match {described} (searched {len(candidates)} dataset repo(s) "
                       f"tagged {' and '.join(FACTOR_TAGS[:2])} on {_endpoint()})")
    matches.sort(key=lambda m: (m[0] is not None, m[0] or 0), reverse=True)
    _, repo_id, tag = matches[0]
    return f"{repo_id}@{tag}"
