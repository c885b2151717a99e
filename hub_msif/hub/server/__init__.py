"""A Hugging Face Hub compatible HTTP server, for offline tests and air-gapped sharing.

``HubServer`` speaks the part of the Hub HTTP API that ``huggingface_hub`` (and ``datasets``
through ``HfFileSystem``) use for this project's pushes, pulls and searches: model, dataset
and space repos (a Space is stored and served, never run), commits with regular and LFS files,
branches, tags, tree listings, downloads with ``Range``, search and tokens (docs/design.md, "Hub
artifacts", "Hub server"); clients need
``HF_HUB_DISABLE_XET=1`` (Xet storage is not spoken).

Modules, from the disk up: ``store`` (repos on disk: commits, refs, objects), ``card_metadata`` (README
front matter and tags), ``gitattributes`` (which files are LFS), ``auth`` (tokens, callers,
rights), ``api_errors`` (``HubApiError`` and the Hub's error shape), ``views`` (the JSON documents
answered), ``request_context`` (what handlers read from a request), ``repos``, ``uploads`` and ``space_repos``
(the handlers), ``routes`` (the starlette app), ``app`` (``HubServer``: uvicorn in a thread) and
``garbage`` (removing uploads that no commit references).

The server is the optional extra ``hub_msif[server]``: ``routes``, the handlers and ``app`` need
starlette and uvicorn, which the core package does not require. Tokens (``auth``), the store and
``garbage`` do not, so ``hub gc`` and ``--token`` parsing work without them; ``HubServer`` is
imported on first use (``require_server``), and without the extra that is one line naming it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hub_msif.errors import MissingExtraError
from hub_msif.hub.server.api_errors import HubApiError
from hub_msif.hub.server.auth import load_tokens, normalize_tokens, parse_token_spec, save_tokens
from hub_msif.hub.server.garbage import DEFAULT_GRACE_SECONDS, collect_garbage
from hub_msif.hub.server.store import git_blob_sha1

if TYPE_CHECKING:
    from hub_msif.hub.server.app import HubServer

INSTALL_HINT = "pip install 'hub_msif[server]'"


def require_server() -> None:
    """Raises ``MissingExtraError`` (one line: what to install) unless starlette and uvicorn import."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise MissingExtraError(f"the local Hub server needs {err.name or 'starlette and uvicorn'}, which is not "
                                f"installed: {INSTALL_HINT}") from None


def __getattr__(name: str):
    # PEP 562: ``HubServer`` (starlette + uvicorn) is imported on first use, never with the package.
    if name == "HubServer":
        require_server()
        from hub_msif.hub.server.app import HubServer

        return HubServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DEFAULT_GRACE_SECONDS", "INSTALL_HINT", "HubApiError", "HubServer", "collect_garbage", "git_blob_sha1",
           "load_tokens", "normalize_tokens", "parse_token_spec", "require_server", "save_tokens"]
