"""Resumable fits and atomic writes: a fit killed with SIGKILL resumes to the same factors.

The kills are real: a child Python process runs ``fit_stage`` with a checkpoint after every batch
and sends itself SIGKILL from ``on_checkpoint`` at a chosen step (in the covariance pass, at the
phase boundary, in the eigenvalue-correction pass). The folder is then resumed in this process and
compared, bit for bit (float64 storage), with an uninterrupted fit in another folder.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_example
from safetensors.torch import load as st_load

from hub_msif.artifacts.atomic import atomic_write_bytes
from hub_msif.artifacts.manifest import read_manifest
from hub_msif.data import CorpusSpec
from hub_msif.errors import FactorError
from hub_msif.factors.fit import CHECKPOINT_DIR, FitConfig, fit_stage
from hub_msif.factors.storage import MANIFEST_NAME, StageFactors, load_stage

NUM_SEQUENCES = 21
BATCH_SIZE = 5
NUM_BATCHES = 5  # per pass with one process: ceil(21 / 5); steps 1..9 are checkpointed, 10 finishes

KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys

    import torch

    from hub_msif.factors.fit import FitConfig, fit_stage

    model, corpus, out, kill_at, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    torch.set_num_threads(int(sys.argv[6]))  # as in the test process: matmul rounding depends on threads

    def on_checkpoint(step):
        print("checkpoint", step, flush=True)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    fit_stage(model, corpus, out, FitConfig(batch_size=BATCH_SIZE, storage_dtype="float64", checkpoint_every=1, seed=seed),
              show_progress=False, on_checkpoint=on_checkpoint)
    print("finished", flush=True)
    """
).replace("BATCH_SIZE", str(BATCH_SIZE))


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, Path]:
    """A float64 tiny GPT-NeoX saved with its tokenizer, and a jsonl corpus of 21 texts."""
    return save_tiny_example(tmp_path_factory.mktemp("resume-example"), NUM_SEQUENCES)


def _config(seed: int = 0, checkpoint_every: int = 1, batch_size: int = BATCH_SIZE) -> FitConfig:
    return FitConfig(batch_size=batch_size, storage_dtype="float64", checkpoint_every=checkpoint_every, seed=seed)


@pytest.fixture(scope="module")
def uninterrupted(example, tmp_path_factory):
    """Uninterrupted fits (no checkpoints at all) for seeds 0 and 1: ``{seed: (folder, factors)}``."""
    model, corpus = example
    runs = {}
    for seed in (0, 1):
        out = tmp_path_factory.mktemp(f"uninterrupted-{seed}")
        runs[seed] = out, fit_stage(str(model), str(corpus), out, _config(seed, checkpoint_every=0), show_progress=False)
    return runs


def assert_bitwise_equal(got: StageFactors, want: StageFactors) -> None:
    assert list(got.modules) == list(want.modules)
    for name, w in want.modules.items():
        for key, tensor in w.tensors().items():
            assert torch.equal(getattr(got.modules[name], key), tensor), f"{name} {key} differs"
    for key in ("num_sequences", "num_tokens", "num_processes", "seed"):
        assert got.info["fit"][key] == want.info["fit"][key], key
    # Same bytes on disk, too: the manifest's per-file sha256 agree.
    assert [m["sha256"] for m in got.info["modules"]] == [m["sha256"] for m in want.info["modules"]]


def _module_files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*.safetensors") if CHECKPOINT_DIR not in p.parts]


def _run_and_kill(example, out: Path, kill_at: int, seed: int = 0) -> subprocess.CompletedProcess:
    model, corpus = example
    script = out.parent / f"kill_{out.name}.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    args = [str(model), str(corpus), str(out), str(kill_at), str(seed), str(torch.get_num_threads())]
    result = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == -signal.SIGKILL, (
        f"expected death by SIGKILL, got {result.returncode}:\n{result.stdout}\n{result.stderr[-3000:]}"
    )
    assert "finished" not in result.stdout
    assert result.stdout.split() == " ".join(f"checkpoint {s}" for s in range(1, kill_at + 1)).split()
    return result


@pytest.mark.parametrize("kill_at", [2, NUM_BATCHES, NUM_BATCHES + 2], ids=["covariance-pass", "phase-boundary", "lambda-pass"])
def test_fit_killed_mid_pass_resumes_to_the_same_factors(example, uninterrupted, tmp_path, kill_at, caplog):
    model, corpus = example
    out = tmp_path / "factors"
    _run_and_kill(example, out, kill_at)

    # Nothing loadable is left behind: no manifest, no module files; only the committed checkpoint.
    assert not (out / MANIFEST_NAME).exists()
    assert _module_files(out) == []
    with pytest.raises(FactorError, match="no manifest"):
        load_stage(out, "pretrained")
    checkpoint = out / CHECKPOINT_DIR / "pretrained"
    assert json.loads((checkpoint / "latest.json").read_text())["step"] == kill_at
    assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == [f"step{kill_at:08d}-rank0.safetensors"]

    steps: list[int] = []
    caplog.set_level(logging.INFO, logger="hub_msif.factors.fit")
    resumed = fit_stage(str(model), str(corpus), out, _config(), show_progress=False, on_checkpoint=steps.append)

    assert f"from checkpoint step {kill_at}" in caplog.text
    assert steps == list(range(kill_at + 1, 2 * NUM_BATCHES)), "the resumed run did not continue after the checkpoint"
    assert_bitwise_equal(resumed, uninterrupted[0][1])
    assert_bitwise_equal(load_stage(out, "pretrained"), uninterrupted[0][1])
    assert not (out / CHECKPOINT_DIR).exists(), "the checkpoint folder outlived a successful fit"


class _Stop(Exception):
    pass


def _stop_at(step_to_stop: int):
    def on_checkpoint(step: int) -> None:
        if step == step_to_stop:
            raise _Stop

    return on_checkpoint


@pytest.mark.parametrize("change", ["seed", "batch_size", "data"])
def test_checkpoint_of_other_settings_is_ignored(example, uninterrupted, tmp_path, change, caplog):
    """A checkpoint left by a fit with other settings or data is not resumed; the fit starts over."""
    model, corpus = example
    out = tmp_path / "factors"
    stale = {"seed": dict(seed=1), "batch_size": dict(batch_size=4), "data": {}}[change]
    stale_corpus = CorpusSpec(data=str(corpus), max_sequences=NUM_SEQUENCES - 2) if change == "data" else None
    with pytest.raises(_Stop):
        fit_stage(str(model), str(corpus), out, _config(**stale), corpus=stale_corpus, show_progress=False,
                  on_checkpoint=_stop_at(3))
    assert json.loads((out / CHECKPOINT_DIR / "pretrained" / "latest.json").read_text())["step"] == 3
    assert not (out / MANIFEST_NAME).exists()

    steps: list[int] = []
    caplog.set_level(logging.INFO, logger="hub_msif.factors.fit")
    factors = fit_stage(str(model), str(corpus), out, _config(), show_progress=False, on_checkpoint=steps.append)

    assert "ignoring checkpoint" in caplog.text
    assert "resuming" not in caplog.text
    assert steps[0] == 1, "the fit resumed a checkpoint of other settings"
    assert_bitwise_equal(factors, uninterrupted[0][1])
    assert not (out / CHECKPOINT_DIR).exists()


def test_storage_dtype_and_checkpoint_interval_do_not_block_resuming(example, uninterrupted, tmp_path, caplog):
    """Neither changes the partial sums, so a checkpoint resumes under other values of both."""
    model, corpus = example
    out = tmp_path / "factors"
    with pytest.raises(_Stop):
        fit_stage(str(model), str(corpus), out, _config(checkpoint_every=2), show_progress=False, on_checkpoint=_stop_at(6))
    caplog.set_level(logging.INFO, logger="hub_msif.factors.fit")
    config = _config(checkpoint_every=3)
    config.storage_dtype = "float32"
    factors = fit_stage(str(model), str(corpus), out, config, show_progress=False)
    assert "from checkpoint step 6" in caplog.text
    want = uninterrupted[0][1]
    for name, w in want.modules.items():
        assert torch.equal(factors.modules[name].lam, w.lam.float()), name


# --- atomic writes ------------------------------------------------------------------------------


def test_atomic_write_that_fails_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old contents")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_bytes(target, b"new contents that never fully arrive")
    assert target.read_bytes() == b"old contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"], "a temporary file was left behind"


SAVE_KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys

    from hub_msif.factors.storage import load_stage, save_stage

    source, target, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    new = load_stage(source, "pretrained")
    real_fsync, calls = os.fsync, [0]

    def fsync_then_die(fd):
        calls[0] += 1
        if calls[0] == kill_at:  # the bytes of this file are written, not yet renamed into place
            os.kill(os.getpid(), signal.SIGKILL)
        real_fsync(fd)

    os.fsync = fsync_then_die
    save_stage(target, "pretrained", new.modules, new.info, "float64")
    """
)


def test_save_killed_mid_write_never_loads_a_mix(uninterrupted, tmp_path):
    """SIGKILL while overwriting a stage: every file is whole (old or new) and the stale manifest refuses to load."""
    old_dir, old = uninterrupted[0]
    new_dir, new = uninterrupted[1]
    target = tmp_path / "factors"
    target.mkdir()
    for path in old_dir.rglob("*"):
        if path.is_file():
            (target / path.relative_to(old_dir)).parent.mkdir(parents=True, exist_ok=True)
            (target / path.relative_to(old_dir)).write_bytes(path.read_bytes())
    manifest_before = (target / MANIFEST_NAME).read_bytes()

    script = tmp_path / "kill_save.py"
    script.write_text(SAVE_KILL_SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(new_dir), str(target), "3"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]

    assert (target / MANIFEST_NAME).read_bytes() == manifest_before
    entries = old.info["modules"]
    old_bytes = {e["file"]: (old_dir / e["file"]).read_bytes() for e in entries}
    new_bytes = {e["file"]: (new_dir / e["file"]).read_bytes() for e in entries}
    states = []
    for entry in entries:
        data = (target / entry["file"]).read_bytes()
        assert data in (old_bytes[entry["file"]], new_bytes[entry["file"]]), f"{entry['file']} is half-written"
        st_load(data)
        states.append("new" if data == new_bytes[entry["file"]] else "old")
    assert states == ["new", "new"] + ["old"] * (len(entries) - 2)
    with pytest.raises(FactorError, match=rf"{entries[0]['file']}.*corrupted or was altered"):
        load_stage(target, "pretrained")

    # Writing the stage again repairs the folder.
    from hub_msif.factors.storage import save_stage

    save_stage(target, "pretrained", new.modules, new.info, "float64")
    assert_bitwise_equal(load_stage(target, "pretrained"), new)


@pytest.mark.parametrize("damage", ["truncate", "empty", "append"])
def test_damaged_module_file_is_refused_naming_it(uninterrupted, tmp_path, damage):
    source, _ = uninterrupted[0]
    folder = tmp_path / "factors"
    folder.mkdir()
    manifest = read_manifest(source)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    entries = manifest["stages"]["pretrained"]["modules"]
    for entry in entries:
        (folder / entry["file"]).parent.mkdir(parents=True, exist_ok=True)
        (folder / entry["file"]).write_bytes((source / entry["file"]).read_bytes())
    victim = folder / entries[-1]["file"]
    data = victim.read_bytes()
    victim.write_bytes({"truncate": data[: len(data) // 2], "empty": b"", "append": data + b"\0"}[damage])

    with pytest.raises(FactorError) as info:
        load_stage(folder, "pretrained")
    assert str(victim) in str(info.value)
    assert "corrupted" in str(info.value)
    # Other modules still load on their own (one file per module).
    assert list(load_stage(folder, "pretrained", modules=[entries[0]["name"]]).modules) == [entries[0]["name"]]


def test_saving_the_same_factors_twice_writes_the_same_bytes(uninterrupted, tmp_path):
    """Module files are byte-reproducible, so a repeated fit or save has the same sha256 (and Hub commit)."""
    from hub_msif.factors.storage import save_stage

    _, factors = uninterrupted[0]
    manifests = [save_stage(tmp_path / f"copy{i}", "pretrained", factors.modules, factors.info, "float64")
                 for i in range(3)]
    hashes = [[m["sha256"] for m in manifest["stages"]["pretrained"]["modules"]] for manifest in manifests]
    assert hashes[0] == hashes[1] == hashes[2] == [m["sha256"] for m in factors.info["modules"]]
