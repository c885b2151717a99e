"""PEFT (LoRA) adapters as models (hub_msif.models; docs/design.md, "Pipeline and package layout").

A LoRA adapter is made here with ``peft`` on a tiny float64 GPT-NeoX (random, non-zero B
matrices, so merging changes the weights). Fitting through the adapter folder must give the same
factors as fitting the merged model saved as a plain model, and the manifest records the
adapter's and the base's revisions. An adapter whose base cannot be found is a one-line error
before any data is read.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import save_tiny_example

from hub_msif.apps import cli
from hub_msif.errors import MsifValueError
from hub_msif.factors.fit import FitConfig, fit_stage
from hub_msif.models import folder_revision, load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """``{"base", "adapter", "merged", "corpus"}``: the base model folder, a LoRA adapter folder on
    it (no tokenizer: it comes from the base), and the adapter merged by hand, saved plain."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("peft")
    base_folder, corpus = save_tiny_example(root, 12)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float64)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense_h_to_4h"],
                        init_lora_weights=False)
    peft_model = get_peft_model(base, config)
    peft_model.save_pretrained(root / "adapter")
    saved = json.loads((root / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(base_folder)
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(root / "merged")
    AutoTokenizer.from_pretrained(base_folder).save_pretrained(root / "merged")
    reference = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float64)
    name = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert not torch.equal(merged.state_dict()[name], reference.state_dict()[name])  # the adapter changes weights
    return {"base": base_folder, "adapter": root / "adapter", "merged": root / "merged", "corpus": corpus}


def _fit(model: str, corpus, out, **kwargs):
    config = FitConfig(batch_size=4, checkpoint_every=0, storage_dtype="float64")
    return fit_stage(model, str(corpus), out, config, show_progress=False, **kwargs)


def test_adapter_fits_like_the_merged_model(adapter, tmp_path):
    through_adapter = _fit(str(adapter["adapter"]), adapter["corpus"], tmp_path / "a")
    plain = _fit(str(adapter["merged"]), adapter["corpus"], tmp_path / "m")
    assert list(through_adapter.modules) == list(plain.modules)
    for name, module in plain.modules.items():
        for key, tensor in module.tensors().items():
            other = through_adapter.modules[name].tensors()[key]
            assert torch.allclose(other, tensor, rtol=1e-10, atol=1e-12 * float(tensor.abs().max())), (name, key)
    recorded = through_adapter.info["model"]
    assert recorded["id"] == "adapter" and recorded["local"] is True  # a name, never a path
    assert recorded["revision"] == folder_revision(adapter["adapter"])
    assert recorded["adapter"] == "peft"
    assert recorded["base"] == {"id": adapter["base"].name, "revision": folder_revision(adapter["base"]), "local": True}
    assert "base" not in plain.info["model"]
    stored = json.loads((tmp_path / "a" / "msif.json").read_text())
    assert json.dumps(recorded["base"]) in json.dumps(stored)  # the manifest on disk records the base too


def test_base_model_option_overrides_the_adapter_config(adapter, tmp_path):
    moved = tmp_path / "adapter"
    moved.mkdir()
    config = json.loads((adapter["adapter"] / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "no-such-base")
    (moved / "adapter_config.json").write_text(json.dumps(config))
    for f in adapter["adapter"].iterdir():
        if f.name != "adapter_config.json":
            (moved / f.name).write_bytes(f.read_bytes())
    model, _, ref = load_model(str(moved), base_model=str(adapter["base"]))
    merged, _, _ = load_model(str(adapter["merged"]))
    for (name, p), (_, q) in zip(model.state_dict().items(), merged.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert ref.base.id == adapter["base"].name and ref.base.folder == str(adapter["base"].resolve())


def test_adapter_without_its_base_fails_before_any_data_pass(adapter, tmp_path, monkeypatch, capsys):
    lost = tmp_path / "lost-adapter"
    lost.mkdir()
    config = json.loads((adapter["adapter"] / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "no-such-base")
    (lost / "adapter_config.json").write_text(json.dumps(config))
    for f in adapter["adapter"].iterdir():
        if f.name != "adapter_config.json":
            (lost / f.name).write_bytes(f.read_bytes())

    def no_data(*args, **kwargs):
        raise AssertionError("the corpus was read before the base model was found")

    monkeypatch.setattr("hub_msif.data.load_rows", no_data)
    with pytest.raises(MsifValueError, match="base model of adapter .*lost-adapter cannot be found: model folder"):
        _fit(str(lost), adapter["corpus"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    status = cli.main(["fit", "--model", str(lost), "--stage", "pretrained", "--data", str(adapter["corpus"]),
                       "--out", str(tmp_path / "cli-out")])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert len(err.splitlines()) == 1 and "cannot be found" in err and "Traceback" not in err
    config["base_model_name_or_path"] = ""
    (lost / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(MsifValueError, match="names no base model .*--base-model"):
        _fit(str(lost), adapter["corpus"], tmp_path / "out")
    with pytest.raises(MsifValueError, match="--base-model .* given, but .* is not a PEFT adapter"):
        _fit(str(adapter["merged"]), adapter["corpus"], tmp_path / "out", base_model=str(adapter["base"]))


def test_cli_fit_and_attributor_through_an_adapter(adapter, tmp_path, capsys):
    """``hub-msif fit --model ADAPTER --base-model BASE`` records both; the ``Attributor`` then
    loads the recorded adapter on the recorded base by itself and scores like the merged model."""
    from hub_msif.attribution.attributor import Attributor

    factors = tmp_path / "factors"
    for stage, model in (("pretrained", adapter["base"]), ("finetuned", adapter["adapter"])):
        extra = ["--base-model", str(adapter["base"])] if stage == "finetuned" else []
        status = cli.main(["fit", "--model", str(model), "--stage", stage, "--data", str(adapter["corpus"]),
                           "--out", str(factors), "--dtype", "float32", "--checkpoint-every", "0", "--json", *extra])
        assert status == 0, capsys.readouterr().err
    stored = json.loads((factors / "msif.json").read_text())
    assert stored["stages"]["finetuned"]["model"]["base"] == {
        "id": adapter["base"].name, "revision": folder_revision(adapter["base"]), "local": True}
    documents = ["the cat sees the river", "a dog runs to the house", "the bird sings at night"]
    queries = [("what does the cat see ?", "the river")]
    through_adapter = Attributor(factors, dtype=torch.float64)
    assert through_adapter.refs["finetuned"].base is not None
    merged = Attributor(factors, finetuned=str(adapter["merged"]), dtype=torch.float64, allow_revision_mismatch=True)
    got, _ = through_adapter.score(queries, documents)
    expected, _ = merged.score(queries, documents)
    assert torch.allclose(got, expected, rtol=1e-10, atol=0)
