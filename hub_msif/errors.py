"""Every error hub_msif raises on purpose, in one hierarchy (docs/design.md, "Errors").

``MsifError`` is the base: catch it to handle anything hub_msif refuses. Each subclass also
inherits the builtin exception of its kind, as ``huggingface_hub.errors`` does, so code that
catches ``ValueError``, ``FileNotFoundError`` or ``PermissionError`` keeps working:

- bad input (arguments, corpora, models, factors, indexes, Space requests): ``ValueError``;
- something that should exist and does not (a folder, a file, a Hub repo or revision):
  ``FileNotFoundError``;
- a token the Hub refuses: ``PermissionError``;
- the Hub cannot be reached: ``ConnectionError``;
- an optional part used without its packages: ``ImportError``.

The command line turns ``MsifError`` and ``OSError`` into one line and exit status 2; any other
exception is a bug and shows its traceback.
"""

from __future__ import annotations


class MsifError(Exception):
    """Base class of every error hub_msif raises on purpose; the message names the problem."""


class MsifValueError(MsifError, ValueError):
    """An argument or setting has a value hub_msif cannot use (e.g. a negative damping)."""


class CorpusError(MsifValueError):
    """A corpus cannot be read, lacks the requested columns, or tokenizes to nothing usable."""


class UnsupportedArchitectureError(MsifValueError):
    """hub_msif does not know this architecture's modules; name them with ``--module NAME=ROLE``."""


class FactorError(MsifValueError):
    """A factor folder is damaged, incomplete, or does not belong to the model at hand."""


class RetrievalError(MsifValueError):
    """A document index is damaged or a search request is invalid."""


class SpaceError(MsifValueError):
    """A request the Space refuses, with a message meant for the visitor."""


class MissingExtraError(MsifError, ImportError):
    """An optional part of hub_msif is used without its packages; the message names the extra to
    install (e.g. ``pip install 'hub_msif[server]'`` for the local Hub server)."""


class ArtifactNotFoundError(MsifError, FileNotFoundError):
    """A local factor or index folder, or its manifest, does not exist."""


class IntegrityError(MsifValueError):
    """A file's sha256 differs from the one its manifest records (corrupted or altered)."""


class FactorsNotFoundError(FactorError, ArtifactNotFoundError):
    """A factor folder or its manifest ``msif.json`` does not exist."""


class IndexNotFoundError(RetrievalError, ArtifactNotFoundError):
    """An index folder or its manifest ``index.json`` does not exist."""


class FactorIntegrityError(FactorError, IntegrityError):
    """A factor file is corrupted or was altered (its sha256 differs from the manifest's)."""


class IndexIntegrityError(RetrievalError, IntegrityError):
    """An index file is corrupted or was altered (its sha256 differs from the manifest's)."""


class HubError(MsifError):
    """A Hub artifact cannot be pushed, found or pulled; the message names the repo and revision.

    The subclasses say why; this class itself covers the rest (a refused push, an unknown answer).
    """


class HubValueError(HubError, ValueError):
    """A Hub request hub_msif refuses before sending it (bad repo id or tag, an existing tag)."""


class RepositoryNotFoundError(HubError, FileNotFoundError):
    """The repo does not exist on the Hub (or is private and the token cannot see it)."""


class RevisionNotFoundError(HubError, FileNotFoundError):
    """The repo has no such branch, tag or commit."""


class NotCachedError(HubError, FileNotFoundError):
    """The artifact is not (completely) in the local cache and the Hub cannot be asked (offline)."""


class TokenRefusedError(HubError, PermissionError):
    """No token, or the Hub refused the token (invalid, read-only, or without rights to the namespace)."""


class HubUnreachableError(HubError, ConnectionError):
    """The Hub could not be reached, or broke off a transfer."""


class HubIntegrityError(HubError, IntegrityError):
    """A file pulled from the Hub does not match the sha256 its manifest records."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during work that must say what it left behind (e.g. whether a push published a
    version). Not an ``MsifError``: it still stops everything a ``KeyboardInterrupt`` stops; the
    command line prints its message in one line and exits with status 130."""


__all__ = [
    "ArtifactNotFoundError", "CorpusError", "FactorError", "FactorIntegrityError", "FactorsNotFoundError",
    "HubError", "IndexIntegrityError", "IndexNotFoundError", "HubIntegrityError", "HubUnreachableError",
    "HubValueError", "IntegrityError", "Interrupted", "MissingExtraError", "MsifError", "MsifValueError", "NotCachedError", "RepositoryNotFoundError",
    "RetrievalError", "RevisionNotFoundError", "SpaceError", "TokenRefusedError", "UnsupportedArchitectureError",
]
