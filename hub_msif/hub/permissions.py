"""Whether a token may write to a namespace, asked before a push (docs/design.md, "Hub artifacts").

A push that would add nothing (the folder is already published) writes nothing, so the Hub never
gets the chance to refuse a read-only token or a foreign namespace; and a push that writes learns
of a refusal only after its uploads. ``whoami`` says who the token is, its role and the
organizations of its user, which is enough to refuse at once in the cases it settles: a read-only
token, a namespace that is neither the user nor one of its organizations, an organization where
the user only reads. Fine-grained tokens list their rights per repo and namespace in a shape
this check does not interpret: for them the Hub decides when the commit is sent.
"""

from __future__ import annotations

from hub_msif.errors import TokenRefusedError


def write_refusal(who: dict, namespace: str) -> str | None:
    """Why the token that ``whoami`` described as ``who`` cannot write to ``namespace``; None when
    it can or when ``who`` does not settle it (a fine-grained token)."""
    user = who.get("name")
    role = ((who.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        return "it is read-only (role read); use a token with the write role"
    if role not in (None, "write"):  # "fineGrained": rights per repo, checked by the Hub at the commit
        return None
    if namespace == user:
        return None
    org_roles = {org.get("name"): org.get("roleInOrg") for org in who.get("orgs") or [] if isinstance(org, dict)}
    if namespace not in org_roles:
        return (f"{user} is neither {namespace} nor a member of an organization {namespace}; use a token with write "
                f"access to the namespace {namespace}, or push to your own namespace")
    if org_roles[namespace] == "read":
        return (f"{user} only has the read role in the organization {namespace}; ask an admin of {namespace} for "
                "write access, or push to your own namespace")
    return None


def require_write_access(api, repo_id: str, doing: str) -> None:
    """Raises ``TokenRefusedError`` when ``api``'s token certainly cannot write to ``repo_id``
    (see ``write_refusal``). Hub errors of ``whoami`` itself (e.g. 401) propagate: call it inside
    ``hub_failures``."""
    who = api.whoami(cache=True)
    namespace = repo_id.split("/")[0]
    reason = write_refusal(who, namespace)
    if reason:
        raise TokenRefusedError(f"{doing}: the token of user {who.get('name')} may not write to {repo_id}: {reason}")
