"""Tokens and callers: who sent a request, and what they may read and write.

A token belongs to a user, may belong to organizations, and has the role ``write`` (the default)
or ``read``. A caller may write to its user's and its organizations' namespaces with a ``write``
token only; a private repo is visible to its namespace only. Requests without a token are
anonymous and read public repos. Tokens are kept in ``<root>/tokens.json`` as
``{token: {"user", "orgs", "role"}}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hub_msif.artifacts.atomic import atomic_write_json
from hub_msif.hub.server.api_errors import INVALID_CREDENTIALS, HubApiError
from hub_msif.hub.server.store import valid_name

_SPEC_FORM = "TOKEN=USER[:ORG1,ORG2][:read]"


@dataclass(frozen=True)
class Caller:
    """The sender of a request: ``user`` None for anonymous, else a token's user, orgs and role."""

    user: str | None = None
    orgs: tuple[str, ...] = ()
    role: str = "write"

    @property
    def anonymous(self) -> bool:
        """Whether the request came without a token."""
        return self.user is None

    def namespaces(self) -> set[str]:
        """The namespaces this caller owns: its user and its organizations (none when anonymous)."""
        return set() if self.user is None else {self.user, *self.orgs}

    def can_read(self, namespace: str, private: bool) -> bool:
        """Whether a repo of ``namespace`` (private or not) is visible to this caller."""
        return not private or namespace in self.namespaces()

    def require_write(self, namespace: str, what: str) -> str:
        """Raises ``HubApiError`` (401 anonymous, 403 read-only or foreign namespace) unless this
        caller may ``what`` (e.g. "create a dataset repo ...") in ``namespace``; returns the caller's user name."""
        if self.user is None:
            raise HubApiError(401, f"You must be authenticated with a write token to {what}")
        if self.role != "write":
            raise HubApiError(403, f"You don't have the rights to {what}: the token of {self.user} is read-only "
                                   "(it needs the write role)")
        if namespace not in self.namespaces():
            raise HubApiError(403, f"You don't have the rights to {what}: {self.user} is neither {namespace} nor "
                                   f"a member of the {namespace} organization")
        return self.user


class TokenBook:
    """The tokens a server accepts: given ones, or ``<root>/tokens.json`` (re-read when it changes)."""

    def __init__(self, root: Path, tokens: dict | None = None) -> None:
        self._path = Path(root) / "tokens.json"
        self._from_file = tokens is None
        self._tokens = normalize_tokens(tokens) if tokens is not None else {}
        self._mtime: float | None = None

    def tokens(self) -> dict[str, dict]:
        """``{token: {"user", "orgs", "role"}}`` as of now."""
        if self._from_file:
            # `hub serve --token` may add tokens to the file of a running server's root
            mtime = self._path.stat().st_mtime if self._path.is_file() else None
            if mtime != self._mtime:
                self._tokens = load_tokens(self._path.parent) if mtime is not None else {}
                self._mtime = mtime
        return self._tokens

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller of an ``Authorization`` header value (None: anonymous); raises ``HubApiError``
        401 for any header that is not ``Bearer <known token>``."""
        if not authorization:
            return Caller()
        scheme, _, token = authorization.partition(" ")
        info = self.tokens().get(token.strip()) if scheme.lower() == "bearer" else None
        if info is None:
            raise HubApiError(401, INVALID_CREDENTIALS)
        return Caller(info["user"], tuple(info["orgs"]), info["role"])


def normalize_tokens(tokens: dict) -> dict[str, dict]:
    """``{token: {"user", "orgs", "role"}}`` from a mapping whose values may also be bare user names;
    raises ``ValueError`` for a token without user or with a role other than read or write."""
    out = {}
    for token, info in (tokens or {}).items():
        if isinstance(info, str):
            info = {"user": info}
        role = info.get("role") or "write"
        if role not in ("read", "write"):
            raise ValueError(f"token role must be read or write, got {role!r}")
        if not info.get("user"):
            raise ValueError("every token needs a user")
        out[str(token)] = {"user": str(info["user"]), "orgs": [str(o) for o in info.get("orgs") or []], "role": role}
    return out


def load_tokens(root: str | Path) -> dict[str, dict]:
    """The tokens saved in ``<root>/tokens.json``, normalized; ``{}`` when there is no such file."""
    path = Path(root) / "tokens.json"
    if not path.is_file():
        return {}
    return normalize_tokens(json.loads(path.read_text()))


def save_tokens(root: str | Path, tokens: dict) -> None:
    """Writes ``tokens`` (normalized) to ``<root>/tokens.json`` atomically."""
    atomic_write_json(Path(root) / "tokens.json", normalize_tokens(tokens))


def parse_token_spec(spec: str) -> tuple[str, dict]:
    """``"TOKEN=USER[:ORG1,ORG2][:read]"`` (the CLI's ``--token``) -> ``(token, {"user", "orgs", "role"})``;
    raises ``ValueError`` naming the spec when it has another form or an invalid name."""
    token, sep, rest = spec.partition("=")
    if not sep or not token or not rest:
        raise ValueError(f"--token must look like {_SPEC_FORM}, got {spec!r}")
    user, *extra = rest.split(":")
    role = extra.pop() if extra and extra[-1] in ("read", "write") else "write"
    if len(extra) > 1:
        raise ValueError(f"--token must look like {_SPEC_FORM}, got {spec!r}")
    orgs = [o for o in extra[0].split(",") if o] if extra else []
    for name in (user, *orgs):
        if not valid_name(name):
            raise ValueError(f"invalid user or org name {name!r} in --token {spec!r}")
    return token, {"user": user, "orgs": orgs, "role": role}
