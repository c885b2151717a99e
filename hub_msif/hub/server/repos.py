"""API handlers of the caller's account, and of repos and their contents: create, delete,
settings, info and search, tree and paths-info listings, refs and history, branches and tags,
file downloads (with ``Range``). Each repo handler takes the repo type bound by ``routes.py``.

Handlers run on the event loop and read the store synchronously: its files are small and local,
and downloads stream from disk through starlette's ``FileResponse``.
"""

from __future__ import annotations

import hashlib
import mimetypes
from urllib.parse import parse_qs

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from hub_msif.hub.server import views
from hub_msif.hub.server.api_errors import INVALID_CREDENTIALS, HubApiError, entry_not_found, revision_not_found
from hub_msif.hub.server.request_context import (
    URL_PREFIX,
    caller_of,
    cursor,
    json_body,
    open_repo,
    paginated,
    path_param,
    read_body,
    repo_url,
    store_of,
    truthy,
)
from hub_msif.hub.server.space_repos import space_settings, uses_all
from hub_msif.hub.server.store import RESERVED_NAMESPACES, SHA1_RE, Repo, valid_name, valid_ref_name

TREE_PAGE_SIZE, TREE_PAGE_SIZE_EXPAND = 1000, 50  # the Hub's page sizes
LIST_PAGE_SIZE = 1000
COMMITS_PAGE_SIZE = 100


# -- account ---------------------------------------------------------------------------------------


async def whoami(request: Request) -> Response:
    """The token's user, its organizations and the token's role."""
    caller = caller_of(request)
    if caller.user is None:
        raise HubApiError(401, INVALID_CREDENTIALS)
    return JSONResponse({
        "type": "user", "id": hashlib.sha1(caller.user.encode()).hexdigest()[:24], "name": caller.user,
        "fullname": caller.user.capitalize(), "email": f"{caller.user}@example.invalid", "emailVerified": True,
        "canPay": False, "isPro": False, "periodEnd": None, "avatarUrl": "",
        "orgs": [{"type": "org", "name": org, "fullname": org,
                  "roleInOrg": "admin" if caller.role == "write" else "read"} for org in caller.orgs],
        "auth": {"type": "access_token", "accessToken": {
            "displayName": f"{caller.user}-token", "role": caller.role, "createdAt": "2024-01-01T00:00:00.000Z"}},
    })


# -- repos -----------------------------------------------------------------------------------------


def _body_repo_type(body: dict) -> str:
    repo_type = body.get("type") or "model"
    if repo_type not in URL_PREFIX:
        raise HubApiError(400, f"Invalid repo type {repo_type!r}: this server keeps model, dataset and space repos")
    return repo_type


async def create_repo(request: Request) -> Response:
    """A new repo ``{organization or the caller}/{name}``; 409 (with its ``url``) when it exists."""
    caller = caller_of(request)
    if caller.anonymous:  # before the body is read: a caller without a token sends nothing we keep
        raise HubApiError(401, "You must be authenticated with a write token to create a repo")
    body = await json_body(request)
    repo_type = _body_repo_type(body)
    name = str(body.get("name") or "")
    namespace = body.get("organization") or caller.user
    if namespace is None:
        raise HubApiError(401, "You must be authenticated with a write token to create a repo")
    if not (valid_name(namespace) and valid_name(name)) or namespace in RESERVED_NAMESPACES:
        raise HubApiError(400, f"Invalid repo name {namespace}/{name}: use letters, digits, '-', '_', '.' (at most "
                               "96), no '--' or '..', not ending in .git; the namespace must not be one of "
                               f"{', '.join(sorted(RESERVED_NAMESPACES))}")
    author = caller.require_write(namespace, f"create a {repo_type} repo under the namespace {namespace}")
    private = body.get("visibility") == "private" or bool(body.get("private"))  # older clients send "private"
    extra = space_settings(body) if repo_type == "space" else None
    store = store_of(request)
    repo = store.create_repo(repo_type, namespace, name, private, author, extra)
    if repo is None:
        url = repo_url(request, store.repo(repo_type, namespace, name))
        raise HubApiError(409, f"You already created this {repo_type} repo", body={"url": url})
    url, meta = repo_url(request, repo), repo.read_meta()
    if meta is None:  # deleted by another request in between (it answered 500 with a TypeError before)
        raise HubApiError(500, f"internal server error: the {repo_type} repo {repo.id} was deleted while being created")
    return JSONResponse({"url": url, "name": repo.id, "id": meta["_id"]})


async def delete_repo(request: Request) -> Response:
    """Deletes the repo ``{organization or the caller}/{name}`` of the body's ``type``."""
    if caller_of(request).anonymous:
        raise HubApiError(401, "You must be authenticated with a write token to delete a repo")
    body = await json_body(request)
    namespace = body.get("organization") or caller_of(request).user or ""
    repo, _ = open_repo(request, _body_repo_type(body), namespace, str(body.get("name") or ""), write=True)
    store_of(request).delete_repo(repo)
    return JSONResponse({})


async def update_settings(repo_type: str, request: Request) -> Response:
    """Makes a repo private or public (``visibility`` or ``private``); gating is not supported."""
    open_repo(request, repo_type, write=True)  # the rights first, the body then
    body = await json_body(request)
    if body.get("gated") not in (None, False):
        raise HubApiError(400, "gated repos are not supported by this server")
    if body.get("visibility", "public") not in ("private", "public"):
        raise HubApiError(400, "visibility must be private or public")
    store = store_of(request)
    with store.lock:
        repo, meta = open_repo(request, repo_type, write=True)
        if "visibility" in body:
            meta["private"] = body["visibility"] == "private"
        if "private" in body:
            meta["private"] = bool(body["private"])
        repo.write_meta(meta)
    return JSONResponse({"private": meta["private"], "gated": False})


async def repo_info(repo_type: str, request: Request) -> Response:
    """Info on a repo at ``main`` or at the revision in the path (sizes and blob ids with ``?blobs=true``)."""
    repo, meta = open_repo(request, repo_type)
    sha = repo.resolve(path_param(request, "rev", "main"))
    blobs = truthy(request.query_params.get("blobs"))
    return JSONResponse(views.repo_info(repo, meta, sha, siblings=True, blobs=blobs))


async def list_repos(repo_type: str, request: Request) -> Response:
    """The repos the caller may see, at ``main``: every ``filter`` among the tags, the ``author``'s,
    every ``search`` in the id, at most ``limit``; with siblings and card data when ``full``. Spaces
    also by the ``datasets`` and ``models`` their card names (``list_spaces(datasets=...)``)."""
    query = request.query_params
    filters, author = query.getlist("filter"), query.get("author")
    searches = [s.lower() for s in query.getlist("search") if s]
    full = truthy(query.get("full"))
    caller = caller_of(request)
    items = []
    for repo in store_of(request).repos(repo_type, author):
        meta = repo.read_meta()
        try:
            sha = repo.refs()["branches"].get("main")
        except (OSError, ValueError):  # one damaged repo must not break the listing of the others
            continue
        if meta is None or sha is None or not caller.can_read(repo.namespace, bool(meta.get("private"))):
            continue
        if not all(s in repo.id.lower() for s in searches):
            continue
        info = views.repo_info(repo, meta, sha, siblings=full, card_data=full)
        if all(f in info["tags"] for f in filters) and uses_all(repo, sha, query):
            items.append(info)
    if "limit" in query:
        try:
            items = items[:max(0, int(query["limit"]))]
        except ValueError:
            raise HubApiError(400, f"limit must be an integer, got {query['limit']!r}") from None
    return paginated(request, items, LIST_PAGE_SIZE)


# -- refs, history, files --------------------------------------------------------------------------


def _with_last_commits(repo: Repo, head: str, entries: list[dict]) -> None:
    """Adds ``lastCommit`` to tree ``entries`` (what ``expand=true`` asks for)."""
    last = repo.last_commits(head, {e["path"]: e["type"] == "directory" for e in entries})
    for entry in entries:
        if entry["path"] in last:
            entry["lastCommit"] = last[entry["path"]]


async def tree(repo_type: str, request: Request) -> Response:
    """The entries under a folder (all of them, folders too, with ``recursive``), or one file's;
    paginated, with each entry's last commit when ``expand``."""
    repo, _ = open_repo(request, repo_type)
    sha = repo.resolve(path_param(request, "rev"))
    path = path_param(request, "path").strip("/")
    recursive, expand = truthy(request.query_params.get("recursive")), truthy(request.query_params.get("expand"))
    files = repo.commit(sha)["files"]
    folders = views.folders(files)
    if path in files:
        entries = [views.file_entry(path, files[path])]
    elif path and path not in folders:
        raise entry_not_found(path, sha)
    else:
        prefix = path + "/" if path else ""

        def wanted(p: str) -> bool:
            return p.startswith(prefix) and (recursive or "/" not in p[len(prefix):])

        entries = ([views.folder_entry(d, files) for d in sorted(folders) if wanted(d)]
                   + [views.file_entry(p, files[p]) for p in sorted(files) if wanted(p)])
        if recursive:
            entries.sort(key=lambda e: e["path"])
    page_size = TREE_PAGE_SIZE_EXPAND if expand else TREE_PAGE_SIZE
    if expand:  # only the page that goes out: walking the history is the slow part
        start = cursor(request)
        _with_last_commits(repo, sha, entries[start:start + page_size])
    return paginated(request, entries, page_size)


async def paths_info(repo_type: str, request: Request) -> Response:
    """Tree entries of the form-encoded ``paths`` that exist (missing ones are left out)."""
    repo, _ = open_repo(request, repo_type)
    form = parse_qs((await read_body(request)).decode("utf-8", errors="replace"), keep_blank_values=True)
    sha = repo.resolve(path_param(request, "rev"))
    files = repo.commit(sha)["files"]
    folders = views.folders(files)
    entries = []
    for path in (p.strip("/") for p in form.get("paths", [])):
        if path in files:
            entries.append(views.file_entry(path, files[path]))
        elif path in folders:
            entries.append(views.folder_entry(path, files))
    if truthy((form.get("expand") or ["false"])[-1]):
        _with_last_commits(repo, sha, entries)
    return JSONResponse(entries)


async def list_refs(repo_type: str, request: Request) -> Response:
    """Branches, tags and (with ``include_prs``) pull requests, each with its commit."""
    repo, _ = open_repo(request, repo_type)
    return JSONResponse(views.refs_json(repo.refs(), truthy(request.query_params.get("include_prs"))))


async def list_commits(repo_type: str, request: Request) -> Response:
    """The history of the revision in the path, newest first, paginated."""
    repo, _ = open_repo(request, repo_type)
    return paginated(request, views.history(repo, repo.resolve(path_param(request, "rev"))), COMMITS_PAGE_SIZE)


async def create_branch(repo_type: str, request: Request) -> Response:
    """A new branch at ``startingPoint`` (default ``main``); 409 if it exists."""
    branch = path_param(request, "branch")
    repo, _ = open_repo(request, repo_type, write=True)
    body = await json_body(request)
    if branch.startswith("refs/") or SHA1_RE.match(branch) or not valid_ref_name(branch):
        raise HubApiError(400, f"Invalid reference for a branch: {branch!r}")
    if not repo.add_ref("branches", branch, repo.resolve(str(body.get("startingPoint") or "main"))):
        raise HubApiError(409, f"Reference already exists: refs/heads/{branch}")
    return JSONResponse({})


async def delete_branch(repo_type: str, request: Request) -> Response:
    """Deletes a branch (never ``main``); RevisionNotFound if there is no such branch."""
    branch = path_param(request, "branch")
    repo, _ = open_repo(request, repo_type, write=True)
    if branch == "main":
        raise HubApiError(403, "Cannot delete the default branch main")
    if not repo.remove_ref("branches", branch):
        raise revision_not_found(branch)
    return JSONResponse({})


async def create_tag(repo_type: str, request: Request) -> Response:
    """Tags the revision in the path with the body's ``tag``; 409 if the tag exists."""
    repo, _ = open_repo(request, repo_type, write=True)
    tag = (await json_body(request)).get("tag")
    if not isinstance(tag, str) or tag.startswith("refs/") or not valid_ref_name(tag):
        raise HubApiError(400, f"Invalid tag name: {tag!r}")
    if not repo.add_ref("tags", tag, repo.resolve(path_param(request, "rev"))):
        raise HubApiError(409, f"Tag {tag} already exists")
    return JSONResponse({})


async def delete_tag(repo_type: str, request: Request) -> Response:
    """Deletes a tag; RevisionNotFound if there is no such tag."""
    tag = path_param(request, "tag")
    repo, _ = open_repo(request, repo_type, write=True)
    if not repo.remove_ref("tags", tag):
        raise revision_not_found(tag)
    return JSONResponse({})


async def resolve_file(repo_type: str, request: Request) -> Response:
    """A file's content at a revision (HEAD: its headers only), with ``Range`` support. ``ETag`` is
    the client's cache key: the git blob id of a regular file, the sha256 of an LFS file."""
    repo, _ = open_repo(request, repo_type)
    sha = repo.resolve(path_param(request, "rev"))
    path = path_param(request, "path")
    entry = repo.commit(sha)["files"].get(path)
    if entry is None:
        raise entry_not_found(path, sha)
    etag = f'"{entry["lfs"] or entry["oid"]}"'
    headers = {"X-Repo-Commit": sha, "ETag": etag, "Cache-Control": "private, max-age=0"}
    if entry.get("lfs"):
        headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(entry["size"])})
    media_type = mimetypes.guess_type(path)[0] or "application/octet-stream"
    return FileResponse(repo.content_path(entry), headers=headers, media_type=media_type)
