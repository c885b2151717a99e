"""How ``huggingface_hub`` failures become hub_msif errors that keep their kind (docs/design.md, "Errors").

A missing repo or revision is a ``RepositoryNotFoundError`` / ``RevisionNotFoundError``
(``FileNotFoundError``), a refused or missing token a ``TokenRefusedError`` (``PermissionError``),
an unreachable Hub a ``HubUnreachableError`` (``ConnectionError``); each message names the repo,
the revision and the endpoint.
"""

from __future__ import annotations

import contextlib
import errno
import re
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


# errno values that mean the local disk refused a write (full, quota, read-only, a name too long)
_LOCAL_DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.ENAMETOOLONG, errno.EACCES, errno.EPERM}


def local_disk_error(err: OSError, doing: str) -> OSError:
    """An ``OSError`` (same errno) naming the local disk as the cause: a download that fills the
    disk or meets a file name too long is no Hub failure."""
    where = f" ({err.filename})" if err.filename else ""
    hint = ("free space there or point HF_HOME at another disk" if err.errno in (errno.ENOSPC, errno.EDQUOT) else
            "use a shorter cache path (HF_HOME)" if err.errno == errno.ENAMETOOLONG else
            "make it writable or point HF_HOME at another folder")
    text = f"{doing}: the local disk failed, not the Hub: {err.strerror or err}{where} while writing the download; {hint}"
    out = OSError(" ".join(text.split()))
    out.errno = err.errno
    return out


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


# huggingface_hub wraps every failure of an LFS upload (an HTTP error, a connection that broke off)
# in a RuntimeError with this message, the real error as its cause.
_UPLOAD_FAILED = re.compile(r"Error while uploading '(.*)' to the Hub\.?$")


def _upload_failure(doing: str, path: str, cause: BaseException | None) -> HubError:
    """The one-line error of a failed upload of ``path``: what the server or the connection said, and
    what to do. Uploads come before the commit, so the repo is as it was."""
    from huggingface_hub import errors

    then = ("nothing was committed, the repo is as it was: run the push again (uploads that finished are "
            "not sent again)")
    where = f"uploading {path} to {endpoint()} failed"
    if isinstance(cause, errors.HfHubHTTPError):
        status = cause.response.status_code if cause.response is not None else None
        if status in (401, 403):
            return TokenRefusedError(f"{doing}: {where}: the Hub refused the token ({status}); use a token with write "
                                     "access (HF_TOKEN, `hf auth login` or --token)")
        kind = {507: "the server is out of space"}.get(status, "a server failure" if (status or 0) >= 500 else None)
        return HubError(f"{doing}: {where}: the Hub answered {status}{f' ({kind})' if kind else ''}: "
                        f"{first_line(cause)}; {then}")
    import httpx2

    # A broken connection makes huggingface_hub close its client: uploads in other threads then fail
    # with "the client has been closed".
    closed = isinstance(cause, RuntimeError) and "client has been closed" in str(cause)
    if cause is not None and (isinstance(cause, (OSError, httpx2.HTTPError)) or closed):
        return Unreachable(f"{doing}: {where}: the connection broke off ({type(cause).__name__}: "
                           f"{first_line(cause)}); {then}")
    what = f"{type(cause).__name__}: {first_line(cause)}" if cause is not None else "no reason given"
    return HubError(f"{doing}: {where} ({what}); {then}")


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
        if status is not None and status >= 500:
            raise HubError(f"{doing}: the Hub answered {status}: {first_line(err)}; a failure of the server at "
                           f"{endpoint()}, not of your input: try again later") from err
        raise HubError(f"{doing}: the Hub answered {status}: {first_line(err)}") from err
    except RuntimeError as err:
        upload = _UPLOAD_FAILED.match(str(err))
        if upload is None:
            raise
        raise _upload_failure(doing, upload.group(1), err.__cause__) from err
    except OSError as err:
        if err.errno in _LOCAL_DISK_ERRORS:  # the local disk (cache) failed, not the Hub
            raise local_disk_error(err, doing) from err
        # connection refused, reset or timed out; a download cut short
        raise Unreachable(f"{doing}: the Hub at {endpoint()} could not be reached or broke off "
                          f"({type(err).__name__}: {first_line(err)}); nothing was changed, try again") from err
    except Exception as err:
        cause = err.__cause__ or err.__context__
        if isinstance(cause, OSError) and cause.errno in _LOCAL_DISK_ERRORS:
            raise local_disk_error(cause, doing) from err
        import httpx2

        if isinstance(err, httpx2.HTTPError):
            raise Unreachable(f"{doing}: the Hub at {endpoint()} could not be reached or broke off "
                              f"({type(err).__name__}: {first_line(err)}); nothing was changed, try again") from err
        raise
