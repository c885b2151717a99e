"""The scripts of ``examples/`` (issue 20, 6), run as a user runs them, on the tiny model pair
against the loopback Hub: fit both stages and push them (the pair, then the pre-trained stage
alone), then attribute many queries from Python with the pushed factors.

Each example is loaded from its file and its ``main(argv)`` called, as ``python examples/X.py ARGS``
would (the scripts are meant to be copied, so they are no package)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import QA_TEMPLATE, save_tiny_pair

from hub_msif.artifacts.manifest import read_manifest
from hub_msif.hub import pull_factors

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested_and_says_how_to_run_it():
    scripts = sorted(p.stem for p in EXAMPLES.glob("*.py"))
    assert scripts == ["attribute_many", "fit_and_push"]  # search_gradient_index: once a gradient index exists
    for name in scripts:
        module = load_example(name)
        assert f"python examples/{name}.py" in module.__doc__ and callable(module.main)


def test_fit_and_push_then_attribute_many(hub_server, tmp_path, capsys):
    pair = save_tiny_pair(tmp_path / "models")
    folder = tmp_path / "factors"
    pushed = load_example("fit_and_push").main([
        "--pretrained", str(pair["pretrained"]), "--finetuned", str(pair["finetuned"]),
        "--pretrain-data", str(pair["pretrain"]), "--finetune-data", str(pair["finetune"]),
        "--template", QA_TEMPLATE, "--max-sequences", "16", "--max-length", "32", "--out", str(folder),
        "--repo", "alice/example-factors"])
    assert pushed["pair"] == "alice/example-factors@v1"
    assert pushed["pretrained"] == "alice/example-factors-pretrained@v1"
    manifest = read_manifest(pull_factors(pushed["pair"]))
    assert sorted(manifest["stages"]) == ["finetuned", "pretrained"]
    assert manifest["stages"]["finetuned"]["data"]["template"] == QA_TEMPLATE
    alone = read_manifest(pull_factors(pushed["pretrained"], stages=["pretrained"]))
    assert sorted(alone["stages"]) == ["pretrained"]
    assert "pushed the pre-trained stage alone to alice/example-factors-pretrained@v1" in capsys.readouterr().out

    rows = [json.loads(line) for line in pair["pretrain"].read_text().splitlines()[:12]]
    documents = tmp_path / "documents.jsonl"
    documents.write_text("".join(json.dumps({"id": f"doc-{i}", "text": r["text"]}) + "\n" for i, r in enumerate(rows)))
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in [
        {"prompt": "what does the cat see ?", "answer": "the ball"},
        {"prompt": "what does the dog chase ?"},  # no answer: the fine-tuned model's is attributed
    ]))
    out = tmp_path / "attributions.jsonl"
    results = load_example("attribute_many").main([
        "--factors", pushed["pair"], "--queries", str(queries), "--documents", str(documents), "--top", "3",
        "--out", str(out)])
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.prompt for r in results] == [w["prompt"] for w in written] == ["what does the cat see ?",
                                                                            "what does the dog chase ?"]
    assert written[0]["answer"] == "the ball" and not written[0]["answer_generated"]
    assert written[1]["answer_generated"]
    for result in written:
        assert result["method"] == "ms-if" and result["num_candidates"] == 12
        assert len(result["rows"]) == 3 and {r["id"] for r in result["rows"]} <= {f"doc-{i}" for i in range(12)}
        assert [r["score"] for r in result["rows"]] == sorted((r["score"] for r in result["rows"]), reverse=True)
