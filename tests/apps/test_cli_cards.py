"""Cards name models without local paths (issue 10, item 7; docs/design.md, "Hub artifacts").

Factors fitted from model folders and data files under the test's temporary folder, and an index
embedded with a local model folder, are pushed with ``hub-msif push`` to the loopback Hub; the
card downloaded back (YAML metadata and body) holds no path of this machine: a model is named by
``--model-name`` or by its folder's last component and short weights sha256, data files by name.
"""

import re
import shutil
from pathlib import Path

import pytest

from hub_msif.apps import cli

pytestmark = pytest.mark.usefixtures("one_thread")
# An absolute path (or ~/...) starting after a blank, a quote, a bracket or '=': URLs (https://)
# and repo ids (alice/x) do not match.
ABSOLUTE_PATH = re.compile(r"(?:^|[\s`'\"(\[=,])(?:~?/)[\w.+-]+/", re.MULTILINE)


@pytest.fixture(scope="module")
def local_artifacts(fact_world, tmp_path_factory):
    """The demo pair copied under a temporary folder and fitted there (as ``hub-msif demo`` does),
    and an index of 30 documents embedded with a local (symlinked) copy of the embedding model."""
    from hub_msif.attribution.embeddings import resolve_embedding_model
    from hub_msif.attribution.retrieval import build_index
    from hub_msif.data import CorpusSpec
    from hub_msif.factors.fit import FitConfig, fit_stage

    root = tmp_path_factory.mktemp("local-cards")
    models = root / "my-models"
    for stage in ("pretrained", "finetuned"):
        shutil.copytree(fact_world["models"] / stage, models / stage)
    data = {name: shutil.copy(fact_world["paths"][name], root / f"{name}.jsonl") for name in ("pretrain", "finetune")}
    factors = root / "factors"
    fit_stage(str(models / "pretrained"), str(data["pretrain"]), factors,
              FitConfig(stage="pretrained", batch_size=32, checkpoint_every=0),
              corpus=CorpusSpec(data=str(data["pretrain"]), max_length=64, max_sequences=64))
    fit_stage(str(models / "finetuned"), str(data["finetune"]), factors,
              FitConfig(stage="finetuned", batch_size=32, checkpoint_every=0),
              corpus=CorpusSpec(data=str(data["finetune"]), prompt_column="prompt", response_column="response",
                                template=fact_world["world"].template, max_length=64, max_sequences=32))
    encoder = root / "my-encoder"
    encoder.symlink_to(resolve_embedding_model(None)[0], target_is_directory=True)
    documents = root / "documents.jsonl"
    documents.write_text("".join(line + "\n" for line in fact_world["paths"]["pretrain"].read_text().splitlines()[:30]))
    build_index(CorpusSpec(data=str(documents)), embedding_model=str(encoder), out=root / "index")
    return {"root": root, "factors": factors, "index": root / "index", "encoder": encoder}


def _card(repo: str) -> str:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo, "README.md", repo_type="dataset")).read_text()


def _assert_no_local_path(card: str, root: Path) -> None:
    for local in (root, root.resolve(), Path.home(), Path(__file__).resolve().parents[2]):
        assert str(local) not in card, f"{local} in the card"
    found = ABSOLUTE_PATH.findall(card)
    assert not found, found


def test_cards_of_local_folders_name_models_without_paths(local_artifacts, hub_server, capsys):
    from hub_msif.artifacts.manifest import read_manifest
    from hub_msif.models import folder_revision

    root = local_artifacts["root"]
    assert cli.main(["push", "factors", str(local_artifacts["factors"]), "--repo", "alice/cli-card-local"]) == 0
    card = _card("alice/cli-card-local")
    _assert_no_local_path(card, root)
    manifest = read_manifest(local_artifacts["factors"])
    # The manifest itself names the folder by its name and weights (no path of this machine, issue 17).
    assert manifest["stages"]["pretrained"]["model"]["id"] == "pretrained"
    assert manifest["stages"]["pretrained"]["model"]["local"] is True
    assert str(root) not in (local_artifacts["factors"] / "msif.json").read_text()
    short = {stage: folder_revision(root / "my-models" / stage)[7:19] for stage in ("pretrained", "finetuned")}
    title = f"# EK-FAC factors: pretrained (sha256:{short['pretrained']}) → finetuned (sha256:{short['finetuned']})"
    assert title in card
    assert "--data pretrain.jsonl" in card and "--data finetune.jsonl" in card  # the fit commands: file names

    assert cli.main(["push", "index", str(local_artifacts["index"]), "--repo", "alice/cli-card-local-index"]) == 0
    card = _card("alice/cli-card-local-index")
    _assert_no_local_path(card, root)
    assert str(local_artifacts["encoder"].resolve()) not in card
    assert "# Document index: documents.jsonl" in card


def test_model_names_given_on_push_name_the_models(local_artifacts, hub_server, capsys):
    root = local_artifacts["root"]
    assert cli.main(["push", "factors", str(local_artifacts["factors"]), "--repo", "alice/cli-card-named",
                     "--model-name", "pretrained=acme/fact-base", "--model-name", "finetuned=acme/fact-chat"]) == 0
    card = _card("alice/cli-card-named")
    _assert_no_local_path(card, root)
    assert "# EK-FAC factors: acme/fact-base → acme/fact-chat" in card
    assert "pretty_name: hub_msif EK-FAC factors for acme/fact-chat" in card
    assert "hub-msif fit --model acme/fact-base" in card
    assert cli.main(["push", "index", str(local_artifacts["index"]), "--repo", "alice/cli-card-named-index",
                     "--model-name", "acme/minilm-copy"]) == 0
    card = _card("alice/cli-card-named-index")
    _assert_no_local_path(card, root)
    assert "| embedding model | `acme/minilm-copy` |" in card


def test_a_path_given_as_a_model_name_is_refused_before_any_upload(local_artifacts, hub_server, capsys):
    from huggingface_hub import HfApi

    argv = ["push", "factors", str(local_artifacts["factors"]), "--repo", "alice/cli-card-refused"]
    with pytest.raises(SystemExit):
        cli.main([*argv, "--model-name", f"pretrained={local_artifacts['root']}/m"])
    assert "is a path" in capsys.readouterr().err
    assert not HfApi().repo_exists("alice/cli-card-refused", repo_type="dataset")
