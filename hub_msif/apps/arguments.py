"""Checks of ``hub-msif`` arguments that run before any model loads or anything is written.

argparse ``type=`` functions for single values (argparse turns their ``ArgumentTypeError`` into
"argument --x: <message>"), a parser whose usage errors are one line, and ``check_*`` helpers
for paths and locations that the runners call first.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from hub_msif.apps.output import printable
from hub_msif.attribution.checks import check_damping
from hub_msif.errors import ArtifactNotFoundError, MsifValueError

# Defined with the settings they check (hub_msif/options.py); every command here uses them.
from hub_msif.options import non_empty, non_negative_int, positive_int, seed_int  # noqa: F401
from hub_msif.options import whole_number as _whole_number


def port_number(text: str) -> int:
    """A TCP port; 0 lets the system pick a free one."""
    return _whole_number(text, 0, 65535)


def fixed_port_number(text: str) -> int:
    return _whole_number(text, 1, 65535)


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, got {text!r}")
    return value


def positive_finite_float(text: str) -> float:
    """``--damping``: a finite number above 0 (``hub_msif.attribution.checks.check_damping``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    try:
        return check_damping(value)
    except MsifValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}") from None


def token_spec(text: str) -> tuple[str, dict]:
    from hub_msif.hub.server import parse_token_spec

    try:
        return parse_token_spec(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class Parser(argparse.ArgumentParser):
    """argparse with the error contract of the other refusals: one line on stderr, exit status 2
    (argparse would print the usage first; ``--help`` shows it)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {printable(message)} (see {self.prog} --help)\n")


# --- checks that need more than one value, or the file system: run before any heavy import -------


def check_unicode(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every parsed argument must be Unicode text: a byte that is not UTF-8 (Python hands it over
    as a surrogate, ``surrogateescape``) or a lone surrogate would reach the tokenizer (a
    ``TypeError`` after the models load) or the strict JSON output. Refused naming the option."""
    from hub_msif.apps.inputs import lone_surrogate

    options: dict[str, str | tuple[str, ...]] = {}  # dest -> its longest option string, else its metavar

    def collect(p: argparse.ArgumentParser) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    collect(sub)
            elif action.dest not in options:
                names = action.option_strings
                options[action.dest] = max(names, key=len) if names else (action.metavar or action.dest)

    def strings(value):
        if isinstance(value, (str, Path)):
            yield str(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from strings(item)

    for dest, value in vars(args).items():
        for text in strings(value):
            at = lone_surrogate(text)
            if at is not None:
                if not options:
                    collect(parser)
                char = ord(text[at])
                what = (f"the byte 0x{char - 0xDC00:02x}, which is not UTF-8," if 0xDC80 <= char <= 0xDCFF
                        else f"a lone surrogate \\u{char:04x}")
                raise MsifValueError(f"argument {options.get(dest, dest)}: holds {what} at character {at}: "
                                     "give UTF-8 text")


def name_folder(text: str) -> tuple[str, str]:
    """``--model-path NAME=FOLDER``: a model name and an existing folder."""
    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"must be NAME=FOLDER, got {text!r}")
    if not Path(folder).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"no such model folder: {folder}")
    return name, str(Path(folder).expanduser())


def check_target_folder(path: str | Path, option: str) -> None:
    """A folder the command creates or writes into: refused when it, or a folder above it, is a file."""
    path = Path(path).expanduser()
    for above in (path, *path.parents):
        if above.exists():
            if above.is_dir():
                return
            if above == path:
                raise MsifValueError(f"{option} {path} is a file, not a folder")
            raise MsifValueError(f"{option} {path} cannot be created: {above} is a file, not a folder")


def check_existing_folder(path: str | Path, what: str) -> None:
    path = Path(path).expanduser()
    if not path.exists():
        raise ArtifactNotFoundError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise MsifValueError(f"{what} {path} is a file, not a folder")


def check_location(location: str, what: str) -> None:
    """``LOC`` (a folder or ``REPO[@REV]``): a malformed one or a missing folder is refused before
    either artifact or any model is loaded (the index would otherwise load first)."""
    from hub_msif.hub.location import parse_location

    parsed = parse_location(location)
    if parsed.folder is not None:  # parsed.is_local
        check_existing_folder(parsed.folder, what)


def check_model(model: str | None) -> None:
    """A model given as a path (``.``, ``/`` or ``~`` first, as for locations) must be a folder;
    anything else is a Hub id, resolved later."""
    if model is None or not model.startswith((".", "/", "~")):
        return
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} {'is a file' if path.exists() else 'does not exist'}")


# --- output ------------------------------------------------------------------------------------




def model_name(text: str) -> str:
    """``push index --model-name NAME``: what the card calls a local embedding model."""
    from hub_msif.hub.cards import check_model_name

    try:
        return check_model_name(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def stage_model_name(text: str) -> tuple[str, str]:
    """``push factors --model-name STAGE=NAME``: what the card calls a stage's local model folder."""
    stage, sep, name = text.partition("=")
    if not sep or stage not in ("pretrained", "finetuned"):
        raise argparse.ArgumentTypeError(f"must look like pretrained=NAME or finetuned=NAME, got {text!r}")
    return stage, model_name(name)
