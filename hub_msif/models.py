"""Loading a causal LM and its tokenizer from a Hub id or a local folder, with its revision.

A Hub model is recorded by repo id and resolved commit sha (the snapshot folder's name); a local
folder by ``sha256:`` over its weight files, so factors can always be matched to the weights.

A LoRA (PEFT) adapter, a repo or folder holding ``adapter_config.json``, is a model too: it is
loaded on its base model (``base_model`` if given, else the adapter config's
``base_model_name_or_path``) with ``peft`` and merged (``merge_and_unload``), so scoring and
fitting see one plain model. Its ``ModelRef`` is the adapter's, with the base's in ``base``
(docs/design.md, "Pipeline and package layout").
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hub_msif.artifacts.local_folders import lookup, remember
from hub_msif.errors import MsifValueError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ModelRef:
    """Which model: ``id`` (a Hub repo id, or for a local folder a name: ``--model-name``, else the
    folder's name) and its exact ``revision`` (a Hub commit sha, or ``sha256:`` over a local folder's
    weights); for a PEFT adapter, ``base`` is the base model's ``ModelRef`` (the adapter's own id and
    revision stay in ``id`` and ``revision``, so a merged adapter is matched to factors like any
    model). ``folder`` is where a local model lies on this machine: never recorded in a manifest
    (docs/design.md, "No machine paths")."""

    id: str
    revision: str
    base: ModelRef | None = None
    folder: str | None = None

    @property
    def is_local(self) -> bool:
        return self.folder is not None

    def __str__(self) -> str:
        return f"{self.id}@{self.revision}"

    def to_json(self) -> dict:
        out: dict[str, Any] = {"id": self.id, "revision": self.revision}
        if self.is_local:
            out["local"] = True
        if self.base is not None:
            out["adapter"] = "peft"
            out["base"] = self.base.to_json()
        return out


def looks_like_path(text: str) -> bool:
    """Whether ``text`` is written as a path (``/``, ``~``, ``.`` or ``\\`` first, or a drive letter)."""
    return text.startswith(("/", "~", ".", "\\")) or (len(text) > 2 and text[1] == ":" and text[2] in "/\\")


def is_local_record(recorded: dict) -> bool:
    """Whether a manifest's model record names a local folder (by name and weights' sha256): newer
    manifests say ``"local": true``, older ones recorded the folder's path as the id."""
    return bool(recorded.get("local")) or looks_like_path(str(recorded.get("id") or ""))


def recorded_model(recorded: dict, what: str, model_paths=None) -> tuple[str, str | None]:
    """``(model to load, pinned revision)`` for a manifest's model record ``{"id", "revision"}``.

    A Hub model is its id at the recorded commit. A local folder is found, in this order, in
    ``model_paths`` (``{name: folder}``, from ``--model-path NAME=FOLDER``), among the folders this
    machine has hashed to the recorded ``sha256:`` (``hub_msif.artifacts.local_folders``), or (older
    manifests) at the path recorded as its id; else a one-line error says how to name it.
    """
    ident, revision = str(recorded.get("id") or ""), recorded.get("revision")
    if not is_local_record(recorded):
        return ident, revision if is_commit_sha(revision) else None
    given = (model_paths or {}).get(ident)
    if given is not None:
        return str(given), None
    found = lookup(str(revision))
    if found is not None and found[0].is_dir():
        return str(found[0]), None
    if Path(ident).is_absolute() and Path(ident).is_dir():
        return ident, None
    raise MsifValueError(f"the {what} {ident!r} ({str(revision)[:19]}...) was a local folder where the factors were "
                         f"made, and no folder with those weights is known here: give it with --model-path "
                         f"{ident}=FOLDER")


def is_commit_sha(revision) -> bool:
    """Whether ``revision`` is a full 40-hex git commit sha (the form the Hub resolves revisions to)."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH

    return isinstance(revision, str) and REGEX_COMMIT_HASH.fullmatch(revision) is not None


_REVISIONS: dict[tuple, str] = {}


def folder_revision(folder: str | Path) -> str:
    """``sha256:<hex>`` over the names and contents of the weight files in ``folder``; computed once
    per process for unchanged files (same names, sizes and modification times), and remembered
    for this machine (``local_folders``) so that manifests can name the folder by content."""
    folder = Path(folder)
    files = sorted(f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in model folder {folder}")
    key = (str(folder.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if key not in _REVISIONS:
        _REVISIONS[key] = _weights_digest(files)
        remember(_REVISIONS[key], folder)
    return _REVISIONS[key]


def _weights_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with f.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def check_model_name(name: str) -> str:
    """A name given for a local model (``--model-name``): printable, one line, and not a path."""
    if not isinstance(name, str) or not name.strip():
        raise MsifValueError("a model name must not be empty")
    if any(not c.isprintable() for c in name):
        raise MsifValueError(f"the model name {name!r} holds control characters")
    if looks_like_path(name) or "\\" in name:
        raise MsifValueError(f"the model name {name!r} is a path; give a name to show on the card instead "
                             "(say, the model's name on the Hub, or what you call it)")
    if len(name) > 200:
        raise MsifValueError(f"the model name is {len(name)} characters long, more than 200")
    return name


def local_name(folder: str | Path) -> str:
    """What a local model folder is called when no name is given: the folder's own name."""
    return Path(folder).resolve().name or "local model"


def resolve_model(model: str, revision: str | None = None, name: str | None = None) -> tuple[Path, ModelRef]:
    """A local folder holding the model's files, and its ``ModelRef``.

    A Hub id is downloaded (or taken from the cache) with ``huggingface_hub``; the revision is
    the resolved commit sha. A local folder is named ``name`` (default: the folder's name).
    """
    path = Path(model)
    if path.is_dir():
        if revision is not None:
            raise MsifValueError(f"--revision {revision} given for the local folder {model}; revisions apply to Hub ids")
        if name is not None:
            check_model_name(name)
        return path, ModelRef(name or local_name(path), folder_revision(path), folder=str(path.resolve()))
    if not looks_like_repo_id(model):
        raise FileNotFoundError(f"model folder {model} does not exist")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(model, revision=revision))
    except Exception as err:  # offline, unknown repo or revision: say which model, not only why
        raise FileNotFoundError(
            f"model {model!r} is not a local folder and could not be fetched from the Hub"
            f"{f' at revision {revision}' if revision else ''}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from err
    return snapshot, ModelRef(model, snapshot.name)


def looks_like_repo_id(model: str) -> bool:
    """``[namespace/]name`` as the Hub accepts it (names may hold dots: ``Qwen/Qwen2.5-0.5B``);
    paths that start with ``.``, ``/`` or ``~`` never are."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def adapter_base(folder: str | Path, model: str = "") -> str:
    """The base model named by the PEFT adapter in ``folder`` (``base_model_name_or_path``)."""
    import json

    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise MsifValueError(f"adapter {model or folder}: {ADAPTER_CONFIG} is unreadable ({err})") from err
    base = config.get("base_model_name_or_path") if isinstance(config, dict) else None
    if not isinstance(base, str) or not base.strip():
        raise MsifValueError(f"adapter {model or folder} names no base model (no base_model_name_or_path in "
                             f"{ADAPTER_CONFIG}); give one with --base-model")
    return base


def resolve_adapter(model: str, revision: str | None = None, base_model: str | None = None,
                    base_revision: str | None = None, name: str | None = None) -> tuple[Path, Path | None, ModelRef]:
    """``(folder, base_folder, ref)``: ``base_folder`` is None for a plain model; for a PEFT adapter
    it is the base model's folder and ``ref.base`` its ``ModelRef``.

    The base is resolved here, before any weights or data are read, so that a base that cannot be
    found is a one-line error up front.
    """
    folder, ref = resolve_model(model, revision, name)
    if not (folder / ADAPTER_CONFIG).is_file():
        if base_model is not None:
            raise MsifValueError(f"--base-model {base_model} given, but {model} is not a PEFT adapter "
                                 f"(no {ADAPTER_CONFIG})")
        return folder, None, ref
    base = base_model or adapter_base(folder, model)
    try:
        base_folder, base_ref = resolve_model(base, base_revision)
    except (FileNotFoundError, MsifValueError) as err:
        raise MsifValueError(f"the base model of adapter {model} cannot be found: {str(err).splitlines()[0]}") from err
    if (base_folder / ADAPTER_CONFIG).is_file():
        raise MsifValueError(f"the base model {base} of adapter {model} is itself an adapter; give a plain model")
    return folder, base_folder, ModelRef(ref.id, ref.revision, base_ref, ref.folder)


def load_model(model: str, revision: str | None = None, dtype=None, base_model: str | None = None,
               base_revision: str | None = None, name: str | None = None):
    """``(model, tokenizer, ModelRef)`` for a Hub id or folder, in eval mode.

    A PEFT adapter (``adapter_config.json``) is loaded on its base model (``base_model``, else the
    one its config names) and merged; the tokenizer comes from the adapter when it has one, else
    from the base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, base_folder, ref = resolve_adapter(model, revision, base_model, base_revision, name)
    weights_folder = base_folder if base_folder is not None else folder
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder if has_tokenizer or base_folder is None else base_folder)
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        # transformers builds an empty tokenizer when the folder has no tokenizer files.
        raise FileNotFoundError(
            f"model {model} has no usable tokenizer (no tokenizer files in {folder}?): save the "
            "tokenizer with the model (tokenizer.save_pretrained)"
        )
    from safetensors import SafetensorError

    try:
        lm = AutoModelForCausalLM.from_pretrained(weights_folder, dtype=dtype if dtype is not None else "auto")
        if base_folder is not None:
            lm = _merge_adapter(lm, folder, model)
    except SafetensorError as err:  # a truncated or damaged weights file
        where = f"{weights_folder} or {folder}" if base_folder is not None else f"{folder}"
        raise MsifValueError(f"model {model}: a weights file in {where} is damaged or truncated "
                             f"(safetensors: {str(err).splitlines()[0] if str(err) else 'unreadable'})") from err
    lm.eval()
    return lm, tokenizer, ref


def _merge_adapter(base, folder: Path, model: str):
    """``base`` with the PEFT adapter in ``folder`` merged into its weights (a plain model again)."""
    from peft import PeftModel

    try:
        merged = PeftModel.from_pretrained(base, folder).merge_and_unload()
    except (RuntimeError, KeyError, ValueError) as err:  # shapes or target modules of another base
        raise MsifValueError(f"adapter {model} does not fit its base model {type(base).__name__}: "
                             f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    return merged


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its eos token, else 0."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


def generate_answer(model, tokenizer, prompt_text: str, max_new_tokens: int = 32) -> str:
    """The model's greedy continuation of ``prompt_text`` (already templated), up to end-of-sequence."""
    import torch

    ids = tokenizer(prompt_text, return_tensors="pt")["input_ids"].to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=tokenizer.eos_token_id,
                             pad_token_id=pad_token_id(tokenizer))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
