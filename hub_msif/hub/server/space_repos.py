"""Space repos: what a Space adds to a repo (docs/design.md, "Hub server").

A Space is a repo like the others (commits, refs, LFS, downloads under ``/spaces/...``), with an
SDK and a requested hardware flavour kept in its ``repo.json``, and the ``models`` and
``datasets`` its README front matter names, which ``list_spaces(datasets=..., models=...)``
filters on. This server stores and serves Spaces but never runs them: a Space's runtime stage is
``STOPPED`` (``NO_APP_FILE`` until its ``app_file`` is committed), with the hardware requested.

    GET  /api/spaces/{ns}/{name}/runtime      get_space_runtime
    POST /api/spaces/{ns}/{name}/hardware     request_space_hardware (flavor)
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hub_msif.hub.server.api_errors import HubApiError
from hub_msif.hub.server.request_context import json_body, open_repo
from hub_msif.hub.server.store import Repo

SDKS = ("gradio", "streamlit", "docker", "static")  # the Hub's Space SDKs
_DEFAULT_APP_FILE = {"gradio": "app.py", "streamlit": "app.py"}


def _hardware(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        raise HubApiError(400, f"Invalid hardware flavor {value!r}")
    return value.strip()


def space_settings(body: dict) -> dict:
    """``{"sdk", "hardware"}`` of a Space creation request; ``HubApiError`` 400 without a known sdk."""
    sdk = body.get("sdk")
    if sdk not in SDKS:
        raise HubApiError(400, f"A Space needs an sdk, one of {', '.join(SDKS)}; got {sdk!r}")
    return {"sdk": sdk, "hardware": _hardware(body.get("hardware"))}


def _as_list(value) -> list[str]:
    if value is None:
        return []
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def runtime(repo: Repo, meta: dict, files: dict, card: dict | None) -> dict:
    """The runtime document of a Space (``SpaceRuntime``): stopped, or without an app file."""
    sdk = (card or {}).get("sdk") or meta.get("sdk")
    app_file = (card or {}).get("app_file") or (_DEFAULT_APP_FILE.get(sdk) if sdk is not None else None)
    stage = "NO_APP_FILE" if app_file and app_file not in files else "STOPPED"
    return {"stage": stage, "hardware": {"current": None, "requested": meta.get("hardware")},
            "storage": None, "gcTimeout": None, "replicas": {"current": 0, "requested": 1}}


def space_fields(repo: Repo, meta: dict, files: dict, card: dict | None) -> dict:
    """What repo info adds for a Space: sdk, runtime, and the models and datasets its card names."""
    card = card or {}
    return {"sdk": card.get("sdk") or meta.get("sdk"), "runtime": runtime(repo, meta, files, card),
            "subdomain": f"{repo.namespace}-{repo.name}".lower().replace(".", "-").replace("_", "-"),
            "host": None, "models": _as_list(card.get("models")), "datasets": _as_list(card.get("datasets"))}


def uses_all(repo: Repo, sha: str, query) -> bool:
    """Whether a repo at commit ``sha`` names every ``datasets`` and ``models`` value of a listing
    query in its card (always true of repos that are not Spaces, and without such values)."""
    wanted = {key: query.getlist(key) for key in ("datasets", "models")}
    if repo.type != "space" or not any(wanted.values()):
        return True
    card, _ = repo.card(repo.commit(sha)["files"])
    card = card or {}
    return all(set(values) <= set(_as_list(card.get(key))) for key, values in wanted.items())


async def space_runtime(repo_type: str, request: Request) -> Response:
    """``get_space_runtime``: the Space's stage and requested hardware."""
    repo, meta = open_repo(request, repo_type)
    sha = repo.resolve("main")
    files = repo.commit(sha)["files"]
    return JSONResponse(runtime(repo, meta, files, repo.card(files)[0]))


async def request_hardware(repo_type: str, request: Request) -> Response:
    """``request_space_hardware``: records the requested ``flavor`` and answers the runtime."""
    open_repo(request, repo_type, write=True)  # the rights first, the body then
    body = await json_body(request)
    hardware = _hardware(body.get("flavor"))
    if hardware is None:
        raise HubApiError(400, "a hardware request needs a flavor")
    store = request.app.state.store
    with store.lock:
        repo, meta = open_repo(request, repo_type, write=True)
        meta["hardware"] = hardware
        repo.write_meta(meta)
    files = repo.commit(repo.resolve("main"))["files"]
    return JSONResponse(runtime(repo, meta, files, repo.card(files)[0]))
