"""The one check of an artifact file against the sha256 its manifest records.

Loading reads the file once and hashes the exact bytes it then parses (``read_verified``), so a
file replaced between the check and the parse cannot slip through; pushing and pulling hash the
file on disk (``verify_file``). Both raise an ``IntegrityError`` subclass chosen by the caller
(factors, index or Hub) whose message names the file and both hashes.
"""

from __future__ import annotations

from pathlib import Path

from hub_msif.artifacts.atomic import file_sha256, sha256_bytes
from hub_msif.errors import IntegrityError


def _mismatch(path: Path, digest: str, expected: str, error: type[IntegrityError]) -> IntegrityError:
    return error(f"{path} is corrupted or was altered: sha256 {digest} does not match the manifest's {expected}")


def read_verified(path: str | Path, expected: str, error: type[IntegrityError] = IntegrityError) -> bytes:
    """The bytes of ``path``, after checking that their sha256 is ``expected``."""
    path = Path(path)
    data = path.read_bytes()
    digest = sha256_bytes(data)
    if digest != expected:
        raise _mismatch(path, digest, expected, error)
    return data


def verify_file(path: str | Path, expected: str, error: type[IntegrityError] = IntegrityError) -> int:
    """Checks the sha256 of the file at ``path`` without holding it in memory; returns its size."""
    path = Path(path)
    digest = file_sha256(path)
    if digest != expected:
        raise _mismatch(path, digest, expected, error)
    return path.stat().st_size
