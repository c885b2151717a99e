"""docs/recipes.md, run (issue 17): every ``hub-msif`` command of the recipe's code blocks, with
the same flags, on a tiny GPT-NeoX pair of the recipe's architecture, small local data and the
loopback Hub. Only names are replaced (the models, the Dolly dataset, the ``your-org`` repos) and
``--device cuda`` becomes ``--device cpu``; a flag the command line no longer takes fails here.
"""

import json
import re
import shlex
from pathlib import Path

import pytest
from conftest import save_tiny_pair

from hub_msif.apps.cli import main as cli_main
from hub_msif.artifacts.manifest import read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPE = Path(__file__).resolve().parents[2] / "docs" / "recipes.md"


def recipe_commands() -> list[list[str]]:
    """The ``hub-msif`` commands of the recipe's ``bash`` blocks, in order, as argument lists."""
    blocks = re.findall(r"```bash\n(.*?)```", RECIPE.read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("hub-msif ")]


def test_the_recipe_names_every_step():
    steps = [" ".join(argv[:2]) for argv in recipe_commands()]
    for step in ("fit --plan", "fit --model", "index build", "push factors", "push index", "attribute --plan",
                 "attribute --factors-pretrained", "push space", "find-factors --model", "attribute --factors"):
        assert any(s.startswith(step) for s in steps), (step, steps)
    assert any("--reuse-pretrained" in argv for argv in recipe_commands())


def test_the_recipe_runs_on_a_tiny_model_of_the_same_architecture(tmp_path, monkeypatch, hub_server, capsys):
    pair = save_tiny_pair(tmp_path / "models")
    assert json.loads((pair["pretrained"] / "config.json").read_text())["model_type"] == "gpt_neox"  # as Pythia
    monkeypatch.chdir(tmp_path)
    Path("pile-sample.jsonl").write_text(pair["pretrain"].read_text())
    rows = [json.loads(line) for line in pair["finetune"].read_text().splitlines()]
    Path("dolly.jsonl").write_text("".join(json.dumps({"instruction": r["prompt"], "response": r["response"],
                                                       "category": "open_qa"}) + "\n" for r in rows))
    names = {"EleutherAI/pythia-410m": str(pair["pretrained"]), "your-org/pythia-410m-dolly": str(pair["finetuned"]),
             "databricks/databricks-dolly-15k": "dolly.jsonl", "cuda": "cpu"}
    outputs = []
    for argv in recipe_commands():
        argv = [names.get(a, a.replace("your-org/", "alice/recipe-")) for a in argv]
        status = cli_main(argv)
        captured = capsys.readouterr()
        assert status == 0, (argv, captured.err[-2000:])
        outputs.append((argv, captured.out))

    # What the steps made: the pre-trained stage published alone, found by model, reused; the
    # reused pair attributes exactly like the two published stages combined.
    assert sorted(read_manifest(Path("factors/pythia-410m-dolly"))["stages"]) == ["finetuned", "pretrained"]
    found = next(out for argv, out in outputs if argv[:1] == ["find-factors"])
    # (the tiny base is a local folder named "pretrained": recorded by that name and its weights' sha256)
    assert found.startswith("alice/recipe-pythia-410m-pile-ekfac@v1  pretrained  pretrained@sha256:"), found
    reused = read_manifest(Path("factors/my-dolly"))["stages"]["pretrained"]
    assert reused["reused_from"]["repo"] == "alice/recipe-pythia-410m-pile-ekfac"
    attributed = [out for argv, out in outputs if argv[:1] == ["attribute"] and "--plan" not in argv]
    assert len(attributed) == 2
    assert attributed[0].splitlines()[:3] == attributed[1].splitlines()[:3]  # prompt, answer, method line
    ranked = [[line for line in out.splitlines() if re.match(r"\s+\d+ ", line)] for out in attributed]
    assert ranked[0] and ranked[0] == ranked[1][: len(ranked[0])]
