"""The ``hub-msif`` entry point's contract: hub_msif's errors and OS errors become one line and exit
status 2; anything else is a bug and keeps its traceback (docs/design.md, "Command line")."""

import subprocess
import sys

import pytest

from hub_msif.apps import cli
from hub_msif.errors import FactorError, RepositoryNotFoundError


@pytest.mark.parametrize("error", [FactorError("factor folder x does not exist"),
                                   RepositoryNotFoundError("no dataset repo a/b"),
                                   PermissionError("[Errno 13] Permission denied: 'out'")])
def test_refusals_are_one_line_and_exit_2(error, monkeypatch, capsys):
    def refuse(args):
        raise error

    monkeypatch.setitem(cli.RUNNERS, "find-factors", refuse)
    monkeypatch.delenv("HUB_MSIF_DEBUG", raising=False)
    assert cli.main(["find-factors", "--pretrained", "a", "--finetuned", "b"]) == 2
    err = capsys.readouterr().err
    assert err == f"hub-msif find-factors: error: {error}\n"


@pytest.mark.parametrize("bug", [KeyError("stages"), TypeError("unsupported operand"), ValueError("from a library")])
def test_bugs_are_not_dressed_up_as_input_errors(bug, monkeypatch):
    """A KeyError (or any exception that is not a hub_msif error or an OSError) propagates."""
    def broken(args):
        raise bug

    monkeypatch.setitem(cli.RUNNERS, "find-factors", broken)
    with pytest.raises(type(bug)):
        cli.main(["find-factors", "--pretrained", "a", "--finetuned", "b"])


@pytest.mark.parametrize("value, shows", [("1", True), ("0", False), ("", False)])
def test_debug_variable_shows_the_traceback(value, shows, monkeypatch):
    def refuse(args):
        raise FactorError("bad factors")

    monkeypatch.setitem(cli.RUNNERS, "find-factors", refuse)
    monkeypatch.setenv("HUB_MSIF_DEBUG", value)
    if shows:
        with pytest.raises(FactorError):
            cli.main(["find-factors", "--pretrained", "a", "--finetuned", "b"])
    else:
        assert cli.main(["find-factors", "--pretrained", "a", "--finetuned", "b"]) == 2


def test_python_dash_m_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "hub_msif", "--help"], capture_output=True, text=True, check=True)
    for command in ("fit", "demo", "index", "attribute", "push", "pull", "find-factors", "hub"):
        assert command in out.stdout
