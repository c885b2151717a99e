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

from hub_msif.errors import MsifValueError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ModelRef:
    """Where a model came from: ``id`` (repo id or folder path) and its exact ``revision``; for a
    PEFT adapter, ``base`` is the base model's ``ModelRef`` (the adapter's own id and revision
    stay in ``id`` and ``revision``, so a merged adapter is matched to factors like any model)."""

    id: str
    revision: str
    base: ModelRef | None = None

    def to_json(self) -> dict:
        out = {"id": self.id, "revision": self.revision}
        if self.base is not None:
            out["adapter"] = "peft"
            out["base"] = self.base.to_json()
        return out


def is_commit_sha(revision) -> bool:
    """Whether ``revision`` is a full 40-hex git commit sha (the form the Hub resolves revisions to)."""
    from huggingface_hub.file_download import REGEX_COMMIT_HASH

    return isinstance(revision, str) and REGEX_COMMIT_HASH.fullmatch(revision) is not None


def folder_revision(folder: str | Path) -> str:
    """``sha256:<hex>`` over the names and contents of the weight files in ``folder``."""
    folder = Path(folder)
    files = sorted(f for f in folder.iterdir() if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    if not files:
        raise FileNotFoundError(f"no weight files ({', '.join(WEIGHT_SUFFIXES)}) in model folder {folder}")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + b"\0")
        with f.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def resolve_model(model: str, revision: str | None = None) -> tuple[Path, ModelRef]:
    """A local folder holding the model's files, and its ``ModelRef``.

    A Hub id is downloaded (or taken from the cache) with ``huggingface_hub``; the revision is
    the resolved commit sha.
    """
    path = Path(model)
    if path.is_dir():
        if revision is not None:
            raise MsifValueError(f"--revision {revision} given for the local folder {model}; revisions apply to Hub ids")
        return path, ModelRef(str(path.resolve()), folder_revision(path))
    if not _looks_like_repo_id(model):
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


def _looks_like_repo_id(model: str) -> bool:
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
                    base_revision: str | None = None) -> tuple[Path, Path | None, ModelRef]:
    """``(folder, base_folder, ref)``: ``base_folder`` is None for a plain model; for a PEFT adapter
    it is the base model's folder and ``ref.base`` its ``ModelRef``.

    The base is resolved here, before any weights or data are read, so that a base that cannot be
    found is a one-line error up front.
    """
    folder, ref = resolve_model(model, revision)
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
    return folder, base_folder, ModelRef(ref.id, ref.revision, base_ref)


def load_model(model: str, revision: str | None = None, dtype=None, base_model: str | None = None,
               base_revision: str | None = None):
    """``(model, tokenizer, ModelRef)`` for a Hub id or folder, in eval mode.

    A PEFT adapter (``adapter_config.json``) is loaded on its base model (``base_model``, else the
    one its config names) and merged; the tokenizer comes from the adapter when it has one, else
    from the base.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, base_folder, ref = resolve_adapter(model, revision, base_model, base_revision)
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
