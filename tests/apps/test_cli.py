"""The ``hub-msif`` entry point's contract: hub_msif's errors and OS errors become one line and exit
status 2; anything else is a bug and keeps its traceback (docs/design.md, "Command line")."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hub_msif.apps import cli
from hub_msif.errors import FactorError, Interrupted, RepositoryNotFoundError


def save_small_index(folder: Path) -> Path:
    """A valid index folder of three documents, made without loading an embedding model."""
    from hub_msif.attribution.retrieval import DocumentIndex

    documents = [{"id": f"d{i}", "text": text} for i, text in enumerate(["alpha beta", "gamma", "delta epsilon"])]
    metadata = {"embedding_model": {"id": "sentence-transformers/all-MiniLM-L6-v2", "revision": "sha256:" + "0" * 64},
                "corpus": {"data": "inline"}}
    return DocumentIndex(documents, np.eye(3, 8, dtype=np.float32), metadata).save(folder)


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


# --- --json output is strict JSON (issue 12, item 2) ---------------------------------------------


def strict_json(text: str):
    """``json.loads`` as strict parsers (JavaScript's JSON.parse, jq, Go) read it: no NaN or Infinity."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def _fake_factors(mean_lambda: float):
    """What ``fit_stage`` returns, as far as the fit summary reads it."""
    spec = SimpleNamespace(name="gpt_neox.layers.0.mlp.dense_h_to_4h", role="mlp", num_blocks=1, d_out=8, d_in=4)
    module = SimpleNamespace(spec=spec, lam=torch.full((8,), mean_lambda))
    info = {"model": {"id": "tiny-model", "revision": "sha256:" + "0" * 64},
            "fit": {"num_sequences": 3, "num_tokens": 27, "seconds": 0.25}}
    return SimpleNamespace(stage="pretrained", info=info, modules={spec.name: module})


def fake_attribution(score: float, text: str = "the cat sees the river .", prompt: str = "what does the cat see ?",
                 answer: str = "the river"):
    from hub_msif.attribution.results import Attribution, make_row

    name = "gpt_neox.layers.0.mlp.dense_4h_to_h"
    row = make_row(1, {"id": "doc-7", "text": text}, score, 1.0, {name: score}, {name: "mlp"})
    return Attribution(prompt, answer, False, "ms-if", "all", 0.1, True, 12, 1.0, [row], answer_logprob=-1.25)


@pytest.fixture
def fake_work(monkeypatch, tmp_path):
    """Each command's library call replaced by a stand-in returning ``values['score']`` (fit's mean
    Lambda, attribute's score): the CLI's printing is under test, not the work."""
    import hub_msif.hub
    from hub_msif.attribution import attributor, retrieval
    from hub_msif.factors import fit

    values = {"score": 0.5, "text": "the cat sees the river .", "prompt": "what does the cat see ?"}

    class FakeAttributor:
        def __init__(self, *args, **kwargs):
            pass

        def attribute(self, prompt, answer=None, **kwargs):
            return fake_attribution(values["score"], values["text"], prompt, answer or "the river")

    monkeypatch.setattr(fit, "fit_stage", lambda *args, **kwargs: _fake_factors(values["score"]))
    monkeypatch.setattr(attributor, "Attributor", FakeAttributor)
    monkeypatch.setattr(retrieval.DocumentIndex, "load", classmethod(lambda cls, *args, **kwargs: None))
    meta = {"num_documents": 3, "dimension": 8, "embedding_model": {"id": "m", "revision": "r"}, "index_type": "flat"}
    monkeypatch.setattr(retrieval, "build_index", lambda *args, **kwargs: SimpleNamespace(metadata=meta))
    from hub_msif.hub.push import Pushed

    monkeypatch.setattr(hub_msif.hub, "push_factors", lambda *args, **kwargs: Pushed("c" * 40, "v3"))
    monkeypatch.setattr(hub_msif.hub, "push_index", lambda *args, **kwargs: Pushed("d" * 40, "v1"))
    monkeypatch.setattr(hub_msif.hub, "pull_factors", lambda *args, **kwargs: tmp_path / "pulled")
    monkeypatch.setattr(hub_msif.hub, "pull_index", lambda *args, **kwargs: tmp_path / "pulled")
    monkeypatch.delenv("HUB_MSIF_DEBUG", raising=False)
    (tmp_path / "folder").mkdir()
    return values


def _json_commands(tmp: Path) -> dict[str, tuple[list[str], set[str]]]:
    """Every command with ``--json``, and the keys docs/design.md promises."""
    folder = str(tmp / "folder")
    return {
        "fit": (["fit", "--model", "m", "--stage", "pretrained", "--data", "d.jsonl", "--out", str(tmp / "out"),
                 "--json"], {"out", "stage", "model", "num_sequences", "num_tokens", "seconds", "modules"}),
        "index build": (["index", "build", "--data", "d.jsonl", "--out", str(tmp / "index"), "--json"],
                        {"out", "num_documents", "dimension", "embedding_model", "index_type", "seconds"}),
        "attribute": (["attribute", "--factors", folder, "--index", folder, "--prompt", "what does the cat see ?",
                       "--json"], {"prompt", "answer", "method", "rows", "scale", "num_candidates"}),
        "push factors": (["push", "factors", folder, "--repo", "alice/f", "--json"], {"repo", "tag", "commit", "location", "created"}),
        "push index": (["push", "index", folder, "--repo", "alice/i", "--json"],
                       {"repo", "tag", "commit", "location", "created"}),
        "pull factors": (["pull", "factors", "alice/f@v1", "--json"], {"location", "folder"}),
        "pull index": (["pull", "index", "alice/i@v1", "--json"], {"location", "folder"}),
    }


@pytest.mark.parametrize("command", ["fit", "index build", "attribute", "push factors", "push index", "pull factors",
                                     "pull index"])
def test_every_json_output_parses_strictly(command, fake_work, tmp_path, capsys):
    argv, keys = _json_commands(tmp_path)[command]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert keys <= set(strict_json(out))


@pytest.mark.parametrize("command, where", [("fit", "modules[0].mean_lambda = nan"),
                                            ("attribute", "rows[0].score = nan"),
                                            ("attribute", "rows[0].score = inf")])
def test_a_non_finite_number_is_an_error_not_json(command, where, fake_work, tmp_path, capsys):
    """NaN and Infinity are not JSON: printing them would break every strict reader downstream."""
    fake_work["score"] = float(where.rsplit(" ", 1)[1])
    assert cli.main(_json_commands(tmp_path)[command][0]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"hub-msif {command}: error: not printed as JSON: it holds a non-finite number ({where})\n"


def test_json_of_a_real_push_and_pull_parses_strictly(hub_server, tmp_path, capsys, monkeypatch):
    """The same through the real Hub client and server (an index folder needs no model to exist)."""
    monkeypatch.delenv("HUB_MSIF_DEBUG", raising=False)
    folder = save_small_index(tmp_path / "index")
    assert cli.main(["push", "index", str(folder), "--repo", "alice/cli-json-index", "--json"]) == 0
    pushed = strict_json(capsys.readouterr().out)
    assert pushed["location"] == f"alice/cli-json-index@{pushed['tag']}"
    assert cli.main(["pull", "index", pushed["location"], "--json"]) == 0
    pulled = strict_json(capsys.readouterr().out)
    assert (Path(pulled["folder"]) / "index.json").is_file()


# --- what the CLI prints cannot drive the terminal (issue 12, item 15) ------------------------------


def test_control_characters_in_printed_text_are_escaped(fake_work, tmp_path, capsys):
    """A document (or prompt) with ANSI escapes, a bidi override or newlines prints as one visible
    line per field: it cannot recolour the terminal, reorder text or forge result rows."""
    fake_work["text"] = "\x1b[31mred\x1b[0m and\nforged row\r\u202eright to left\x00 end\ttab"
    status = cli.main(["attribute", "--factors", str(tmp_path / "folder"), "--index", str(tmp_path / "folder"),
                       "--prompt", "why\x1b]0;title\x07 ?\u2028second", "--answer", "a\nb"])
    assert status == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert len(lines) == 7, out  # prompt, answer, method, header, one row, no opponents, the legend
    assert lines[5] == "opponents: none (no candidate has a score below 0)"
    assert lines[6].startswith("score: ms-if influence of the document on the answer")
    assert lines[0] == "prompt: why\\x1b]0;title\\x07 ?\\u2028second"
    assert lines[1] == "answer: a\\nb   log p(answer) = -1.2500"
    assert lines[4].endswith("[doc-7] \\x1b[31mred\\x1b[0m and\\nforged row\\r\\u202eright to left\\x00 end\ttab")
    assert not any(c in out for c in "\x1b\r\x00\x07\u202e\u2028")


def test_printable_escapes_only_what_a_terminal_would_act_on():
    assert cli.printable("plain text, ümlauts, 日本語, emoji 🐈 and\ttabs") == "plain text, ümlauts, 日本語, emoji 🐈 and\ttabs"
    assert cli.printable("a\nb\x1b[2Jc\u200bd\U000e0041") == "a\\nb\\x1b[2Jc\\u200bd\\U000e0041"


# --- Ctrl-C (issue 12, item 10) ------------------------------------------------------------------


@pytest.mark.parametrize("interrupt, line", [
    (KeyboardInterrupt(), "hub-msif find-factors: interrupted"),
    (Interrupted("nothing was published to alice/x (no commit, no tag)"),
     "hub-msif find-factors: interrupted: nothing was published to alice/x (no commit, no tag)"),
    (Interrupted(), "hub-msif find-factors: interrupted"),
])
def test_ctrl_c_is_one_line_and_exit_130(interrupt, line, monkeypatch, capsys):
    def work(args):
        raise interrupt

    monkeypatch.setitem(cli.RUNNERS, "find-factors", work)
    monkeypatch.delenv("HUB_MSIF_DEBUG", raising=False)
    try:
        status = cli.main(["find-factors", "--pretrained", "a", "--finetuned", "b"])
    except KeyboardInterrupt:  # caught here, or pytest would take it for a Ctrl-C of its own and stop
        pytest.fail("Ctrl-C escaped cli.main(): Python prints a traceback")
    assert status == 130
    assert capsys.readouterr().err == line + "\n"


def test_ctrl_c_with_debug_shows_the_traceback(monkeypatch):
    def work(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.RUNNERS, "find-factors", work)
    monkeypatch.setenv("HUB_MSIF_DEBUG", "1")
    with pytest.raises(KeyboardInterrupt):
        cli.main(["find-factors", "--pretrained", "a", "--finetuned", "b"])


def test_sigint_to_a_real_command_is_one_line_and_exit_130():
    """A real SIGINT while ``pull`` waits for a Hub that accepted the connection but never answers."""
    env = {k: v for k, v in os.environ.items() if k != "HUB_MSIF_DEBUG"}
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        silent.settimeout(60)
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with subprocess.Popen([sys.executable, "-m", "hub_msif", "pull", "factors", "alice/anything@v1"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
            try:
                connection, _ = silent.accept()  # the command now waits for an answer
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=60)
                connection.close()
            finally:
                if proc.poll() is None:
                    proc.kill()
    assert proc.returncode == 130, err
    assert (out, err) == ("", "hub-msif pull: interrupted\n")
