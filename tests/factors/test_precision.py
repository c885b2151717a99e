"""Precision: float32 accumulation and bfloat16 compute against the float64 fit of a float32
tiny model, measured on the preconditioner (docs/design.md, "Precision").

Measured (64 random sequences of 8-32 tokens, GPT-NeoX hidden 32, worst module, relative error of
``P(V)`` for random ``V`` against the float64-accumulated fit):

- ``accumulate_dtype="float32"``: 1.5e-6 at relative damping 0.1 (the default), 1.2e-5 at 1e-3;
  bound 1e-4.
- ``model_dtype="bfloat16"`` (forward and backward in bf16, accumulation float64): 9.1e-3 at 0.1,
  2.1e-2 at 1e-3; bound 5e-2 at 0.1.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_sequences

from hub_msif.errors import MsifValueError
from hub_msif.factors.fit import FitConfig, fit_factors
from hub_msif.toy.examples import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    return tiny_model("gpt_neox", hidden=32, dtype=torch.float32), random_sequences(64, 64, min_len=8, max_len=32, seed=3)


def _fit(setup, folder, **options):
    model, sequences = setup
    config = FitConfig(batch_size=8, storage_dtype="float64", checkpoint_every=0, **options)
    return fit_factors(copy.deepcopy(model), sequences, folder, config, pad_id=0, info={}, show_progress=False)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    return _fit(setup, tmp_path_factory.mktemp("float64"))


def _worst_error(got, want, damping: float) -> float:
    generator = torch.Generator().manual_seed(0)
    errors = []
    for name, w in want.modules.items():
        v = torch.randn(4, w.spec.d_out, w.spec.d_in, generator=generator, dtype=torch.float64)
        exact = w.precondition(v, damping, relative=True)
        errors.append(float((got.modules[name].precondition(v, damping, relative=True) - exact).norm() / exact.norm()))
    return max(errors)


def test_float32_accumulation_error_is_below_the_stated_bound(setup, reference, tmp_path):
    got = _fit(setup, tmp_path, accumulate_dtype="float32")
    assert got.info["fit"]["accumulate_dtype"] == "float32"
    assert reference.info["fit"]["accumulate_dtype"] == "float64"
    for damping in (0.1, 1e-3):
        error = _worst_error(got, reference, damping)
        assert 0 < error < 1e-4, f"damping {damping}: relative error {error:.3g}"  # 0: it really summed in float32


def test_bfloat16_compute_error_is_below_the_stated_bound(setup, reference, tmp_path):
    got = _fit(setup, tmp_path, model_dtype="bfloat16")
    assert got.info["fit"]["model_dtype"] == "bfloat16"
    assert got.modules[next(iter(got.modules))].lam.dtype == torch.float64  # stored as asked, whatever the compute
    error = _worst_error(got, reference, 0.1)
    assert 1e-4 < error < 5e-2, f"relative error {error:.3g}"  # far above float32 rounding: bf16 really ran


@pytest.mark.parametrize(("option", "value", "message"), [
    ("accumulate_dtype", "float16", "accumulate dtype must be one of float64, float32"),
    ("model_dtype", "int8", "model dtype must be one of"),
    ("module_partitions", 0, "module partitions must be a positive integer"),
    ("samples_per_sequence", 0, "samples per sequence must be a positive integer"),
])
def test_bad_precision_and_partition_settings_are_refused(option, value, message):
    with pytest.raises(MsifValueError, match=message):
        FitConfig(**{option: value}).validate()


def test_several_samples_need_sampled_labels():
    with pytest.raises(MsifValueError, match="need sampled labels"):
        FitConfig(samples_per_sequence=2, label_mode="empirical").validate()
