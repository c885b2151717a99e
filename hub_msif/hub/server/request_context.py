"""What the API handlers read from a request, and how they answer with lists.

A handler gets the caller (authenticated by the front door in ``app.py`` as
``request.state.caller``), its path parameters (still percent-encoded: the front door routes on
the raw path, since a revision such as ``refs%2Fpr%2F1`` is one segment), its JSON body, and the
repo it names with the caller's rights checked. Long lists go out in pages linked by a ``Link:
<next page>; rel="next"`` header, which the client follows verbatim.
"""

from __future__ import annotations

import json
from urllib.parse import unquote, urlencode

from starlette.requests import Request
from starlette.responses import JSONResponse

from hub_msif.hub.server.api_errors import HubApiError, repo_not_found
from hub_msif.hub.server.auth import Caller
from hub_msif.hub.server.store import Repo, Store, valid_name

REPO_KINDS = {"models": "model", "datasets": "dataset", "spaces": "space"}  # API path segment -> repo type
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}  # repo type -> prefix of its web and download URLs


def store_of(request: Request) -> Store:
    """The store the app serves."""
    return request.app.state.store


def caller_of(request: Request) -> Caller:
    """Who sent the request (anonymous when the front door did not say)."""
    return getattr(request.state, "caller", None) or Caller()


def path_param(request: Request, key: str, default: str = "") -> str:
    """The path parameter ``key``, percent-decoded."""
    return unquote(request.path_params.get(key, default))


def truthy(value) -> bool:
    """Whether a query or form value means yes ("true", "1", ...)."""
    return str(value).lower() in ("1", "true", "yes", "on")


def base_url(request: Request) -> str:
    """``http://host[:port]`` as the client reached the server (for the URLs handed back)."""
    return f"http://{request.headers['host']}" if "host" in request.headers else str(request.base_url).rstrip("/")


def repo_url(request: Request, repo: Repo) -> str:
    """The web URL of ``repo``: ``{base}/[datasets/|spaces/]{namespace}/{name}``."""
    return f"{base_url(request)}/{URL_PREFIX[repo.type]}{repo.id}"


DEFAULT_MAX_REQUEST_BYTES = 100 * 1000 * 1000  # the Hub's limit on a commit payload (non-LFS content)
ANONYMOUS_MAX_REQUEST_BYTES = 1024 * 1024  # bodies sent without a token (paths-info, validate-yaml)


def body_limit(request: Request) -> int:
    """How many bytes this request's body may have: the server's ``max_request_bytes`` (``hub
    serve --max-request-bytes``), at most 1 MiB for a caller without a token."""
    limit = getattr(request.app.state, "max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)
    return min(limit, ANONYMOUS_MAX_REQUEST_BYTES) if caller_of(request).anonymous else limit


def too_large(size: int | None, limit: int) -> HubApiError:
    """The 413 answer for a body over ``limit`` bytes."""
    declared = f" ({size} bytes)" if size is not None else ""
    return HubApiError(413, f"Payload Too Large: the request body{declared} exceeds this server's limit of {limit} "
                            "bytes (hub serve --max-request-bytes); send large files through LFS")


def declared_length(request: Request) -> int | None:
    """The ``Content-Length`` the client announced (None when absent); 400 when it is not a number."""
    value = request.headers.get("content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise HubApiError(400, f"invalid Content-Length {value!r}") from None


async def read_body(request: Request) -> bytes:
    """The request body, read only up to ``body_limit`` bytes: 413 as soon as the announced length
    or the bytes received go over it, so a hostile body never sits in memory whole. Handlers
    check the caller's rights before calling it."""
    limit = body_limit(request)
    size = declared_length(request)
    if size is not None and size > limit:
        raise too_large(size, limit)
    chunks, received = [], 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large(None, limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def json_body(request: Request) -> dict:
    """The request body (``read_body``) as a JSON object (``{}`` when empty); ``HubApiError`` 400 otherwise."""
    raw = await read_body(request)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise HubApiError(400, f"request body is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise HubApiError(400, "request body must be a JSON object")
    return data


def open_repo(request: Request, repo_type: str, namespace: str | None = None, name: str | None = None,
              write: bool = False) -> tuple[Repo, dict]:
    """``(repo, its metadata)`` named by the path (or by ``namespace`` and ``name``), if the caller may
    see it (and write to it, with ``write``); ``HubApiError`` otherwise."""
    caller = caller_of(request)
    namespace = path_param(request, "ns") if namespace is None else namespace
    name = path_param(request, "name") if name is None else name
    if not (valid_name(namespace) and valid_name(name)):
        raise repo_not_found(caller.anonymous)
    repo = store_of(request).repo(repo_type, namespace, name)
    meta = repo.read_meta()
    if meta is None or not caller.can_read(namespace, bool(meta.get("private"))):
        raise repo_not_found(caller.anonymous)
    if write:
        caller.require_write(namespace, f"write to the {repo_type} repo {repo.id}")
    return repo, meta


def cursor(request: Request) -> int:
    """The index of the first item of the requested page (``?cursor=``, default 0)."""
    try:
        return int(request.query_params.get("cursor", "0"))
    except ValueError:
        raise HubApiError(400, "invalid cursor") from None


def paginated(request: Request, items: list, page_size: int) -> JSONResponse:
    """One page of ``items`` from ``?cursor=``, with a ``Link: <next page>; rel="next"`` header
    while more remain (the client follows it verbatim)."""
    start = cursor(request)
    headers = {}
    if start + page_size < len(items):
        params = [(k, v) for k, v in request.query_params.multi_items() if k != "cursor"]
        params.append(("cursor", str(start + page_size)))
        headers["Link"] = f'<{base_url(request)}{request.url.path}?{urlencode(params)}>; rel="next"'
    return JSONResponse(items[start:start + page_size], headers=headers)
