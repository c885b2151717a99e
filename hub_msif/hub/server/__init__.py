"""A Hugging Face Hub compatible HTTP server, for offline tests and air-gapped sharing.

``HubServer`` speaks the part of the Hub HTTP API that ``huggingface_hub`` (and ``datasets``
through ``HfFileSystem``) use for this project's pushes, pulls and searches: model, dataset
and space repos (a Space is stored and served, never run), commits with regular and LFS files,
branches, tags, tree listings, downloads with ``Range``, search and tokens (docs/design.md, "Hub
artifacts", "Hub server"); clients need
``HF_HUB_DISABLE_XET=1`` (Xet storage is not spoken).

Modules, from the disk up: ``store`` (repos on disk: commits, refs, objects), ``cards`` (README
front matter and tags), ``gitattributes`` (which files are LFS), ``auth`` (tokens, callers,
rights), ``errors`` (``HubApiError`` and the Hub's error shape), ``views`` (the JSON documents
answered), ``request_context`` (what handlers read from a request), ``repos``, ``uploads`` and ``spaces``
(the handlers), ``routes`` (the starlette app), ``app`` (``HubServer``: uvicorn in a thread) and
``garbage`` (removing uploads that no commit references).
"""

from hub_msif.hub.server.api_errors import HubApiError
from hub_msif.hub.server.app import HubServer
from hub_msif.hub.server.auth import load_tokens, normalize_tokens, parse_token_spec, save_tokens
from hub_msif.hub.server.garbage import DEFAULT_GRACE_SECONDS, collect_garbage
from hub_msif.hub.server.store import git_blob_sha1

__all__ = ["DEFAULT_GRACE_SECONDS", "HubApiError", "HubServer", "collect_garbage", "git_blob_sha1", "load_tokens",
           "normalize_tokens", "parse_token_spec", "save_tokens"]
