"""Where an artifact lives: a local folder, or a Hub dataset repo ``REPO[@REV]`` (docs/design.md, "Hub artifacts").

A folder that exists wins; a path that starts with ``.``, ``/`` or ``~`` is always a folder;
``namespace/name[@rev]`` with a valid repo id is a Hub location (``rev`` a branch, tag or commit
sha; none means ``main``); anything else is taken as a folder (and later reported missing).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hub_msif.errors import HubValueError

REPO_TYPE = "dataset"


@dataclass(frozen=True)
class Location:
    """A local ``folder``, or a Hub dataset ``repo_id`` at ``revision`` (None: ``main``)."""

    folder: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def is_local(self) -> bool:
        return self.folder is not None

    def __str__(self) -> str:
        if self.folder is not None:
            return str(self.folder)
        if self.repo_id is None:  # as `None + str` would
            raise TypeError("a Location holds a folder or a repo_id, this one neither")
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def is_repo_id(repo_id: str) -> bool:
    """Whether ``repo_id`` is ``namespace/name`` as the Hub accepts it (``huggingface_hub`` decides)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        return False
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return False
    return True


def check_repo_id(repo_id: str) -> None:
    if not is_repo_id(repo_id):
        raise HubValueError(f"repo id {repo_id!r} is not of the form namespace/name (letters, digits, '-', '_', '.')")


def parse_location(location: str | Path) -> Location:
    """A folder (a ``Path``, an existing directory, or anything not shaped like ``ns/name[@rev]``)
    or a Hub repo with an optional revision."""
    if isinstance(location, Path):
        return Location(folder=location)
    if not isinstance(location, str) or not location.strip():
        raise HubValueError(f"a location must be a folder or REPO[@REV], got {location!r}")
    if Path(location).expanduser().is_dir():
        return Location(folder=Path(location).expanduser())
    if location.startswith((".", "/", "~")) or "\\" in location:
        return Location(folder=Path(location).expanduser())
    repo_id, at, revision = location.partition("@")
    if not is_repo_id(repo_id):
        if at:
            raise HubValueError(f"{location!r} is neither a local folder nor a Hub location REPO[@REV] "
                                f"(REPO is namespace/name, REV a branch, tag or commit sha)")
        return Location(folder=Path(location))
    if at and not revision.strip():
        raise HubValueError(f"{location!r}: empty revision after '@' (give a branch, tag or commit sha, or drop the '@')")
    return Location(repo_id=repo_id, revision=revision or None)


def stage_locations(factors, factors_pretrained=None, factors_finetuned=None) -> dict[str, str]:
    """``{stage: location}`` of the two stages' factors: each stage's own location where given, else
    the pair's ``factors`` (one published pre-trained stage serves every fine-tune of its base)."""
    locations = {"pretrained": factors_pretrained or factors, "finetuned": factors_finetuned or factors}
    if not all(locations.values()):
        raise HubValueError("give --factors (a pair of stages), or --factors-pretrained and --factors-finetuned")
    return {stage: str(location) for stage, location in locations.items()}
