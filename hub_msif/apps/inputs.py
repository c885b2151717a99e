r"""Query and document files of ``hub-msif attribute`` (``--queries``, ``--documents``), read and
checked whole before any model loads (docs/design.md, "Command line").

Both are JSON Lines: one JSON object per line (lines end at ``\n`` only, a trailing ``\r``
dropped: U+2028, U+2029 and U+0085 are legal unescaped inside JSON strings, and
``str.splitlines()`` would break lines there), blank lines skipped. Every refusal is one ``MsifValueError`` naming the file and the line: a line that is not
strict JSON (NaN and Infinity are not), not an object, a missing or blank required field, a field
of the wrong type, a string holding a lone surrogate (``"\ud800"`` parses in Python but is no
Unicode text: it would reach the tokenizer and the strict JSON output), an unknown field (a
misspelt ``answer`` would otherwise be silently generated), a repeated id, or a file with no
entries at all.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

from hub_msif.apps.output import printable
from hub_msif.errors import ArtifactNotFoundError, MsifValueError

QUERY_FIELDS = ("prompt", "answer", "id")
DOCUMENT_FIELDS = ("id", "text")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in ``text`` (a code point U+D800..U+DFFF: what
    ``"\\ud800"`` in JSON or a non-UTF-8 byte of a command-line argument becomes), else None."""
    match = _SURROGATE.search(text)
    return match.start() if match else None


@dataclass(frozen=True)
class Query:
    """One line of a queries file: ``answer`` None means "generate it"; ``id`` defaults to the line number."""

    prompt: str
    answer: str | None
    id: str | int
    line: int


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _objects(path: str | Path, what: str, fields: tuple[str, ...]) -> tuple[Path, list[tuple[int, dict[str, Any]]]]:
    """``(line number, object)`` for every non-blank line of ``path``, checked to be a JSON object
    holding only ``fields``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ArtifactNotFoundError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise MsifValueError(f"{what} file {path} is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        bad_line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise MsifValueError(f"{path} line {bad_line}: not UTF-8 text") from None
    found: list[tuple[int, dict[str, Any]]] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        if not line.strip():
            continue
        try:
            value = json.loads(line, parse_constant=_refuse_constant)
        except ValueError as err:
            reason = err.msg if isinstance(err, json.JSONDecodeError) else str(err)
            raise MsifValueError(f"{path} line {number}: not valid JSON ({reason})") from None
        if not isinstance(value, dict):
            raise MsifValueError(f"{path} line {number}: expected a JSON object with {', '.join(fields)}, "
                                 f"got {type(value).__name__ if value is not None else 'null'}")
        unknown = [k for k in value if k not in fields]
        if unknown:
            raise MsifValueError(f"{path} line {number}: unknown field {printable(unknown[0])!r} "
                                 f"(fields: {', '.join(fields)})")
        for key, field_value in value.items():
            at = lone_surrogate(field_value) if isinstance(field_value, str) else None
            if at is not None:
                raise MsifValueError(f"{path} line {number}: {key!r} holds a lone surrogate "
                                     f"(\\u{ord(field_value[at]):04x} at character {at}): not Unicode text")
        found.append((number, value))
    if not found:
        raise MsifValueError(f"{what} file {path} is empty: no {what} in it")
    return path, found


@overload
def _text(path: Path, number: int, value: dict, key: str, required: Literal[True]) -> str: ...
@overload
def _text(path: Path, number: int, value: dict, key: str, required: bool) -> str | None: ...
def _text(path: Path, number: int, value: dict, key: str, required: bool) -> str | None:
    text = value.get(key)
    if text is None:
        if required:
            raise MsifValueError(f"{path} line {number}: no {key!r} field" if key not in value
                                 else f"{path} line {number}: {key!r} is null")
        return None
    if not isinstance(text, str):
        raise MsifValueError(f"{path} line {number}: {key!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise MsifValueError(f"{path} line {number}: {key!r} is empty")
    return text


def _id(path: Path, number: int, value: dict, seen: dict, required: bool) -> str | int | None:
    ident = value.get("id")
    if ident is None:
        if required:
            raise MsifValueError(f"{path} line {number}: no 'id' field" if "id" not in value
                                 else f"{path} line {number}: 'id' is null")
        return None
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise MsifValueError(f"{path} line {number}: 'id' must be a string or a whole number, got "
                             f"{type(ident).__name__}")
    if isinstance(ident, str) and not ident.strip():
        raise MsifValueError(f"{path} line {number}: 'id' is empty")
    key = str(ident)
    if key in seen:
        raise MsifValueError(f"{path} line {number}: id {printable(key)!r} is already used on line {seen[key]}")
    seen[key] = number
    return ident


def read_queries(path: str | Path) -> list[Query]:
    """The queries of a ``--queries`` file: ``prompt`` (required), ``answer`` and ``id`` (optional)."""
    path, found = _objects(path, "queries", QUERY_FIELDS)
    seen: dict[str, int] = {}
    queries = []
    for number, value in found:
        prompt = _text(path, number, value, "prompt", required=True)
        answer = _text(path, number, value, "answer", required=False)
        ident = _id(path, number, value, seen, required=False)
        queries.append(Query(prompt, answer, number if ident is None else ident, number))
    # A default id (the line number) may not collide with an id given on another line.
    given = {str(q.id) for q, (_, v) in zip(queries, found) if v.get("id") is not None}
    for q, (_, v) in zip(queries, found):
        if v.get("id") is None and str(q.id) in given:
            raise MsifValueError(f"{path} line {q.line}: has no id, and its default (the line number {q.line}) is "
                                 f"the id of line {seen[str(q.id)]}")
    return queries


def read_documents(path: str | Path) -> list[dict]:
    """The candidate documents of a ``--documents`` file: ``id`` and ``text`` (both required), as
    ``{"id": str, "text": str}`` dicts in file order (ids are strings, as in a document index)."""
    path, found = _objects(path, "documents", DOCUMENT_FIELDS)
    seen: dict[str, int] = {}
    documents = []
    for number, value in found:
        ident = _id(path, number, value, seen, required=True)
        documents.append({"id": str(ident), "text": _text(path, number, value, "text", required=True)})
    return documents
