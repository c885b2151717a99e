"""``hub-msif fit`` options of the scaling work: partitions, accumulation and storage dtypes,
label samples and the token budget reach the fit and are recorded in the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_example

from hub_msif.apps import cli
from hub_msif.data import CorpusSpec
from hub_msif.factors.fit import FitConfig, fit_stage
from hub_msif.factors.storage import MANIFEST_NAME, load_stage

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_example(tmp_path_factory.mktemp("options-example"), 11)


def test_cli_options_reach_the_fit_and_the_manifest(example, tmp_path, capsys):
    model, corpus = example
    out = tmp_path / "cli"
    status = cli.main(["fit", "--model", str(model), "--stage", "pretrained", "--data", str(corpus), "--out", str(out),
                       "--batch-size", "4", "--module-partitions", "3", "--accumulate-dtype", "float32",
                       "--samples-per-sequence", "2", "--max-tokens", "60", "--dtype", "float64",
                       "--checkpoint-every", "2", "--json"])
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    got = load_stage(out, "pretrained")
    fit = got.info["fit"]
    assert (fit["module_partitions"], fit["accumulate_dtype"], fit["samples_per_sequence"], fit["model_dtype"]) == (3, "float32", 2, None)
    assert got.info["data"]["max_tokens"] == 60 and 0 < fit["num_tokens"] <= 60
    assert summary["num_tokens"] == fit["num_tokens"]
    entries = json.loads((out / MANIFEST_NAME).read_text())["stages"]["pretrained"]["modules"]
    assert {e["dtype"] for e in entries} == {"float64"}
    assert got.modules[entries[0]["name"]].lam.dtype == torch.float64

    # The same settings through the Python API give the same factors.
    config = FitConfig(batch_size=4, module_partitions=3, accumulate_dtype="float32", samples_per_sequence=2,
                       storage_dtype="float64", checkpoint_every=0)
    want = fit_stage(str(model), str(corpus), tmp_path / "api", config,
                     corpus=CorpusSpec(data=str(corpus), max_tokens=60), show_progress=False)
    for name, w in want.modules.items():
        for key, tensor in w.tensors().items():
            assert torch.equal(getattr(got.modules[name], key), tensor), f"{name} {key}"


def test_old_manifests_without_the_new_fields_still_load(example, tmp_path):
    """The new fit fields are optional: a manifest written before them loads as before."""
    model, corpus = example
    out = tmp_path / "factors"
    fit_stage(str(model), str(corpus), out, FitConfig(checkpoint_every=0), show_progress=False)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    for key in ("module_partitions", "samples_per_sequence", "accumulate_dtype", "model_dtype"):
        del manifest["stages"]["pretrained"]["fit"][key]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert set(load_stage(out, "pretrained").modules)


def test_every_phase_has_its_own_progress_bar(example, tmp_path, monkeypatch):
    """Covariance, eigendecomposition and Lambda of each group: one bar each, counting to the end;
    with show_progress they are enabled only on a terminal (tqdm's disable=None)."""
    from hub_msif.factors import fit as fit_module

    bars = []

    class Recorder:
        def __init__(self, iterable=None, total=None, initial=0, desc="", disable=False, **kwargs):
            self.iterable, self.desc, self.disable = iterable, desc, disable
            self.total = len(iterable) if iterable is not None else total
            self.n = initial
            bars.append(self)

        def __iter__(self):
            for item in self.iterable:
                yield item
                self.n += 1

        def update(self, n=1):
            self.n += n

        def close(self):
            pass

    monkeypatch.setattr(fit_module, "_progress_bar", Recorder)
    model, corpus = example
    fit_stage(str(model), str(corpus), tmp_path / "factors", FitConfig(batch_size=4, module_partitions=2,
                                                                       checkpoint_every=0), show_progress=True)
    fit_bars = list(bars)
    assert [b.desc for b in fit_bars] == [f"{phase} (group {g}/2)" for g in (1, 2)
                                          for phase in ("covariance", "eigendecomposition", "Lambda")]
    assert all(b.n == b.total and b.total > 0 for b in fit_bars)
    assert all(b.disable is None for b in fit_bars)
    bars.clear()
    fit_stage(str(model), str(corpus), tmp_path / "quiet", FitConfig(batch_size=4, checkpoint_every=0), show_progress=False)
    assert bars and all(b.disable is True for b in bars)
