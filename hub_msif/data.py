"""Corpora: loading text from a ``datasets`` Hub id or local files, tokenizing, batching.

A corpus is either plain text (one column, every token carries loss) or instruction data
(prompt and response columns, formatted by a template; only response tokens carry loss).
Tokenized sequences are plain dicts ``{"input_ids", "labels"}`` of Python ints with the
transformers label convention (``-100`` = no loss).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hub_msif.errors import CorpusError
from hub_msif.options import non_empty, positive_int, setting

LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
DEFAULT_TEMPLATE = "{prompt}\n"



logger = logging.getLogger(__name__)


@dataclass
class CorpusSpec:
    """Where a corpus comes from and how its rows become token sequences.

    Every field but ``data`` is a setting of ``hub-msif fit`` (help text and option in the field
    metadata, ``hub_msif.options``): the options are generated from it and the card's reproduce
    command is rendered from the recorded values (``describe()``).
    """

    data: str | Sequence[str]
    split: str = setting("train", "dataset split (Hub datasets; default: train)", type=non_empty)
    revision: str | None = setting(None, "Hub revision of the dataset", flag="--data-revision", type=non_empty)
    text_column: str | None = setting(None, "column holding the text (default: text)", type=non_empty)
    prompt_column: str | None = setting(None, "instruction data: column holding the prompt (no loss)",
                                        type=non_empty)
    response_column: str | None = setting(None, "instruction data: column holding the response (carries the loss)",
                                          type=non_empty)
    template: str = setting(DEFAULT_TEMPLATE, "prompt template with {prompt}; default: '{prompt}\\n'",
                            type=non_empty, cli_default=None)
    # --max-length and --max-sequences are range-checked by validate(), which fit_stage runs before it
    # loads the model; their messages are the library's.
    max_length: int = setting(512, "tokens per sequence, longer ones are truncated (default 512)", type=int)
    max_sequences: int | None = setting(None, "use at most this many sequences", type=int)
    max_tokens: int | None = setting(None, "token budget: stop before the sequence that would exceed it",
                                     type=positive_int)

    def validate(self) -> None:
        if self.max_length is None or self.max_length < 2:
            raise CorpusError(f"max length must be at least 2 tokens, got {self.max_length}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise CorpusError(f"max sequences must be positive, got {self.max_sequences}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise CorpusError(f"max tokens must be at least 2, got {self.max_tokens}")
        if (self.prompt_column is None) != (self.response_column is None):
            raise CorpusError("give both --prompt-column and --response-column, or neither")
        if self.prompt_column and self.text_column:
            raise CorpusError("give either a text column or prompt/response columns, not both")
        if self.prompt_column and "{prompt}" not in self.template:
            raise CorpusError(f"the template {self.template!r} has no {{prompt}} placeholder")

    def describe(self) -> dict:
        """JSON-ready description for the manifest: local files and folders by their names only
        (``source_sha256`` beside it names their content; docs/design.md, "No machine paths")."""
        data = public_data(self.data)
        return {
            "data": data, "split": self.split, "revision": self.revision,
            "text_column": self.text_column, "prompt_column": self.prompt_column,
            "response_column": self.response_column,
            "template": self.template if self.prompt_column else None,
            "max_length": self.max_length, "max_sequences": self.max_sequences,
        } | ({"max_tokens": self.max_tokens} if self.max_tokens is not None else {})


def public_data(data: str | Sequence[str]) -> str | list[str]:
    """``data`` as an artifact records it: Hub dataset ids unchanged, local files and folders by
    their last path component (never a path of this machine)."""
    items = [data] if isinstance(data, (str, Path)) else list(data)
    names = [Path(str(item)).resolve().name if Path(str(item)).exists() else str(item) for item in items]
    return names[0] if isinstance(data, (str, Path)) else names


def remember_source(spec: CorpusSpec) -> str:
    """``source_sha256(spec)``; local files are also remembered under it for this machine
    (``hub_msif.artifacts.local_folders``), so that a recorded corpus can be found again by content."""
    from hub_msif.artifacts.local_folders import remember

    digest = source_sha256(spec)
    files = _local_files(spec.data)
    if files is not None:
        remember(digest, files)
    return digest


def _local_files(data: str | Sequence[str]) -> list[Path] | None:
    """The local files named by ``data`` (files or folders), or None when it is a Hub id."""
    items = [data] if isinstance(data, str) else list(data)
    paths = [Path(item) for item in items]
    if not all(p.exists() for p in paths):
        if len(paths) > 1 or any(p.suffix in LOCAL_BUILDERS for p in paths):
            missing = ", ".join(str(p) for p in paths if not p.exists())
            raise CorpusError(f"data file(s) not found: {missing}")
        return None
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(f for f in path.rglob("*") if f.suffix in LOCAL_BUILDERS) if path.is_dir() else [path])
    if not files:
        raise CorpusError(f"no .txt, .jsonl, .json or .parquet files in {', '.join(items)}")
    return files


def source_sha256(spec: CorpusSpec) -> str:
    """sha256 naming the corpus ``spec`` reads, the same for a fit and an index built from it:
    over the bytes of local files (in the order they are read; their paths do not count, so the
    same files elsewhere match), or over the Hub dataset id, revision and split."""
    digest = hashlib.sha256()
    files = _local_files(spec.data)
    if files is None:
        digest.update(json.dumps({"hub": spec.data, "revision": spec.revision, "split": spec.split},
                                 sort_keys=True).encode())
        return digest.hexdigest()
    for path in files:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):  # noqa: B023 (consumed at once)
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def load_rows(spec: CorpusSpec):
    """The corpus as a ``datasets.Dataset``."""
    import datasets

    files = _local_files(spec.data)
    if files is None:
        return datasets.load_dataset(spec.data, split=spec.split, revision=spec.revision)
    kinds = {LOCAL_BUILDERS.get(f.suffix) for f in files}
    if None in kinds or len(kinds) != 1:
        raise CorpusError(f"local data must be all .txt, all .json/.jsonl or all .parquet, got {[f.name for f in files]}")
    builder = kinds.pop()
    if builder in ("text", "json") and not any(_has_text(f) for f in files):
        # datasets fails on these with a StopIteration or "corresponds to no data".
        raise CorpusError(f"the corpus is empty: {', '.join(str(f) for f in files)} hold(s) no text")
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except datasets.exceptions.DatasetGenerationError as err:  # malformed files: the cause says where
        lines = str(err.__cause__ or err).splitlines() or [type(err).__name__]
        reason = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"  # casts list whole schemas
        raise CorpusError(f"cannot read the corpus {', '.join(str(f) for f in files)} as {builder} data: {reason}") from err


def _has_text(path: Path) -> bool:
    """Whether ``path`` holds anything but whitespace (reads only up to the first such byte)."""
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 16), b""):
            if chunk.strip():
                return True
    return False


def _check_columns(rows, spec: CorpusSpec) -> str | None:
    """Validates column names; returns the text column to use (None for prompt/response data)."""
    columns = list(rows.column_names)
    wanted = [spec.prompt_column, spec.response_column] if spec.prompt_column else [spec.text_column or "text"]
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise CorpusError(
            f"column(s) {', '.join(repr(c) for c in missing)} not in the data; it has {', '.join(columns)}"
        )
    return None if spec.prompt_column else wanted[0]


def row_text(value, row: int, column: str | None) -> str | None:
    """The text of one row's ``column``, or None for a missing or blank value (the caller skips
    the row and counts it). Any other value (a number, a list, ...) is a ``CorpusError`` naming the
    row: coercing ``5`` to ``"5"`` would fit or index something the user did not write."""
    if value is None:
        return None
    if not isinstance(value, str):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        raise CorpusError(f"row {row + 1} (1-based) of column {column!r} holds {type(value).__name__} {shown}, "
                          "not text; fix or drop that row")
    return value if value.strip() else None


def report_skipped(skipped: int, total: int, what: str) -> None:
    """One warning for the rows left out because their text is empty or missing."""
    if skipped:
        logger.warning("skipped %d of %d row(s) with empty or missing %s", skipped, total, what)


def iter_sequences(rows, tokenizer, spec: CorpusSpec, show_progress: bool = False) -> Iterator[dict]:
    """Tokenized sequences of ``rows``, one at a time, as they are consumed (nothing is kept).

    Empty texts are skipped (one warning at the end); sequences are truncated to
    ``spec.max_length`` tokens; shorter than 2 tokens are left out. Stops after
    ``spec.max_sequences`` sequences, or before the sequence that would take the total number of
    tokens above ``spec.max_tokens``. Every call iterates ``rows`` again from the start.
    """
    from tqdm.auto import tqdm

    spec.validate()
    text_column = _check_columns(rows, spec)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    kept = tokens = skipped = 0
    number = -1
    for number, row in enumerate(tqdm(rows, desc="tokenizing", disable=not show_progress, leave=False)):
        if spec.max_sequences is not None and kept >= spec.max_sequences:
            break
        if text_column is not None:
            text = row_text(row[text_column], number, text_column)
            if text is None:
                skipped += 1
                continue
            ids = tokenizer(text, add_special_tokens=True)["input_ids"][: spec.max_length]
            labels = list(ids)
        else:
            response = row_text(row[spec.response_column], number, spec.response_column)
            prompt = row_text(row[spec.prompt_column], number, spec.prompt_column) or ""
            if response is None:
                skipped += 1
                continue
            prompt_ids = tokenizer(spec.template.format(prompt=prompt), add_special_tokens=True)["input_ids"]
            response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + eos
            ids = (prompt_ids + response_ids)[: spec.max_length]
            labels = ([-100] * len(prompt_ids) + response_ids)[: spec.max_length]
        if len(ids) < 2:
            continue
        if spec.max_tokens is not None and tokens + len(ids) > spec.max_tokens:
            break
        kept += 1
        tokens += len(ids)
        yield {"input_ids": ids, "labels": labels}
    report_skipped(skipped, number + 1 if kept or skipped else 0,
                   f"text in column {text_column!r}" if text_column else f"response in column {spec.response_column!r}")


def sequence_digest(digest, sequence: dict) -> None:
    """Adds one sequence's length, token ids and labels to a sha256 ``digest`` (the data fingerprint)."""
    import torch  # here, not at the top: CorpusSpec is imported by the card renderer, which needs no torch

    ids = sequence["input_ids"]
    digest.update(torch.tensor([len(ids)] + ids + sequence["labels"], dtype=torch.int64).numpy().tobytes())


def tokenize_corpus(rows, tokenizer, spec: CorpusSpec, show_progress: bool = False) -> tuple[list[dict], str]:
    """All tokenized sequences in memory and a sha256 fingerprint over their token ids and labels
    (``iter_sequences`` consumed into a list; fits stream with ``TokenStream`` instead)."""
    sequences: list[dict] = []
    digest = hashlib.sha256()
    for sequence in iter_sequences(rows, tokenizer, spec, show_progress):
        sequences.append(sequence)
        sequence_digest(digest, sequence)
    if not sequences:
        raise CorpusError(f"the corpus {spec.data!r} yields no sequence with at least 2 tokens")
    return sequences, digest.hexdigest()


class TokenStream:
    """A corpus tokenized as it is read: iterable any number of times, never held in memory.

    ``survey()`` reads it once (without a model) for the number of sequences and tokens and the
    same sha256 fingerprint as ``tokenize_corpus``; the result is kept, later calls are free.
    A fit iterates it once per pass (docs/design.md, "Streaming data").
    """

    def __init__(self, rows, tokenizer, spec: CorpusSpec):
        spec.validate()
        self.rows, self.tokenizer, self.spec = rows, tokenizer, spec
        self._survey: tuple[int, int, str] | None = None

    def __iter__(self) -> Iterator[dict]:
        return iter_sequences(self.rows, self.tokenizer, self.spec)

    def survey(self, show_progress: bool = False) -> tuple[int, int, str]:
        """(number of sequences, number of tokens, fingerprint)."""
        if self._survey is None:
            digest = hashlib.sha256()
            count = tokens = 0
            for sequence in iter_sequences(self.rows, self.tokenizer, self.spec, show_progress):
                count += 1
                tokens += len(sequence["input_ids"])
                sequence_digest(digest, sequence)
            if not count:
                raise CorpusError(f"the corpus {self.spec.data!r} yields no sequence with at least 2 tokens")
            self._survey = count, tokens, digest.hexdigest()
        return self._survey


def collate(sequences: Sequence[dict], indices: Sequence[int], pad_id: int, device=None) -> dict:
    """Right-padded batch tensors plus each sequence's global index (for label sampling)."""
    import torch

    length = max(len(s["input_ids"]) for s in sequences)
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq["input_ids"])
        input_ids[row, :n] = torch.tensor(seq["input_ids"])
        labels[row, :n] = torch.tensor(seq["labels"])
        attention_mask[row, :n] = 1
    batch = {
        "input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
        "sequence_index": torch.tensor(list(indices), dtype=torch.long),
    }
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch
