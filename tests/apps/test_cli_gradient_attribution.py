"""``hub-msif attribute --gradindex`` and ``hub-msif gradindex check`` end to end through the command line
(issue 18, deliverables 3-4; docs/design.md, "Gradient index"), on conftest's ``gradient_world``: the
printed results are the library's (the same Attributor's results, strict JSON), stage one is reported."""

from __future__ import annotations

import json
import shutil

import pytest
from test_cli import strict_json

from hub_msif.apps import cli

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def attributor(gradient_world):
    from hub_msif.attribution.attributor import Attributor

    return Attributor(gradient_world["factors"], index=gradient_world["index"],
                      gradindex=gradient_world["gradindexes"]["default"])


def _queries_file(world, path):
    path.write_text("".join(json.dumps({"id": f"q{n}", "prompt": p, "answer": a}) + "\n"
                            for n, (p, a) in enumerate(world["queries"])))
    return path


def test_attribute_gradindex_json_is_the_attributors_result_with_stage_one(gradient_world, attributor, capsys):
    world = gradient_world
    prompt, answer = world["queries"][0]
    argv = ["attribute", "--factors", str(world["factors"]), "--gradindex", str(world["folders"]["default"]),
            "--prompt", prompt, "--answer", answer, "--candidates", "30", "--top", "8", "--json", "--threads", "1"]
    assert cli.main(argv) == 0
    got = strict_json(capsys.readouterr().out)
    want = attributor.attribute(prompt, answer, candidates=30, top=8)
    assert got["num_candidates"] == 30 and [r["id"] for r in got["rows"]] == [r.id for r in want.rows]
    assert [r["score"] for r in got["rows"]] == pytest.approx([r.score for r in want.rows], rel=1e-6)
    stage = got["stage_one"]
    assert stage["source"] == "gradient" and stage["candidates"] == 30
    assert stage["searched"] == {"gradient": len(world["gradindexes"]["default"])}
    assert 0 < stage["seconds"] <= got["seconds"]

    argv = [a for a in argv if a != "--json"]  # the text output names stage one
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "stage one: 30 candidates (top by compressed MS-IF) from the gradient index (150 documents) in " in out
    assert "; the whole query " in out
    assert "ms-if over 30 candidates" in out


def test_attribute_queries_from_both_indexes(gradient_world, attributor, tmp_path, capsys):
    world = gradient_world
    path = _queries_file(world, tmp_path / "queries.jsonl")
    argv = ["attribute", "--factors", str(world["factors"]), "--index", str(world["root"] / "index"),
            "--gradindex", str(world["folders"]["default"]), "--candidates-from", "both", "--queries", str(path),
            "--candidates", "12", "--top", "5", "--threads", "1"]
    assert cli.main(argv) == 0
    lines = [strict_json(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == [f"q{n}" for n in range(len(world["queries"]))]
    for line, (prompt, answer) in zip(lines, world["queries"], strict=True):
        union = attributor.candidates(prompt, answer, 12, candidates_from="both")
        assert line["stage_one"]["source"] == "both" and line["num_candidates"] == len(union) >= 12
        assert line["stage_one"]["searched"] == {"embedding": 150, "gradient": 150} and line["seconds"] > 0


def test_gradindex_check_is_1_at_identity_and_a_recall_at_the_default(gradient_world, tmp_path, capsys):
    world = gradient_world
    path = _queries_file(world, tmp_path / "queries.jsonl")
    base = ["gradindex", "check", "--queries", str(path), "--sample", "3", "--factors", str(world["factors"]),
            "--threads", "1", "--json"]
    assert cli.main([*base, "--index", str(world["folders"]["identity"])]) == 0
    identity = strict_json(capsys.readouterr().out)
    assert identity["recall_at_10"] == 1.0 and len(identity["queries"]) == 3 and not identity["trivial"]
    assert identity["corpus_sample"] == identity["num_documents"] == 150
    assert all(q["recall_at_10"] == 1.0 and len(q["exact_top"]) == 10 for q in identity["queries"])
    assert identity["recorded"] is False and identity["exact_top"] == 10 and identity["index_top"] == 100

    folder = tmp_path / "default"
    shutil.copytree(world["folders"]["default"], folder)
    assert cli.main([*base, "--index", str(folder), "--record"]) == 0
    default = strict_json(capsys.readouterr().out)
    assert 0.0 <= default["recall_at_10"] <= 1.0 and default["recorded"] is True
    assert default["recall_at_10"] == pytest.approx(sum(q["recall_at_10"] for q in default["queries"]) / 3)
    manifest = json.loads((folder / "gradindex.json").read_text())
    assert manifest["check"]["recall_at_10"] == default["recall_at_10"] and manifest["check"]["queries"] == 3

    # the text output; and attribute then reports the recorded recall with stage one
    assert cli.main([a for a in base if a != "--json"] + ["--index", str(folder), "--corpus-sample", "60"]) == 0
    out = capsys.readouterr().out
    assert "recall@10 of exact MS-IF's top 10 in the gradient index's top 100: " in out
    assert "60 of 150 documents" in out and "1 by construction" in out  # 60 <= 100: says so
    prompt, answer = world["queries"][0]
    assert cli.main(["attribute", "--factors", str(world["factors"]), "--gradindex", str(folder), "--prompt", prompt,
                     "--answer", answer, "--candidates", "10", "--threads", "1", "--json"]) == 0
    got = strict_json(capsys.readouterr().out)
    assert got["stage_one"]["check"]["recall_at_10"] == default["recall_at_10"]


def test_a_gradient_index_of_another_stage_is_refused_in_one_line(gradient_world, capsys):
    world = gradient_world
    prompt, answer = world["queries"][0]
    status = cli.main(["attribute", "--factors", str(world["factors"]), "--gradindex",
                       str(world["folders"]["finetuned"]), "--prompt", prompt, "--answer", answer, "--threads", "1"])
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "the gradient index was built for the finetuned factors" in err


def test_check_refusals_in_one_line(gradient_world, tmp_path, capsys):
    world = gradient_world
    path = _queries_file(world, tmp_path / "queries.jsonl")
    cases = [
        (["--index", "msif-team/some-gradindex@v1", "--record", "--factors", str(world["factors"])],
         "--record writes into a local gradient index folder"),
        (["--index", str(world["folders"]["default"])], "give --factors (a pair of stages) or --factors-finetuned"),
        (["--index", str(tmp_path / "nope"), "--factors", str(world["factors"])],
         f"gradient index folder {tmp_path / 'nope'} does not exist"),
    ]
    for extra, message in cases:
        status = cli.main(["gradindex", "check", "--queries", str(path), "--sample", "2", *extra])
        err = capsys.readouterr().err
        assert status == 2 and len(err.splitlines()) == 1 and message in err, err


def test_attribute_with_a_gradient_index_pulled_from_the_hub(gradient_world, attributor, hub_server, capsys):
    """``--gradindex REPO@REV``: pushed to the loopback Hub, pulled on demand (every file sha256-checked),
    the same candidates and scores as from the folder."""
    from huggingface_hub import HfApi

    from hub_msif.hub import push_gradindex

    world = gradient_world
    repo = "msif-team/tiny-gradindex-attribute"
    published = push_gradindex(world["folders"]["default"], repo)
    prompt, answer = world["queries"][1]
    try:
        assert cli.main(["attribute", "--factors", str(world["factors"]), "--gradindex", f"{repo}@{published.tag}",
                         "--prompt", prompt, "--answer", answer, "--candidates", "20", "--top", "20", "--threads", "1",
                         "--json"]) == 0
    finally:  # the session's Hub is shared: find-factors of the same tiny model must not list it
        HfApi().delete_repo(repo, repo_type="dataset")
    got = strict_json(capsys.readouterr().out)
    want = attributor.attribute(prompt, answer, candidates=20, top=20)
    assert got["stage_one"]["source"] == "gradient"
    assert [r["id"] for r in got["rows"]] == [r.id for r in want.rows]
    assert [r["score"] for r in got["rows"]] == pytest.approx([r.score for r in want.rows], rel=1e-6)
