"""Module partitions: K groups fitted one after the other give the factors of K = 1, and a fit
killed in a later group resumes reusing the files of the groups already finished
(docs/design.md, "Module partitions and owners")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_example

from hub_msif.factors.fit import CHECKPOINT_DIR, FitConfig, fit_stage
from hub_msif.factors.partition import module_groups
from hub_msif.factors.storage import MANIFEST_NAME, load_stage

NUM_SEQUENCES = 21
BATCH_SIZE = 5
NUM_BATCHES = 5  # ceil(21 / 5): 10 steps per group

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(k: int, checkpoint_every: int = 0) -> FitConfig:
    return FitConfig(batch_size=BATCH_SIZE, storage_dtype="float64", checkpoint_every=checkpoint_every,
                     module_partitions=k)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_example(tmp_path_factory.mktemp("partitions-example"), NUM_SEQUENCES)


@pytest.fixture(scope="module")
def reference(example, tmp_path_factory):
    model, corpus = example
    return fit_stage(str(model), str(corpus), tmp_path_factory.mktemp("k1"), _config(1), show_progress=False)


@pytest.mark.parametrize("k", [2, 3])
def test_k_partitions_give_the_factors_of_one(example, reference, tmp_path, k):
    model, corpus = example
    got = fit_stage(str(model), str(corpus), tmp_path / "factors", _config(k), show_progress=False)
    assert got.info["fit"]["module_partitions"] == k
    assert list(got.modules) == list(reference.modules)  # manifest in model order, whatever the groups
    for name, want in reference.modules.items():
        for key, tensor in want.tensors().items():
            other = getattr(got.modules[name], key)
            assert (other - tensor).abs().max() <= 1e-10 * tensor.abs().max(), f"K={k}: {name} {key}"
    assert not (tmp_path / "factors" / CHECKPOINT_DIR).exists()


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys

    import torch

    from hub_msif.factors.fit import FitConfig, fit_stage

    model, corpus, out, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(int(sys.argv[5]))

    def on_checkpoint(step):
        print("checkpoint", step, flush=True)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    fit_stage(model, corpus, out, FitConfig(batch_size=5, storage_dtype="float64", checkpoint_every=3,
                                             module_partitions=2), show_progress=False, on_checkpoint=on_checkpoint)
    """
)


def test_killed_in_the_second_group_resumes_reusing_the_first_groups_files(example, reference, tmp_path):
    model, corpus = example
    out = tmp_path / "factors"
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    kill_at = 2 * NUM_BATCHES + 5  # checkpoints at 3, 6, 9, the group boundary 10, then 12 and 15
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), str(model), str(corpus), str(out), str(kill_at),
                             str(torch.get_num_threads())], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert result.stdout.split() == "checkpoint 3 checkpoint 6 checkpoint 9 checkpoint 10 checkpoint 12 checkpoint 15".split()

    first = module_groups(reference.specs, 2)[0]
    files = {p.relative_to(out).as_posix(): p.stat() for p in out.rglob("*.safetensors") if CHECKPOINT_DIR not in p.parts}
    assert sorted(Path(f).stem for f in files) == sorted(first), "only the first group's files exist"
    assert not (out / MANIFEST_NAME).exists(), "the manifest is written last"

    steps: list[int] = []
    got = fit_stage(str(model), str(corpus), out, _config(2, checkpoint_every=3), show_progress=False,
                    on_checkpoint=steps.append)
    assert steps == [18], "the resumed fit did not continue from step 15"
    for relative, before in files.items():  # reused, not written again (an atomic write makes a new inode)
        after = (out / relative).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), relative
    for name, want in reference.modules.items():
        for key, tensor in want.tensors().items():
            assert (getattr(got.modules[name], key) - tensor).abs().max() <= 1e-10 * tensor.abs().max(), f"{name} {key}"
    assert load_stage(out, "pretrained").info["fit"]["module_partitions"] == 2
    assert not (out / CHECKPOINT_DIR).exists()
