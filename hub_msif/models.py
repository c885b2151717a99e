"""Loading a causal LM and its tokenizer from a Hub id or a local folder, with its revision.

A Hub model is recorded by repo id and resolved commit sha (the snapshot folder's name); a local
folder by ``sha256:`` over its weight files, so factors can always be matched to the weights.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from hub_msif.errors import MsifValueError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ModelRef:
    """Where a model came from: ``id`` (repo id or folder path) and its exact ``revision``."""

    id: str
    revision: str

    def to_json(self) -> dict:
        return {"id": self.id, "revision": self.revision}


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


def load_model(model: str, revision: str | None = None, dtype=None):
    """``(model, tokenizer, ModelRef)`` for a Hub id or folder, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, ref = resolve_model(model, revision)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer("hello world", add_special_tokens=False)["input_ids"]:
        # transformers builds an empty tokenizer when the folder has no tokenizer files.
        raise FileNotFoundError(
            f"model {model} has no usable tokenizer (no tokenizer files in {folder}?): save the "
            "tokenizer with the model (tokenizer.save_pretrained)"
        )
    from safetensors import SafetensorError

    try:
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype if dtype is not None else "auto")
    except SafetensorError as err:  # a truncated or damaged weights file
        raise MsifValueError(f"model {model}: a weights file in {folder} is damaged or truncated "
                             f"(safetensors: {str(err).splitlines()[0] if str(err) else 'unreadable'})") from err
    lm.eval()
    return lm, tokenizer, ref


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
