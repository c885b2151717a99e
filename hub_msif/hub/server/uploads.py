"""API handlers of the write path of a commit, in the order the client calls them.

1. ``validate-yaml``: a commit that adds the root ``README.md`` has its front matter checked first.
2. ``preupload``: the server decides, per file, "regular" (sent inline, base64, in the commit) or
   "lfs" (uploaded apart), and names the files already there, which the client then skips.
3. LFS ``batch`` (authenticated) hands out one upload URL per missing object; the ``PUT`` to it
   carries no token, so only announced objects are accepted, and their sha256 and size are checked.
4. ``commit``: one NDJSON body applied as one commit (``store.Repo.commit_changes``); a commit
   that fails releases the uploads it named (``store.Repo.release_uploads``).

Every handler checks the caller's rights before it reads a body, and reads it through
``request_context.read_body`` (413 past ``--max-request-bytes``, 1 MiB without a token).
"""

from __future__ import annotations

import base64
import json
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hub_msif.hub.server.api_errors import HubApiError
from hub_msif.hub.server.card_metadata import parse_front_matter
from hub_msif.hub.server.gitattributes import lfs_rules, tracked_by_lfs
from hub_msif.hub.server.request_context import (
    base_url,
    caller_of,
    declared_length,
    json_body,
    open_repo,
    path_param,
    read_body,
    repo_url,
    store_of,
    truthy,
)
from hub_msif.hub.server.store import SHA256_RE, Change, valid_repo_path

LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # larger files go to LFS, and are refused inline (as on the Hub)


async def validate_yaml(request: Request) -> Response:
    """200 when the README text's front matter parses, else 400 with the reason (always JSON: the
    client reads the body before the status)."""
    content = (await json_body(request)).get("content")
    error = "content must be a string" if not isinstance(content, str) else parse_front_matter(content)[1]
    if error:
        return JSONResponse({"errors": [{"message": error}], "warnings": []}, status_code=400)
    return JSONResponse({"errors": [], "warnings": []})


async def preupload(repo_type: str, request: Request) -> Response:
    """For each announced file: "lfs" (over 10 MiB, a NUL byte in its sample, or a ``.gitattributes``
    LFS pattern) or "regular", and the id of the file already there (the client skips equal ones)."""
    repo, _ = open_repo(request, repo_type, write=True)  # the rights first, the body then
    body = await json_body(request)
    sha = repo.resolve(path_param(request, "rev"))
    files = repo.commit(sha)["files"]
    attributes = files.get(".gitattributes")
    rules = lfs_rules(repo.read_content(attributes).decode("utf-8", "replace")) if attributes else []
    answers = []
    for item in body.get("files") or []:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise HubApiError(400, "every file needs a path")
        path = item["path"]
        try:
            sample = base64.b64decode(item.get("sample") or "")
        except ValueError:
            raise HubApiError(400, f"sample of {path} is not base64") from None
        lfs = int(item.get("size") or 0) > LFS_SIZE_THRESHOLD or b"\0" in sample or tracked_by_lfs(path, rules)
        remote = files.get(path)
        answers.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": (remote["lfs"] or remote["oid"]) if remote else None})
    return JSONResponse({"files": answers, "commitOid": sha})


async def lfs_batch(repo_type: str, request: Request) -> Response:
    """Upload URLs for the LFS objects not stored yet (the ones stored get no ``actions``)."""
    repo, _ = open_repo(request, repo_type, write=True)  # the rights first, the body then
    body = await json_body(request)
    if body.get("operation", "upload") != "upload":
        raise HubApiError(400, "this server only supports the LFS upload operation")
    store = store_of(request)
    objects = []
    for obj in body.get("objects") or []:
        oid, size = str(obj.get("oid", "")), obj.get("size")
        if not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
            objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "invalid oid or size"}})
            continue
        if repo.has_lfs(oid, size):
            repo.keep_lfs(oid)  # the client names it in its commit without uploading it
            objects.append({"oid": oid, "size": size})
            continue
        store.announce_lfs(repo, oid, size)
        href = f"{base_url(request)}/_lfs/{repo_type}s/{quote(repo.namespace)}/{quote(repo.name)}/{oid}"
        objects.append({"oid": oid, "size": size, "authenticated": True,
                        "actions": {"upload": {"href": href, "header": {}, "expires_in": 86400}}})
    return JSONResponse({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        media_type="application/vnd.git-lfs+json")


async def lfs_upload(repo_type: str, request: Request) -> Response:
    """Receives an announced LFS object (the client sends no token here: the batch request was the
    authenticated one); its sha256 and size are checked before it is stored."""
    store = store_of(request)
    repo = store.repo(repo_type, path_param(request, "ns"), path_param(request, "name"))
    oid = path_param(request, "oid")
    size = store.announced_lfs_size(repo, oid)
    if size is None:
        raise HubApiError(403, f"LFS object {oid} was not announced by an LFS batch request to {repo.id}")
    declared = declared_length(request)
    if declared is not None and declared != size:
        raise HubApiError(400 if declared < size else 413,
                          f"size mismatch: the body has {declared} bytes, the LFS batch announced {size}")
    with repo.lfs_upload(oid, size) as upload:  # streamed to disk, never held in memory
        async for chunk in request.stream():
            upload.write(chunk)
    return Response(status_code=200)


async def commit(repo_type: str, request: Request) -> Response:
    """One commit from an NDJSON body (a header line, then file, lfsFile, deletedFile and
    deletedFolder lines) to the branch in the path, or to a new pull request with ``create_pr``."""
    repo, _ = open_repo(request, repo_type, write=True)  # the rights first: no body is read for a 401 or 403
    header, changes = _parse_commit(await read_body(request))
    parent = header.get("parentCommit")
    try:
        sha, pr = repo.commit_changes(path_param(request, "rev"), changes, str(header["summary"]),
                                      str(header.get("description") or ""), caller_of(request).user,
                                      parent=str(parent) if parent else None,
                                      create_pr=truthy(request.query_params.get("create_pr")))
    except BaseException:
        # A failed commit releases the uploads it named that no commit references: they would
        # otherwise hold their disk space (a full disk stays full) for the whole grace period.
        repo.release_uploads([c.oid for c in changes if c.kind == "lfsFile"])
        raise
    url = repo_url(request, repo)
    return JSONResponse({"success": True, "commitOid": sha, "commitUrl": f"{url}/commit/{sha}",
                         "commitMessage": header["summary"], "hookOutput": "",
                         "pullRequestUrl": f"{url}/discussions/{pr}" if pr else None})


def _parse_commit(raw: bytes) -> tuple[dict, list[Change]]:
    """``(header, changes)`` of an NDJSON commit payload; ``HubApiError`` 400 for a bad line, path,
    encoding or oid, or an inline file over 10 MiB."""
    header, changes = None, []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError):
            raise HubApiError(400, f"line {number} of the commit payload is not a {{key, value}} JSON object") from None
        if not isinstance(value, dict):
            raise HubApiError(400, f"line {number} of the commit payload has no JSON object as its value")
        if key == "header":
            header = value
            continue
        if key not in ("file", "lfsFile", "deletedFile", "deletedFolder"):
            raise HubApiError(400, f"unknown commit operation {key!r}")
        path = str(value.get("path", ""))
        path = path.rstrip("/") if key == "deletedFolder" else path
        if not valid_repo_path(path):
            raise HubApiError(400, f"Invalid path in repo: {value.get('path')!r}")
        if key == "file":
            data = _inline_content(path, value)
            if path == "README.md":  # the card is parsed once here, never expanded per request
                error = parse_front_matter(data.decode("utf-8", errors="replace"))[1]
                if error:
                    raise HubApiError(400, f"Invalid README.md: {error}")
            changes.append(Change(key, path, data=data))
        elif key == "lfsFile":
            oid = str(value.get("oid", ""))
            if value.get("algo", "sha256") != "sha256" or not SHA256_RE.match(oid):
                raise HubApiError(400, f"invalid LFS oid for {path}")
            changes.append(Change(key, path, oid=oid, size=value.get("size")))
        else:
            changes.append(Change(key, path))
    if header is None or not str(header.get("summary") or "").strip():
        raise HubApiError(400, "the commit needs a header line with a non-empty summary")
    return header, changes


def _inline_content(path: str, value: dict) -> bytes:
    """The content of an inline ``file`` line (base64 unless its ``encoding`` says otherwise)."""
    try:
        content = value.get("content", "")
        data = (base64.b64decode(content, validate=True) if value.get("encoding", "base64") == "base64"
                else str(content).encode())
    except ValueError:
        raise HubApiError(400, f"content of {path} is not valid base64") from None
    if len(data) > LFS_SIZE_THRESHOLD:
        raise HubApiError(400, f"Your push was rejected: {path} is larger than 10 MiB and must be uploaded with LFS")
    return data
