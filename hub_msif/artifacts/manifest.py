"""The manifests of the two artifacts, read in one place (docs/design.md, "Artifact formats").

A factor folder's manifest is ``msif.json`` (both stages: models, data, modules with file and
sha256); an index folder's is ``index.json`` (embedding model, corpus, file sha256s). Both are
written last, so a folder without one is unfinished. This module only parses JSON: no torch, so
the Hub client and server can use it cheaply.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from hub_msif.errors import (
    FactorError,
    FactorIntegrityError,
    FactorsNotFoundError,
    IndexIntegrityError,
    IndexNotFoundError,
    IntegrityError,
    MsifValueError,
    RetrievalError,
)

STAGES = ("pretrained", "finetuned")
MODULE_CHOICES = ("all", "mlp")
DOCUMENTS_NAME = "documents.parquet"
EMBEDDINGS_NAME = "embeddings.safetensors"


@dataclass(frozen=True)
class ArtifactKind:
    """What distinguishes the two artifacts: file names, format tag and the errors they raise."""

    name: str  # "factors" or "index"
    manifest_name: str
    format_name: str
    format_version: int
    error: type[MsifValueError]
    not_found: type[MsifValueError]
    integrity_error: type[IntegrityError]


FACTORS = ArtifactKind("factors", "msif.json", "hub_msif.factors", 1, FactorError, FactorsNotFoundError,
                       FactorIntegrityError)
INDEX = ArtifactKind("index", "index.json", "hub_msif.index", 1, RetrievalError, IndexNotFoundError,
                     IndexIntegrityError)
# The gradient index (docs/design.md, "Gradient index"): documents plus per-process shards of vectors.
GRADINDEX = ArtifactKind("gradindex", "gradindex.json", "hub_msif.gradindex", 1, RetrievalError, IndexNotFoundError,
                         IndexIntegrityError)
KINDS = {kind.name: kind for kind in (FACTORS, INDEX, GRADINDEX)}
_LABELS = {"factors": "factor", "index": "index", "gradindex": "gradient index"}


def read_manifest(folder: str | Path, kind: ArtifactKind = FACTORS) -> dict:
    """The parsed manifest of a ``kind`` folder, or the kind's error saying what is wrong."""
    folder = Path(folder)
    path = folder / kind.manifest_name
    label = _LABELS[kind.name]
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise kind.not_found(f"{label} folder {folder} {what}")
    if not path.is_file():
        raise kind.not_found(f"{folder} has no manifest {kind.manifest_name}: not a hub_msif {label} folder, or "
                             f"its {'fit' if kind is FACTORS else 'build'} did not finish")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise kind.error(f"manifest {path} is not valid JSON: {err}") from err
    found = manifest.get("format") if isinstance(manifest, dict) else None
    if found != kind.format_name:
        raise kind.error(f"{path} is not a hub_msif {label} manifest (format={found!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > kind.format_version:
        raise kind.error(f"{path} has format version {version!r}; this hub_msif reads up to "
                         f"{kind.format_version}: upgrade hub_msif")
    if kind is FACTORS:
        _check_module_lists(manifest, path)
    return manifest


def _check_module_lists(manifest: dict, path: Path) -> None:
    """Each stage's ``modules`` is a list of entries with a string ``name`` and ``file``, no name or
    file listed twice (a repeated name would silently take the last entry's factors)."""
    stages = manifest.get("stages", {})
    if not isinstance(stages, dict):
        raise FactorError(f"{path}: 'stages' must be an object, not {type(stages).__name__}")
    for stage, info in stages.items():
        modules = info.get("modules") if isinstance(info, dict) else None
        if not isinstance(modules, list):
            raise FactorError(f"{path}: stage {stage!r} has no list of modules")
        names, files = set(), set()
        for entry in modules:
            if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("name", "file")):
                raise FactorError(f"{path}: stage {stage!r} lists a module without a name and a file: {entry!r:.200}")
            if entry["name"] in names:
                raise FactorError(f"{path}: stage {stage!r} lists module {entry['name']!r} twice")
            if entry["file"] in files:
                raise FactorError(f"{path}: stage {stage!r} lists file {entry['file']!r} for two modules "
                                  f"(the second: {entry['name']!r})")
            names.add(entry["name"])
            files.add(entry["file"])


def safe_relative(path: str, manifest: str, error: type[MsifValueError] = MsifValueError) -> str:
    """A file path from a manifest, refused when it could leave the artifact's folder."""
    pure = PurePosixPath(path) if isinstance(path, str) else None
    if not path or pure is None or pure.is_absolute() or ".." in pure.parts or "\\" in path or path.startswith("."):
        raise error(f"{manifest} lists an unsafe file path {path!r}")
    return path


def artifact_path(folder: str | Path, relative: str, kind: ArtifactKind = FACTORS,
                  error: type[MsifValueError] | None = None) -> Path:
    """The file ``folder/relative`` that a manifest lists, refused (``kind.error``, or ``error``)
    before anything opens or hashes it when it could lie outside the folder: an absolute, ``..`` or
    dot-prefixed path (``safe_relative``), or a path through a symbolic link that resolves outside.

    The one safe-path check of every reader (factor and index loads, push, pull, fit resume, stage
    reuse). A Hugging Face cache snapshot (``<repo>/snapshots/<commit>``) links its files to the
    repo's ``blobs/``: a link may resolve there too.
    """
    error = error or kind.error
    folder = Path(folder)
    where = folder / kind.manifest_name
    safe_relative(relative, str(where), error)
    root = folder.resolve()
    allowed = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        allowed.append(root.parent.parent / "blobs")
    path = folder / relative
    if not any(path.resolve().is_relative_to(place) for place in allowed):
        raise error(f"{where} lists {relative!r}, which is a symbolic link (or lies under one) to a file outside "
                    f"the folder: refused")
    return path


def safetensors_metadata(path: str | Path | None = None, data: bytes | None = None) -> dict:
    """The ``__metadata__`` of a safetensors file (its header: 8 bytes little-endian length, then
    JSON), from ``data`` or read from ``path`` without reading the tensors; ``{}`` when it has
    none. Raises ``ValueError`` when the header is not a safetensors header. No torch."""
    if data is None:
        if path is None:
            raise TypeError("safetensors_metadata needs a path or the data")
        with open(path, "rb") as file:
            head = file.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < size <= 100_000_000:
                raise ValueError("not a safetensors file (bad header length)")
            header = file.read(size)
    else:
        size = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else -1
        if not 0 < size <= len(data) - 8:
            raise ValueError("not a safetensors file (bad header length)")
        header = data[8:8 + size]
    try:
        parsed = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"not a safetensors file (header: {err})") from None
    metadata = parsed.get("__metadata__") if isinstance(parsed, dict) else None
    if len(header) != size or not isinstance(parsed, dict):
        raise ValueError("not a safetensors file (header cut short or not an object)")
    return metadata if isinstance(metadata, dict) else {}


def check_module_record(path: str | Path, entry: dict, stage: str, data: bytes | None = None) -> None:
    """Raises ``FactorError`` unless the factor file at ``path`` (or its bytes ``data``) records the
    module and stage of its manifest ``entry``: ``save_module_file`` writes ``{"module", "stage"}``
    into the file's ``hub_msif`` metadata, so a manifest whose names were swapped or edited (its
    files and sha256s untouched) never pairs one module's factors with another module."""
    try:
        metadata = safetensors_metadata(path, data)
    except (OSError, ValueError) as err:
        raise FactorError(f"factor file {path} of module {entry.get('name')!r}: {err}") from None
    try:
        record = json.loads(metadata["hub_msif"])
    except (KeyError, TypeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict):
        raise FactorError(f"factor file {path} records no module and stage (no 'hub_msif' metadata): not a "
                          f"hub_msif factor file, or altered")
    found = (record.get("module"), record.get("stage"))
    if found != (entry.get("name"), stage):
        raise FactorError(f"the manifest lists {path} as the {stage} factors of module {entry.get('name')!r}, but "
                          f"the file holds the {found[1]} factors of module {found[0]!r}: the manifest was edited; "
                          "refit or restore it")


def write_stage_manifest(folder: str | Path, stage: str, entries: list[dict], info: dict) -> dict:
    """Records one stage's module ``entries`` (written before) in the factor manifest, written
    atomically; other stages already there are kept."""
    from hub_msif import __version__
    from hub_msif.artifacts.atomic import atomic_write_json

    folder = Path(folder)
    manifest_path = folder / FACTORS.manifest_name
    manifest: dict[str, Any] = read_manifest(folder) if manifest_path.is_file() else {
        "format": FACTORS.format_name, "format_version": FACTORS.format_version, "stages": {},
    }
    manifest["library_version"] = __version__
    manifest["stages"][stage] = {**info, "modules": entries}
    atomic_write_json(manifest_path, manifest)
    return manifest


def select_modules(entries: list[dict], modules) -> list[dict]:
    """The manifest entries of ``modules``: ``all``, ``mlp`` or a list of module names."""
    if modules is None or modules == "all":
        return entries
    if modules == "mlp":
        return [e for e in entries if e["role"] == "mlp"]
    if isinstance(modules, str):
        raise FactorError(f"modules must be one of {', '.join(MODULE_CHOICES)} or a list of names, not {modules!r}")
    wanted = list(modules)
    by_name = {e["name"]: e for e in entries}
    missing = [name for name in wanted if name not in by_name]
    if missing:
        raise FactorError(f"the factors do not cover module(s) {', '.join(missing)}")
    return [by_name[name] for name in wanted]


def factor_files(manifest: dict, modules: str = "all", stages=None) -> dict[str, str]:
    """``{relative path: sha256}`` of the module files of ``stages`` (default both) and ``modules``."""
    if modules not in MODULE_CHOICES:
        raise MsifValueError(f"modules must be one of {', '.join(MODULE_CHOICES)}, not {modules!r}")
    stages = list(STAGES if stages is None else ([stages] if isinstance(stages, str) else stages))
    present = manifest.get("stages", {})
    files = {}
    for stage in stages:
        if stage not in present:
            raise FactorError(f"the factors have no {stage!r} stage (stages present: {', '.join(present) or 'none'})")
        for entry in select_modules(present[stage]["modules"], modules):
            files[safe_relative(entry["file"], FACTORS.manifest_name)] = entry["sha256"]
    return files


def index_files(manifest: dict) -> dict[str, str]:
    """``{relative path: sha256}`` of an index's data files."""
    files = manifest.get("files") or {}
    out = {}
    for name in (DOCUMENTS_NAME, EMBEDDINGS_NAME):
        if not isinstance(files.get(name), dict) or "sha256" not in files[name]:
            raise RetrievalError(f"{INDEX.manifest_name} lists no sha256 for {name}")
        out[safe_relative(name, INDEX.manifest_name)] = files[name]["sha256"]
    return out


def gradindex_files(manifest: dict) -> dict[str, str]:
    """``{relative path: sha256}`` of a gradient index's data files: ``documents.parquet`` and
    every shard its manifest lists (``shards/...``)."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(files.get(DOCUMENTS_NAME), dict):
        raise RetrievalError(f"{GRADINDEX.manifest_name} lists no {DOCUMENTS_NAME}")
    out = {}
    for name, entry in files.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise RetrievalError(f"{GRADINDEX.manifest_name} lists no sha256 for {name!r}")
        if name != DOCUMENTS_NAME and not (isinstance(name, str) and name.startswith("shards/")):
            raise RetrievalError(f"{GRADINDEX.manifest_name} lists an unexpected file {name!r}")
        out[safe_relative(name, GRADINDEX.manifest_name, RetrievalError)] = entry["sha256"]
    return out


def stage_sha256(info: dict) -> str:
    """sha256 of one stage's manifest entry (canonical JSON): names the exact factors an artifact
    derived from them (a gradient index) was made with."""
    from hub_msif.artifacts.atomic import sha256_bytes

    return sha256_bytes(json.dumps(info, sort_keys=True, separators=(",", ":")).encode())


def stage_differences(modules_a: list[dict], modules_b: list[dict]) -> list[str]:
    """How two stages' module lists differ in names and shapes (empty when they match)."""
    a = {m["name"]: (m["d_out"], m["d_in"]) for m in modules_a}
    b = {m["name"]: (m["d_out"], m["d_in"]) for m in modules_b}
    problems = [f"{n} only in the first" for n in a if n not in b] + [f"{n} only in the second" for n in b if n not in a]
    problems += [f"{n}: {a[n][0]}x{a[n][1]} vs {b[n][0]}x{b[n][1]}" for n in a if n in b and a[n] != b[n]]
    return problems


def stage_info(manifest: dict, stage: str, location: str) -> dict:
    """The manifest entry of ``stage`` in the factors at ``location``, or a one-line error."""
    stages = manifest.get("stages", {})
    if stage not in stages:
        raise FactorError(f"the factors at {location} lack the {stage} stage (stages present: "
                          f"{', '.join(stages) or 'none'}): fit it with `hub-msif fit --stage {stage}`, or give "
                          f"published ones with --factors-{stage} REPO@REV")
    return stages[stage]


def check_stage_pair(manifest: dict, modules: str = "all") -> None:
    """Raises ``FactorError`` unless the manifest has both stages with the same modules and shapes.

    ``modules="mlp"`` compares the MLP modules only.
    """
    stages = manifest.get("stages", {})
    missing = [s for s in STAGES if s not in stages]
    if missing:
        raise FactorError(
            f"the factor folder lacks the {' and '.join(missing)} stage; fit it with "
            f"`hub-msif fit --stage {missing[0]} --out <same folder>`"
        )
    check_same_modules(stages, modules)


def check_same_modules(stages: dict, modules: str = "all") -> None:
    """Raises ``FactorError`` unless the two stages' entries (``{stage: manifest entry}``, which may
    come from two places) track the same modules with the same shapes (``mlp``: MLP modules only)."""
    problems = stage_differences(*(select_modules(stages[s]["modules"], modules) for s in STAGES))
    if problems:
        raise FactorError("the pretrained and finetuned factors track different modules: " + "; ".join(problems))
