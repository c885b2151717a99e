"""The JSON documents the API answers with, built from stored repos: repo info (also the items of
repo listings), tree and paths-info entries, refs and commit lists.

Key names follow the Hub: siblings say ``blobId`` and ``lfs.sha256`` where tree entries say
``oid`` and ``lfs.oid``; an LFS file's ``oid`` is the git id of its pointer file.
"""

from __future__ import annotations

import hashlib
from typing import Any

from hub_msif.hub.server.card_metadata import card_tags
from hub_msif.hub.server.space_repos import space_fields
from hub_msif.hub.server.store import Repo, lfs_pointer


def repo_info(repo: Repo, meta: dict, sha: str, siblings: bool, blobs: bool = False,
              card_data: bool = True) -> dict:
    """Info on ``repo`` (its ``repo.json`` ``meta``) at commit ``sha``; with ``siblings`` its file
    list, with sizes and blob ids when ``blobs``; with ``card_data`` the README front matter."""
    commit = repo.commit(sha)
    files = commit["files"]
    card, _ = repo.card(files)
    info = {
        "_id": meta.get("_id"), "id": repo.id, "author": repo.namespace, "sha": sha,
        "lastModified": commit["date"], "createdAt": meta.get("createdAt"), "private": bool(meta.get("private")),
        "gated": False, "disabled": False, "downloads": 0, "downloadsAllTime": 0, "likes": 0, "trendingScore": 0,
        "tags": card_tags(repo.type, card), "usedStorage": sum(e["size"] for e in files.values()),
    }
    if card is not None and card_data:
        info["cardData"] = card
    if siblings:
        info["siblings"] = [_sibling(path, files[path], blobs) for path in sorted(files)]
    card = card or {}
    if repo.type == "model":
        info["modelId"] = repo.id
        info.update({key: card[key] for key in ("library_name", "pipeline_tag") if card.get(key)})
    elif repo.type == "space":
        info.update(space_fields(repo, meta, files, card))
    else:
        info.update({"description": card.get("pretty_name") or "", "citation": None,
                     "paperswithcode_id": card.get("paperswithcode_id")})
    return info


def _sibling(path: str, entry: dict, blobs: bool) -> dict:
    sibling: dict[str, Any] = {"rfilename": path}
    if blobs:
        sibling.update({"size": entry["size"], "blobId": entry["oid"]})
        if entry.get("lfs"):
            sibling["lfs"] = {"size": entry["size"], "sha256": entry["lfs"],
                              "pointerSize": len(lfs_pointer(entry["lfs"], entry["size"]))}
    return sibling


def file_entry(path: str, entry: dict) -> dict:
    """The tree entry of the file ``path`` whose commit record is ``entry``."""
    out = {"type": "file", "oid": entry["oid"], "size": entry["size"], "path": path}
    if entry.get("lfs"):
        out["lfs"] = {"oid": entry["lfs"], "size": entry["size"],
                      "pointerSize": len(lfs_pointer(entry["lfs"], entry["size"]))}
    return out


def folder_entry(path: str, files: dict) -> dict:
    """The tree entry of the folder ``path`` in the file table ``files``; its ``oid`` changes
    whenever anything inside it does."""
    prefix = path + "/"
    digest = hashlib.sha1()
    for p in sorted(files):
        if p.startswith(prefix):
            digest.update(f"{p[len(prefix):]}\0{files[p]['oid']}\n".encode())
    return {"type": "directory", "oid": digest.hexdigest(), "size": 0, "path": path}


def folders(files: dict) -> set[str]:
    """Every folder that holds a file of the file table ``files``, at any depth."""
    out: set[str] = set()
    for path in files:
        parts = path.split("/")[:-1]
        out.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def refs_json(refs: dict, include_prs: bool) -> dict:
    """The ``/refs`` answer for the store's ``refs`` (pull requests only when asked for)."""
    out = {
        "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": s} for b, s in sorted(refs["branches"].items())],
        "converts": [],
        "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": s} for t, s in sorted(refs["tags"].items())],
    }
    if include_prs:
        out["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": s}
                               for n, s in sorted(refs["pulls"].items(), key=lambda kv: int(kv[0]))]
    return out


def history(repo: Repo, head: str) -> list[dict]:
    """The ``/commits`` items from ``head`` back to the first commit, newest first."""
    items = []
    sha: str | None = head
    while sha:
        commit = repo.commit(sha)
        items.append({"id": sha, "title": commit["title"], "message": commit["message"], "date": commit["date"],
                      "authors": [{"user": commit["author"], "avatar": ""}] if commit.get("author") else []})
        sha = commit.get("parent")
    return items
