"""The documents of an index folder (``documents.parquet``: id, text), shared by the embedding
index and the gradient index (docs/design.md, "Retrieval", "Gradient index"): writing, reading
(never unpickling: parquet holds plain strings) and the fingerprint of a document list."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hub_msif.attribution.embeddings import one_line
from hub_msif.errors import CorpusError, MsifValueError, RetrievalError


def corpus_columns(rows, text_column: str | None, id_column: str | None) -> tuple[str, str | None]:
    """``(text column, id column or None)`` of a corpus's ``rows`` (a datasets table): the text column
    defaults to ``text``, the id column to ``id`` when there is one (else row numbers are the ids);
    a named column that is missing is one ``CorpusError`` listing the columns there are."""
    columns = list(rows.column_names)
    text_column = text_column or "text"
    if text_column not in columns:
        raise CorpusError(f"text column {text_column!r} not in the data; it has {', '.join(columns) or 'no columns'}")
    if id_column is not None and id_column not in columns:
        raise CorpusError(f"id column {id_column!r} not in the data; it has {', '.join(columns)}")
    return text_column, id_column if id_column is not None else ("id" if "id" in columns else None)


def documents_sha256(documents: Sequence[dict]) -> str:
    """sha256 over the ids and texts, in order (a fingerprint of the indexed corpus)."""
    digest = hashlib.sha256()
    for doc in documents:
        for value in (doc["id"], doc["text"]):
            raw = value.encode("utf-8")
            digest.update(len(raw).to_bytes(8, "little") + raw)
    return digest.hexdigest()


def documents_to_parquet(documents: Sequence[dict]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": pa.array([d["id"] for d in documents], type=pa.string()),
                      "text": pa.array([d["text"] for d in documents], type=pa.string())})
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def documents_from_parquet(data: bytes, path: Path, error: type[MsifValueError] = RetrievalError) -> list[dict]:
    """The documents of a ``documents.parquet`` read from ``data``; ``error`` when it is no such file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Read from a copy that arrow owns: a reader over Python bytes may be released by an arrow worker
    # thread during interpreter shutdown, which then takes the GIL and aborts the process
    # ("terminate called without an active exception") when torch is loaded.
    owned = pa.allocate_buffer(len(data))
    np.frombuffer(owned, dtype=np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
    try:
        table = pq.read_table(pa.BufferReader(owned))
    except (pa.ArrowException, OSError) as err:
        raise error(f"{path} cannot be read as parquet: {one_line(err)}") from err
    missing = [c for c in ("id", "text") if c not in table.column_names]
    if missing:
        raise error(f"{path} lacks column(s) {', '.join(missing)}; it has {', '.join(table.column_names)}")
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    return [{"id": i, "text": t} for i, t in zip(ids, texts, strict=True)]
