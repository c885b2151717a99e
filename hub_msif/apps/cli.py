"""The ``hub-msif`` command line (docs/design.md, "Command line").

Every command has ``--help``; bad input ends in one line on stderr and exit status 2, never a
traceback (set ``HUB_MSIF_DEBUG=1`` to see one); Ctrl-C ends in one line and exit status 130.
Arguments are checked before any model loads or anything is written: argparse ``type=``
functions for single values, ``check_*`` at the top of each ``run`` for paths and locations
(the library checks the rest, e.g. ``FitConfig.validate``, before its first load); see
``hub_msif.apps.arguments``. What is printed goes through ``hub_msif.apps.output``. Heavy imports
(torch, transformers, huggingface_hub) stay inside the ``run`` functions so that ``--help`` and argument
errors answer at once.

Each command is a module of ``hub_msif.apps.commands`` with ``add(subparsers)`` and ``run(args)``;
this module builds the top parser from them and keeps ``main``: the one place that turns errors and
Ctrl-C into one line and an exit status.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from hub_msif import __version__
from hub_msif.apps.arguments import Parser, check_unicode
from hub_msif.apps.commands import COMMANDS
from hub_msif.apps.output import printable, quiet_libraries
from hub_msif.errors import Interrupted, MsifError

INTERRUPTED_STATUS = 130  # what shells report for a process ended by SIGINT (128 + 2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hub-msif", description=(
        "Multi-stage influence functions: attribute a fine-tuned LLM's answers to pre-training documents, "
        "with EK-FAC factors shared on the Hugging Face Hub."))
    parser.add_argument("--version", action="version", version=f"hub_msif {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")  # subparsers are Parser too
    for command in COMMANDS.values():
        command.add(sub)
    return parser


RUNNERS = {name: command.run for name, command in COMMANDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    debug = os.environ.get("HUB_MSIF_DEBUG", "") not in ("", "0")
    if threading.current_thread() is threading.main_thread():
        # Started with SIGINT ignored (a background job of a script), Python installs no handler:
        # Ctrl-C or kill -INT would then be lost instead of ending the command with status 130.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        check_unicode(parser, args)  # before any runner: text reaches tokenizers and JSON output
        return RUNNERS[args.command](args)
    except (MsifError, OSError) as err:  # anything else is a bug and shows its traceback
        if debug:
            raise
        print(f"hub-msif {args.command}: error: {printable(str(err) or type(err).__name__)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C; an Interrupted says what it left behind
        if debug:
            raise
        left = f": {printable(err)}" if isinstance(err, Interrupted) and str(err) else ""
        print(f"hub-msif {args.command}: interrupted{left}", file=sys.stderr)
        return INTERRUPTED_STATUS


if __name__ == "__main__":
    sys.exit(main())
