"""One stage as the unit of sharing (issue 17): a base model's pre-trained stage pushed alone, found
by model, reused by two different fine-tunes, and combined with their own stages at attribution time;
nothing published names a path of the machine that made it.

Real fits of tiny GPT-NeoX models through the real ``hub-msif`` command line, pushed to and pulled
from the loopback Hub-compatible server with the real ``huggingface_hub`` client.
"""

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import QA_TEMPLATE, machine_paths_published, save_tiny_pair

from hub_msif.apps.cli import main as cli_main
from hub_msif.artifacts.manifest import read_manifest
from hub_msif.attribution.attributor import Attributor
from hub_msif.errors import FactorError
from hub_msif.toy.examples import train_briefly

pytestmark = pytest.mark.usefixtures("one_thread")
BASE_REPO, TUNE_REPOS = "alice/tiny-base-stage", ("alice/tiny-tune-a-stage", "alice/tiny-tune-b-stage")
INDEX_REPO, SPACE_REPO = "alice/tiny-stage-index", "alice/tiny-stage-space"
PROMPT, ANSWER = "what does the cat see ?", "the river"
DOCUMENTS = ["the cat sees the river .", "a dog carries an old book .", "the teacher likes a small house .",
             "the cat sees a red ball in the garden .", "a bird sings near the river ."]


def _fit(*argv) -> None:
    assert cli_main(["fit", "--batch-size", "8", "--max-length", "64", "--checkpoint-every", "0", *argv]) == 0


def _finetune_args(model: Path, data: Path) -> list[str]:
    return ["--model", str(model), "--stage", "finetuned", "--data", str(data), "--prompt-column", "prompt",
            "--response-column", "response", "--template", QA_TEMPLATE]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base model, two different fine-tunes of it, their corpora, and locally fitted pairs
    (the reference: every stage fitted here)."""
    root = tmp_path_factory.mktemp("stages")
    pair = save_tiny_pair(root)
    other = train_briefly(copy.deepcopy(pair["finetuned_model"]), pair["tokenizer"], pair["qa_texts"], steps=3,
                          batch_size=8, seed=7)
    other.save_pretrained(root / "tune-b")
    pair["tokenizer"].save_pretrained(root / "tune-b")
    tunes = {"a": pair["finetuned"], "b": root / "tune-b"}
    base_stage = root / "base-stage"
    _fit("--model", str(pair["pretrained"]), "--stage", "pretrained", "--data", str(pair["pretrain"]),
         "--out", str(base_stage), "--model-name", "tiny-base")
    local_pairs = {}
    for name, model in tunes.items():
        folder = root / f"pair-{name}"
        shutil.copytree(base_stage, folder)
        _fit(*_finetune_args(model, pair["finetune"]), "--out", str(folder))
        local_pairs[name] = folder
    (root / "documents.jsonl").write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n"
                                                  for i, t in enumerate(DOCUMENTS)))
    return {"root": root, "pair": pair, "tunes": tunes, "base_stage": base_stage, "local_pairs": local_pairs}


def _scores(**factors) -> list[tuple[str, float]]:
    attributor = Attributor(**factors)
    documents = [{"id": f"d{i}", "text": t} for i, t in enumerate(DOCUMENTS)]
    result = attributor.attribute(PROMPT, ANSWER, documents=documents, top=len(DOCUMENTS))
    return sorted((row.id, row.score) for row in result.rows)


def _close(a, b, rel=1e-6) -> bool:
    scale = max(abs(s) for _, s in a)
    return [i for i, _ in a] == [i for i, _ in b] and all(abs(x - y) <= rel * scale for (_, x), (_, y) in zip(a, b))


def test_a_pretrained_stage_is_pushed_alone_found_reused_and_combined(world, hub_server, tmp_path, capsys):
    # Push the base's pre-trained stage alone: its own manifest (one stage), card and version tag.
    assert cli_main(["push", "factors", str(world["base_stage"]), "--repo", BASE_REPO, "--stage", "pretrained"]) == 0
    capsys.readouterr()
    from huggingface_hub import HfApi, hf_hub_download

    manifest = json.loads(Path(hf_hub_download(BASE_REPO, "msif.json", repo_type="dataset", revision="v1")).read_text())
    assert list(manifest["stages"]) == ["pretrained"]
    assert manifest["stages"]["pretrained"]["model"]["id"] == "tiny-base"
    card = Path(hf_hub_download(BASE_REPO, "README.md", repo_type="dataset", revision="v1")).read_text()
    assert "(pre-trained stage)" in card and f"--reuse-pretrained {BASE_REPO}@v1" in card
    files = {f for f in HfApi().list_repo_files(BASE_REPO, repo_type="dataset", revision="v1")}
    assert files and not any(f.startswith("finetuned/") for f in files)

    # Found by model (a local folder: by its weights' sha256), as JSON and as text.
    assert cli_main(["find-factors", "--model", str(world["pair"]["pretrained"]), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)
    # (other tests publish factors of the same deterministic tiny base: every match has its weights)
    from hub_msif.models import folder_revision

    assert {f["model"]["revision"] for f in found} == {folder_revision(world["pair"]["pretrained"])}
    mine = [f for f in found if f["location"] == f"{BASE_REPO}@v1"]
    assert [f["stage"] for f in mine] == ["pretrained"] and mine == [found[0]]  # the newest first
    assert mine[0]["model"]["id"] == "tiny-base" and mine[0]["num_tokens"] > 0
    assert mine[0]["data"]["data"] == "pretrain.jsonl"
    assert cli_main(["find-factors", "--model", str(world["pair"]["pretrained"]), "--stage", "finetuned", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli_main(["find-factors", "--model", "tiny-base"]) == 0  # by recorded name, every revision
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{BASE_REPO}@v1  pretrained  tiny-base@sha256:") and "pretrain.jsonl" in line

    # Two different fine-tunes reuse the pulled base stage instead of fitting it; each fine-tuned
    # stage is pushed alone too.
    for (name, model), repo in zip(world["tunes"].items(), TUNE_REPOS, strict=True):
        out = tmp_path / f"reused-{name}"
        _fit(*_finetune_args(model, world["pair"]["finetune"]), "--out", str(out),
             "--reuse-pretrained", f"{BASE_REPO}@v1")
        reused = read_manifest(out)["stages"]["pretrained"]
        assert reused["reused_from"]["repo"] == BASE_REPO and len(reused["reused_from"]["commit"]) == 40
        assert cli_main(["push", "factors", str(out), "--repo", repo, "--stage", "finetuned"]) == 0
        capsys.readouterr()
        # Attribution with the two stages from two places (Hub base stage + Hub fine-tuned stage), and
        # with the reused pair folder, equals the locally fitted pair (1e-6).
        expected = _scores(factors=str(world["local_pairs"][name]))
        assert _close(_scores(factors_pretrained=f"{BASE_REPO}@v1", factors_finetuned=f"{repo}@v1"), expected)
        assert _close(_scores(factors=str(out)), expected)
        assert _close(_scores(factors=str(world["local_pairs"][name]), factors_pretrained=f"{BASE_REPO}@v1"), expected)

    # No version holds the base with fine-tune b (its stage was pushed alone): the pair search names both
    # stage artifacts. (Fine-tune a is the tiny pair other tests publish as pairs.)
    code = cli_main(["find-factors", "--pretrained", str(world["pair"]["pretrained"]),
                     "--finetuned", str(world["tunes"]["b"])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"--factors-finetuned {TUNE_REPOS[1]}@v1" in err and "--factors-pretrained alice/" in err


def test_a_stage_of_another_model_is_refused_from_the_manifests_alone(world, monkeypatch, tmp_path, capsys):
    # Fine-tune b's stage with fine-tune a's model: refused in one line naming both, before any factor
    # file or weights load (the factor files are gone, and loading weights would fail).
    stage_b = tmp_path / "stage-b-manifest-only"
    stage_b.mkdir()
    shutil.copy(world["local_pairs"]["b"] / "msif.json", stage_b / "msif.json")
    import hub_msif.attribution.attributor as attributor_module

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded before the refusal")

    monkeypatch.setattr(attributor_module, "load_model", no_loading)
    code = cli_main(["attribute", "--factors", str(world["local_pairs"]["a"]), "--factors-finetuned", str(stage_b),
                     "--finetuned", str(world["tunes"]["a"]), "--documents", str(world["root"] / "documents.jsonl"),
                     "--prompt", PROMPT, "--answer", ANSWER])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"the finetuned factors ({stage_b}) were fitted for tune-b@sha256:" in err
    assert "but the finetuned model is finetuned@sha256:" in err
    # A pre-trained stage of another base: refused the same way.
    with pytest.raises(FactorError, match=r"pretrained factors .* were fitted for tiny-base@sha256:.* but the pretrained "
                                          r"model is tune-b@sha256:"):
        Attributor(factors=str(world["local_pairs"]["a"]), pretrained=str(world["tunes"]["b"]))


def test_a_local_model_unknown_here_is_named_with_model_path(world, monkeypatch, tmp_path):
    # Another machine (an empty registry): the manifest names the model, and --model-path finds it.
    monkeypatch.setenv("HUB_MSIF_CACHE", str(tmp_path / "fresh-cache"))
    import hub_msif.models as models

    monkeypatch.setattr(models, "_REVISIONS", {})
    with pytest.raises(Exception, match=r"the pretrained model 'tiny-base' \(sha256:.*\) was a local folder .* "
                                        r"--model-path tiny-base=FOLDER"):
        Attributor(factors=str(world["local_pairs"]["a"]))
    paths = {"tiny-base": str(world["pair"]["pretrained"]), "finetuned": str(world["tunes"]["a"])}
    assert _close(_scores(factors=str(world["local_pairs"]["a"]), model_paths=paths),
                  _scores(factors=str(world["local_pairs"]["a"]), pretrained=paths["tiny-base"],
                          finetuned=paths["finetuned"]))


def _machine_paths(world) -> list[str]:
    """Paths of the pushing machine that nothing published may contain."""
    return [p for p in {str(Path.home()), os.getcwd(), str(world["root"]), str(world["root"].resolve())} if len(p) > 1]


def test_nothing_published_names_a_path_of_this_machine(world, hub_server, tmp_path, capsys):
    from huggingface_hub import snapshot_download

    from hub_msif.attribution.retrieval import build_index
    from hub_msif.data import CorpusSpec

    build_index(CorpusSpec(data=str(world["pair"]["pretrain"])), out=tmp_path / "index")
    pushes = [["push", "factors", str(world["local_pairs"]["a"]), "--repo", "alice/tiny-pathless-pair"],
              ["push", "factors", str(world["base_stage"]), "--repo", "alice/tiny-pathless-base"],
              ["push", "index", str(tmp_path / "index"), "--repo", INDEX_REPO]]
    for argv in pushes:
        assert cli_main(argv) == 0, capsys.readouterr().err
    assert cli_main(["push", "space", "--repo", SPACE_REPO, "--factors-pretrained", "alice/tiny-pathless-base@v1",
                     "--factors-finetuned", "alice/tiny-pathless-pair@v1", "--index", f"{INDEX_REPO}@v1"]) == 0
    capsys.readouterr()
    repos = [("alice/tiny-pathless-pair", "dataset"), ("alice/tiny-pathless-base", "dataset"), (INDEX_REPO, "dataset"),
             (SPACE_REPO, "space")]
    hits = machine_paths_published(repos, _machine_paths(world), tmp_path / "downloads")
    assert not hits, hits
    space = json.loads((Path(snapshot_download(SPACE_REPO, repo_type="space", cache_dir=tmp_path / "downloads"))
                        / "msif_space.json").read_text())
    assert space == {"factors_pretrained": "alice/tiny-pathless-base@v1",
                     "factors_finetuned": "alice/tiny-pathless-pair@v1", "index": f"{INDEX_REPO}@v1"}


def test_the_space_serves_and_names_two_stages_from_two_places(world, tmp_path):
    from hub_msif.apps.space.backend import Backend
    from hub_msif.attribution.retrieval import build_index
    from hub_msif.data import CorpusSpec

    build_index(CorpusSpec(data=str(world["pair"]["pretrain"])), out=tmp_path / "index")
    stages = {"pretrained": str(world["base_stage"]), "finetuned": str(world["local_pairs"]["b"])}
    served = Backend(stages, str(tmp_path / "index")).describe()
    assert served["factors"] == stages
    assert served["models"]["pretrained"].startswith("tiny-base@sha256:")
    assert served["models"]["finetuned"].startswith("tune-b@sha256:")
    assert served["documents"] > 0 and served["corpus"] == "pretrain.jsonl"
