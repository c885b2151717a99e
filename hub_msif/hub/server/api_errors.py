"""The server's error answers: ``HubApiError`` and the Hub's standard not-found errors.

The Hub reports an error with ``X-Error-Code`` / ``X-Error-Message`` headers plus a JSON body
``{"error": ...}``. ``huggingface_hub`` turns the code into its typed exceptions
(``RepositoryNotFoundError``, ``RevisionNotFoundError``, ``EntryNotFoundError``),
and HEAD answers carry only the headers, so the code must always be there. ``HubApiError`` is the
server side; the client side's error is ``hub_msif.errors.HubError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # starlette is the server extra's: auth, store and garbage import this module without it
    from starlette.responses import JSONResponse

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"  # the client maps it to "Invalid user token"


class HubApiError(Exception):
    """An error answer: HTTP ``status``, ``message``, optional ``X-Error-Code`` ``code``, extra JSON
    ``body`` keys and extra response ``headers``."""

    def __init__(self, status: int, message: str, code: str | None = None, body: dict | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.body, self.headers = body or {}, headers or {}


def repo_not_found(anonymous: bool) -> HubApiError:
    """A missing repo, or one the caller may not see (401 for anonymous callers, as on the Hub)."""
    return HubApiError(401 if anonymous else 404, "Repository not found", "RepoNotFound")


def revision_not_found(rev: str) -> HubApiError:
    """A branch, tag or commit that the repo does not have."""
    return HubApiError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


def entry_not_found(path: str, commit: str | None = None) -> HubApiError:
    """A file or folder missing at ``commit``; the client records the miss under that commit."""
    return HubApiError(404, f"Entry not found: {path}", "EntryNotFound",
                       headers={"X-Repo-Commit": commit} if commit else None)


def error_response(err: HubApiError) -> JSONResponse:
    """The HTTP answer of ``err``: status, JSON body ``{"error": message, **body}`` and headers."""
    from starlette.responses import JSONResponse

    headers = {**err.headers, "X-Error-Message": _header_safe(err.message)}
    if err.code:
        headers["X-Error-Code"] = err.code
    return JSONResponse({"error": err.message, **err.body}, status_code=err.status, headers=headers)


def _header_safe(value: str) -> str:
    # Header values are latin-1 on the wire and one line: escape the rest rather than fail to answer.
    return " ".join(value.encode("ascii", "backslashreplace").decode("ascii").split())
