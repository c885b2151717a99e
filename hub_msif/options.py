"""Settings defined once, as dataclass fields whose metadata describes their command-line option.

A setting is ``setting(default, help, ...)`` in a dataclass (``FitConfig``, ``CorpusSpec``): its
help text, flag, choices and argparse type live in the field's metadata. From that one definition
``add_options`` adds the options to a parser, ``from_args`` builds the dataclass back from parsed
arguments, and ``command_args`` turns recorded values (e.g. a manifest's ``asdict(config)``) into
the flags that reproduce them: every value that differs from its field's default becomes its flag
(docs/design.md, "Command line"). A new setting therefore reaches the parser, the config, the
manifest and the card's reproduce command at once.

The argparse ``type=`` functions shared with ``hub_msif.apps.arguments`` live here, below every
layer that defines settings. No heavy imports: this module is imported by ``--help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from collections.abc import Callable, Mapping, Sequence
from typing import Any

_KEY = "hub_msif_option"
_SAME = object()  # Option.cli_default: argparse's default is the field's


# --- argparse types (their messages are what argparse prints after "argument --x: ") ------------


def whole_number(text: str, low: int, high: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    if high is not None and value > high:
        raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
    return value


def positive_int(text: str) -> int:
    return whole_number(text, 1)


def non_negative_int(text: str) -> int:
    return whole_number(text, 0)


def seed_int(text: str) -> int:
    """Recorded in the manifest; bounded to what an int64 holds so any reader can take it."""
    return whole_number(text, 0, 2**63 - 1)


def non_empty(text: str) -> str:
    """Paths, ids and tokens: an empty one would silently mean the current folder or the default."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must not be empty, got {text!r}")
    return text


# --- the field metadata -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Option:
    """How one dataclass field appears on the command line.

    ``flag`` defaults to ``--field-name``; a flag starting with ``--no-`` on a boolean field that
    defaults to True is a switch that sets the field to False. ``cli_default`` is argparse's
    default when it differs from the field's (``None`` there means "not given": ``from_args``
    then takes the field's default). ``reproduces`` is False for settings that do not change the
    result (``checkpoint_every``): ``command_args`` leaves them out. ``add``, ``parse`` and
    ``render`` replace the generic handling of a field with several flags (``FitConfig.modules``):
    ``add(parser, option)``, ``parse(args) -> value``, ``render(value) -> [arguments]``.
    """

    help: str
    flag: str | None = None
    type: Callable[[str], Any] | None = None
    choices: Sequence[str] | None = None
    metavar: str | None = None
    required: bool = False
    cli_default: Any = _SAME
    reproduces: bool = True
    add: Callable | None = None
    parse: Callable | None = None
    render: Callable | None = None


def setting(default: Any, help: str, **option: Any) -> Any:
    """A dataclass field with ``default`` whose option is ``Option(help, **option)``."""
    kwargs = {"default_factory": default} if callable(default) else {"default": default}
    return dataclasses.field(metadata={_KEY: Option(help, **option)}, **kwargs)


def option_fields(cls) -> list[tuple[dataclasses.Field, Option]]:
    """The fields of dataclass ``cls`` (or of an instance) that have an option, in field order."""
    return [(f, f.metadata[_KEY]) for f in dataclasses.fields(cls) if _KEY in f.metadata]


def flag_of(field: dataclasses.Field, option: Option) -> str:
    return option.flag or "--" + field.name.replace("_", "-")


def dest_of(field: dataclasses.Field, option: Option) -> str:
    """argparse's ``dest`` of the option (what ``args.<dest>`` is called)."""
    return flag_of(field, option).lstrip("-").replace("-", "_")


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _is_switch(field: dataclasses.Field, option: Option) -> bool:
    return isinstance(default_of(field), bool)


def add_options(parser, cls, skip: Sequence[str] = (), only: Sequence[str] | None = None) -> None:
    """Adds an option for every field of ``cls`` that has one (only those named in ``only`` when
    given, and not those in ``skip``), in field order."""
    for field, option in option_fields(cls):
        if field.name in skip or (only is not None and field.name not in only):
            continue
        if option.add is not None:
            option.add(parser, option)
            continue
        flag = flag_of(field, option)
        default = default_of(field)
        if _is_switch(field, option):
            if default is True and not flag.startswith("--no-"):
                raise TypeError(f"{cls.__name__}.{field.name} defaults to True: its flag must be --no-...")
            parser.add_argument(flag, action="store_true", help=option.help)
            continue
        kwargs: dict[str, Any] = {"help": option.help}
        if option.required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default if option.cli_default is _SAME else option.cli_default
        for key in ("type", "choices", "metavar"):
            value = getattr(option, key)
            if value is not None:
                kwargs[key] = list(value) if key == "choices" else value
        parser.add_argument(flag, **kwargs)


def from_args(cls, args: argparse.Namespace, skip: Sequence[str] = (), **given: Any):
    """An instance of ``cls`` from parsed arguments: every option field from its option (a value
    of None takes the field's default where that is not None), the rest from ``given``."""
    values = dict(given)
    for field, option in option_fields(cls):
        if field.name in skip or field.name in values:
            continue
        if option.parse is not None:
            values[field.name] = option.parse(args)
            continue
        value = getattr(args, dest_of(field, option))
        if _is_switch(field, option):
            value = not value if default_of(field) is True else bool(value)
        elif value is None and default_of(field) is not None:
            value = default_of(field)
        values[field.name] = value
    return cls(**values)


def command_args(cls, recorded: Mapping[str, Any], skip: Sequence[str] = ()) -> list[str]:
    """The command-line arguments that set the fields of ``cls`` to the ``recorded`` values
    (``asdict`` of an instance, or a manifest's record of one): a flag for every field whose value
    differs from its default, required ones always; fields not recorded, recorded as None where
    the default is not None (a record's "not applicable"), or not reproducing, are left out."""
    out: list[str] = []
    for field, option in option_fields(cls):
        if field.name in skip or field.name not in recorded or not option.reproduces:
            continue
        value, default = recorded[field.name], default_of(field)
        if (value is None and default is not None) or (value == default and not option.required):
            continue
        if option.render is not None:
            out.extend(option.render(value))
        elif _is_switch(field, option):
            if bool(value) != default:
                out.append(flag_of(field, option))
        else:
            out.extend([flag_of(field, option), str(value)])
    return out


def command_text(arguments: Sequence[str]) -> str:
    """Arguments as shell text: flags bare, values quoted where the shell needs it."""
    return " ".join(a if a.startswith("--") else shlex.quote(a) for a in arguments)
