"""How ``huggingface_hub`` failures become hub_msif errors that keep their kind (docs/design.md, "Errors").

A missing repo or revision is a ``RepositoryNotFoundError`` / ``RevisionNotFoundError``
(``FileNotFoundError``), a refused or missing token a ``TokenRefusedError`` (``PermissionError``),
an unreachable Hub a ``HubUnreachableError`` (``ConnectionError``); each message names the repo,
the revision and the endpoint.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from hub_msif.errors import (
    HubError,
    NotCachedError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    TokenRefusedError,
)
from hub_msif.errors import (
    HubUnreachableError as Unreachable,
)

NO_TOKEN = ("pushing needs a Hugging Face token with write access: set HF_TOKEN, run `hf auth login`, "
            "or pass token= (--token)")


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:300] or type(err).__name__


def _who(token) -> str:
    """``the token of user NAME`` when the Hub says whose token it is."""
    try:
        from huggingface_hub import HfApi

        return f"the token of user {HfApi().whoami(token=token)['name']}"
    except Exception:  # the Hub may refuse whoami too: the message stays generic
        return "your token"


@contextlib.contextmanager
def hub_failures(repo_id: str, revision: str | None, doing: str, token=None) -> Iterator[None]:
    """Turns ``huggingface_hub`` errors raised while ``doing`` into the matching ``HubError``."""
    from huggingface_hub import errors

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except HubError:
        raise
    except errors.RevisionNotFoundError as err:
        raise RevisionNotFoundError(f"{doing}: the dataset repo {repo_id} has no revision {revision!r} "
                                    "(no such branch, tag or commit)") from err
    except errors.GatedRepoError as err:
        raise TokenRefusedError(f"{doing}: {where} is gated; request access on the Hub first") from err
    except errors.RepositoryNotFoundError as err:
        raise RepositoryNotFoundError(f"{doing}: no dataset repo {repo_id} on {endpoint()} (or it is private and "
                                      "your token cannot see it)") from err
    except errors.OfflineModeIsEnabled as err:
        raise NotCachedError(f"{doing}: {where} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids "
                             "downloading it; pull it once online") from err
    except errors.LocalEntryNotFoundError as err:
        why = "HF_HUB_OFFLINE=1 is set" if offline() else f"the Hub at {endpoint()} could not be reached"
        raise NotCachedError(f"{doing}: {where} is not (completely) in the Hugging Face cache and {why}: "
                             f"{first_line(err)}") from err
    except errors.EntryNotFoundError as err:
        raise HubError(f"{doing}: {where} lacks a file it should have ({first_line(err)})") from err
    except errors.LocalTokenNotFoundError as err:
        raise TokenRefusedError(f"{doing}: {NO_TOKEN}") from err
    except errors.HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else None
        if status == 401:
            raise TokenRefusedError(f"{doing}: the Hub at {endpoint()} refused the token (401: invalid or expired); "
                                    "set HF_TOKEN or run `hf auth login`") from err
        if status == 403:
            raise TokenRefusedError(f"{doing}: {_who(token)} may not write to {repo_id} (403 Forbidden); use a token "
                                    f"with write access to the namespace {repo_id.split('/')[0]}, or push to your "
                                    "own namespace") from err
        raise HubError(f"{doing}: the Hub answered {status}: {first_line(err)}") from err
    except OSError as err:  # connection refused, reset or timed out; a download cut short
        raise Unreachable(f"{doing}: the Hub at {endpoint()} could not be reached or broke off "
                          f"({type(err).__name__}: {first_line(err)}); nothing was changed, try again") from err
    except Exception as err:
        import httpx2

        if isinstance(err, httpx2.HTTPError):
            raise Unreachable(f"{doing}: the Hub at {endpoint()} could not be reached or broke off "
                              f"({type(err).__name__}: {first_line(err)}); nothing was changed, try again") from err
        raise
