"""The HTTP API: the routes of the Hub that ``huggingface_hub`` and ``datasets`` call, as a starlette app.

Kept are the calls this project (push, pull, find, ``load_dataset`` of an index, ``push space``)
and its tests make, for model, dataset and space repos (``{t}`` is models, datasets or spaces)::

    GET    /api/whoami-v2                                    whoami
    POST   /api/validate-yaml                                README front matter check of a commit
    POST   /api/repos/create            DELETE /api/repos/delete
    GET    /api/{models,datasets,spaces}                     list_models / list_datasets / list_spaces
                                                             (filter, author, search, limit, full;
                                                             spaces also datasets, models)
    GET    /api/{t}/{ns}/{name}[/revision/{rev}]             repo info (sha, siblings, cardData, tags)
    PUT    /api/{t}/{ns}/{name}/settings                     private / public
    GET    /api/{t}/{ns}/{name}/tree/{rev}[/{path}]          tree listing (paginated)
    POST   /api/{t}/{ns}/{name}/paths-info/{rev}             get_paths_info, commit copies
    GET    /api/{t}/{ns}/{name}/refs                         branches, tags, pull requests
    GET    /api/{t}/{ns}/{name}/commits/{rev}                history (paginated)
    POST|DELETE /api/{t}/{ns}/{name}/branch/{branch}         POST /tag/{rev}   DELETE /tag/{tag}
    POST   /api/{t}/{ns}/{name}/preupload/{rev}              regular or LFS, per file
    POST   /api/{t}/{ns}/{name}/commit/{rev}                 one NDJSON commit
    POST   /[datasets/|spaces/]{ns}/{name}.git/info/lfs/objects/batch   LFS upload URLs
    PUT    /_lfs/{t}/{ns}/{name}/{sha256}                    one LFS upload (announced by the batch)
    GET|HEAD /[datasets/|spaces/]{ns}/{name}/resolve/{rev}/{path}   downloads, with Range
    GET    /api/spaces/{ns}/{name}/runtime                   Space runtime (``space_repos.py``)
    POST   /api/spaces/{ns}/{name}/hardware                  request Space hardware

The handlers are in ``repos.py`` (account, repos, listings, refs, downloads) and ``uploads.py``
(preupload, LFS, commits), and ``space_repos.py`` (what a Space adds); each repo route binds its repo type. Errors of every kind go out in
the Hub's shape (``errors.error_response``).
"""

from __future__ import annotations

from functools import partial
from typing import cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from hub_msif.hub.server import repos, space_repos, uploads
from hub_msif.hub.server.api_errors import HubApiError, error_response
from hub_msif.hub.server.request_context import REPO_KINDS, URL_PREFIX
from hub_msif.hub.server.store import Store


def build_app(store: Store) -> Starlette:
    """The starlette app of the API over ``store``; it expects the front door of ``app.py`` around it."""
    routes = [
        Route("/api/whoami-v2", repos.whoami),
        Route("/api/validate-yaml", uploads.validate_yaml, methods=["POST"]),
        Route("/api/repos/create", repos.create_repo, methods=["POST"]),
        Route("/api/repos/delete", repos.delete_repo, methods=["DELETE"]),
    ]
    for kind, repo_type in REPO_KINDS.items():
        api, web = f"/api/{kind}/{{ns}}/{{name}}", f"/{URL_PREFIX[repo_type]}{{ns}}/{{name}}"
        for path, handler, methods in [
            (f"/api/{kind}", repos.list_repos, ["GET"]),
            (api, repos.repo_info, ["GET"]),
            (api + "/revision/{rev:path}", repos.repo_info, ["GET"]),
            (api + "/settings", repos.update_settings, ["PUT"]),
            (api + "/tree/{rev}", repos.tree, ["GET"]),
            (api + "/tree/{rev}/{path:path}", repos.tree, ["GET"]),
            (api + "/paths-info/{rev:path}", repos.paths_info, ["POST"]),
            (api + "/refs", repos.list_refs, ["GET"]),
            (api + "/commits/{rev:path}", repos.list_commits, ["GET"]),
            (api + "/branch/{branch:path}", repos.create_branch, ["POST"]),
            (api + "/branch/{branch:path}", repos.delete_branch, ["DELETE"]),
            (api + "/tag/{rev:path}", repos.create_tag, ["POST"]),
            (api + "/tag/{tag:path}", repos.delete_tag, ["DELETE"]),
            (web + "/resolve/{rev}/{path:path}", repos.resolve_file, ["GET"]),  # starlette adds HEAD
            (api + "/preupload/{rev:path}", uploads.preupload, ["POST"]),
            (web + ".git/info/lfs/objects/batch", uploads.lfs_batch, ["POST"]),
            (f"/_lfs/{kind}/{{ns}}/{{name}}/{{oid}}", uploads.lfs_upload, ["PUT"]),
            (api + "/commit/{rev:path}", uploads.commit, ["POST"]),
        ]:
            routes.append(Route(path, partial(handler, repo_type), methods=methods))
    for path, handler, methods in [("/api/spaces/{ns}/{name}/runtime", space_repos.space_runtime, ["GET"]),
                                   ("/api/spaces/{ns}/{name}/hardware", space_repos.request_hardware, ["POST"])]:
        routes.insert(4, Route(path, partial(handler, "space"), methods=methods))
    app = Starlette(routes=routes, exception_handlers={
        HubApiError: _on_api_error, HTTPException: _on_http_error, Exception: _on_crash})
    app.state.store = store
    return app


# starlette types every exception handler over Exception; each of these is registered for one class
async def _on_api_error(request: Request, exc: Exception) -> Response:
    return error_response(cast(HubApiError, exc))


async def _on_http_error(request: Request, exc: Exception) -> Response:
    # starlette's own 404 and 405, in the Hub's error shape
    http_error = cast(HTTPException, exc)
    return error_response(HubApiError(http_error.status_code, f"{http_error.detail}: {request.method} {request.url.path}"))


async def _on_crash(request: Request, exc: Exception) -> Response:
    # a bug: answer 500 with the reason (the front door logs the traceback)
    return error_response(HubApiError(500, f"internal server error: {type(exc).__name__}: {exc}"))
