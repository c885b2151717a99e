"""Two processes on CPU (gloo, through ``accelerate launch``) fit the same factors as one.

Runs the real multi-process path: ``accelerate launch --multi_gpu --num_processes 2`` on a machine
without a GPU, of a small fitting script and of the ``hub-msif fit`` command. The corpus has an odd
number of sequences, so the shards are uneven (and with batch size 5 one process has an empty last
batch). The model is float64, so the factors agree up to summation order (~1e-12).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_example

from hub_msif.factors.fit import FitConfig, fit_stage
from hub_msif.factors.storage import StageFactors, load_stage

ACCELERATE = Path(sys.executable).with_name("accelerate")
NUM_SEQUENCES = 21  # odd: 11 + 10 sequences on two processes

WORKER = textwrap.dedent(
    """
    import sys

    from hub_msif.factors.fit import FitConfig, fit_stage

    model, corpus, out, batch_size = sys.argv[1:5]
    fit_stage(model, corpus, out, FitConfig(batch_size=int(batch_size), storage_dtype="float64",
                                             checkpoint_every=0), show_progress=False)
    """
)


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, Path]:
    """A float64 tiny GPT-NeoX saved with its tokenizer, and a jsonl corpus of 21 texts."""
    return save_tiny_example(tmp_path_factory.mktemp("dist-example"), NUM_SEQUENCES)


@pytest.fixture(scope="module")
def reference(example, tmp_path_factory) -> StageFactors:
    """The single-process fit (in this process), stored in float64."""
    model, corpus = example
    out = tmp_path_factory.mktemp("dist-reference")
    return fit_stage(str(model), str(corpus), out, FitConfig(batch_size=5, storage_dtype="float64",
                                                              checkpoint_every=0), show_progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_two(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``accelerate launch`` with two processes on CPU, as ENV_NOTES.md says works (gloo)."""
    command = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
               *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, f"launch failed:\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-5000:]}"
    return result


def assert_same_factors(got: StageFactors, want: StageFactors, rtol: float) -> None:
    """Equal Lambda and eigenvalues, and the same EK-FAC operator (eigenvectors are unique only up to sign)."""
    assert list(got.modules) == list(want.modules)
    generator = torch.Generator().manual_seed(0)
    for name, w in want.modules.items():
        g = got.modules[name]
        assert g.spec == w.spec, name
        for key in ("lam", "eig_a", "eig_s"):
            a, b = getattr(g, key).double(), getattr(w, key).double()
            scale = b.abs().max()
            assert (a - b).abs().max() <= rtol * scale, f"{name} {key}: max diff {(a - b).abs().max():.3g}, scale {scale:.3g}"
        # Q_A diag(eig_a) Q_A^T is the (sign-free) covariance A; compare it directly.
        cov_a = [m.q_a.double() @ torch.diag(m.eig_a.double()) @ m.q_a.double().T for m in (g, w)]
        assert torch.allclose(cov_a[0], cov_a[1], rtol=0, atol=rtol * cov_a[1].abs().max()), name
        # The damped inverse (sign-free) applied to random gradients.
        grads = torch.randn(3, w.spec.d_out, w.spec.d_in, generator=generator, dtype=torch.float64)
        pg = g.to(torch.float64).precondition(grads, 0.1, relative=True)
        pw = w.to(torch.float64).precondition(grads, 0.1, relative=True)
        assert torch.allclose(pg, pw, rtol=0, atol=rtol * pw.abs().max()), f"{name}: preconditioned gradients differ"


def test_two_processes_fit_the_same_factors_as_one(example, reference, tmp_path):
    model, corpus = example
    script = tmp_path / "fit_worker.py"
    script.write_text(WORKER)
    out = tmp_path / "factors"
    _launch_two([str(script), str(model), str(corpus), str(out), "5"], cwd=tmp_path)

    factors = load_stage(out, "pretrained")
    fit, ref_fit = factors.info["fit"], reference.info["fit"]
    assert fit["num_processes"] == 2, "the launch did not really run two processes"
    assert ref_fit["num_processes"] == 1
    assert fit["num_sequences"] == ref_fit["num_sequences"] == NUM_SEQUENCES
    assert fit["num_tokens"] == ref_fit["num_tokens"]
    assert factors.modules[next(iter(factors.modules))].lam.dtype == torch.float64
    assert_same_factors(factors, reference, rtol=1e-9)
    assert not (out / ".msif-checkpoints").exists()


OWNER_WORKER = textwrap.dedent(
    """
    import json, sys

    import torch.distributed as dist

    from hub_msif.factors.fit import FitConfig, fit_stage

    model, corpus, out, record = sys.argv[1:5]
    kept = []
    fit_stage(model, corpus, out, FitConfig(batch_size=5, storage_dtype="float64", checkpoint_every=0,
                                             module_partitions=2),
              show_progress=False, on_reduce=lambda group, names: kept.append({"group": group, **names}))
    with open(f"{record}-rank{dist.get_rank()}.json", "w") as handle:
        json.dump(kept, handle)
    """
)


def test_two_processes_keep_only_their_owned_modules(example, reference, tmp_path):
    """Sums reduced to each module's owner: after each group's reduction a process holds the
    eigenvalues and Lambda of the modules it owns and nothing else; together they give the factors
    of one process (here also with two module partitions)."""
    from hub_msif.factors.partition import module_groups, module_owners

    model, corpus = example
    script = tmp_path / "owner_worker.py"
    script.write_text(OWNER_WORKER)
    out, record = tmp_path / "factors", tmp_path / "kept"
    _launch_two([str(script), str(model), str(corpus), str(out), str(record)], cwd=tmp_path)

    specs = reference.specs
    owners, groups = module_owners(specs, 2), module_groups(specs, 2)
    assert set(owners.values()) == {0, 1}, "both processes should own modules"
    for rank in (0, 1):
        kept = json.loads(Path(f"{record}-rank{rank}.json").read_text())
        assert [k["group"] for k in kept] == [0, 1]
        for entry in kept:
            owned = sorted(n for n in groups[entry["group"]] if owners[n] == rank)
            assert entry["lambda"] == owned, f"rank {rank}, group {entry['group']}"
            assert entry["eigenvalues"] == owned, f"rank {rank}, group {entry['group']}"
    factors = load_stage(out, "pretrained")
    assert factors.info["fit"]["num_processes"] == 2
    assert factors.info["fit"]["module_partitions"] == 2
    assert_same_factors(factors, reference, rtol=1e-9)
    assert not (out / ".msif-checkpoints").exists()


def test_cli_under_accelerate_launch_uses_both_processes(example, reference, tmp_path):
    """``accelerate launch ... -m hub_msif fit`` on CPU: one process group, one summary, same factors."""
    model, corpus = example
    out = tmp_path / "factors"
    result = _launch_two(["-m", "hub_msif.apps.cli", "fit", "--model", str(model), "--stage", "pretrained",
                          "--data", str(corpus), "--batch-size", "4", "--max-length", "64",
                          "--checkpoint-every", "1", "--out", str(out), "--json"], cwd=tmp_path)

    summary = json.loads(result.stdout)  # only the main process prints: exactly one JSON document
    assert summary["num_sequences"] == NUM_SEQUENCES
    factors = load_stage(out, "pretrained")
    assert factors.info["fit"]["num_processes"] == 2
    assert factors.info["fit"]["num_tokens"] == reference.info["fit"]["num_tokens"]
    # Stored as float32 (the CLI default): equal up to float32 rounding.
    assert_same_factors(factors, reference, rtol=1e-5)
    assert not (out / ".msif-checkpoints").exists()


def test_a_launch_without_a_process_group_is_refused(monkeypatch, example, tmp_path):
    """Launched as two processes but handed a one-process accelerator: fail instead of fitting twice alone."""
    from types import SimpleNamespace

    from hub_msif.factors.fit import fit_factors

    monkeypatch.setenv("WORLD_SIZE", "2")
    lone = SimpleNamespace(process_index=0, num_processes=1, device=torch.device("cpu"), is_main_process=True)
    with pytest.raises(RuntimeError, match="launched as 2 processes but accelerate runs 1"):
        fit_factors(torch.nn.Linear(2, 2), [{"input_ids": [1, 2], "labels": [1, 2]}], tmp_path / "out", FitConfig(),
                    pad_id=0, info={}, accelerator=lone)
    assert not (tmp_path / "out").exists()


HELD_WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import torch.distributed as dist
    from safetensors import safe_open

    from hub_msif.factors.fit import FitConfig, fit_stage

    model, corpus, out, record = sys.argv[1:5]
    held = []

    def look(step):
        rank = dist.get_rank()
        path = Path(out) / ".msif-checkpoints" / "pretrained" / f"step{step:08d}-rank{rank}.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            held.append({"step": step, "tensors": {k: str(handle.get_tensor(k).dtype) for k in handle.keys()}})

    fit_stage(model, corpus, out, FitConfig(batch_size=5, storage_dtype="float64", checkpoint_every=1),
              show_progress=False, on_checkpoint=look)
    with open(f"{record}-rank{dist.get_rank()}.json", "w") as handle:
        json.dump(held, handle)
    """
)


def test_a_process_holds_sums_and_eigenbases_of_its_owned_modules_only(example, reference, tmp_path):
    """What a process checkpoints is everything it holds (the partial sums, float64 eigenbases,
    eigenvalues and Lambda): at every step of both passes of a 2-process fit, each rank holds
    exactly its owned modules' tensors, the eigenbases in float64, and nothing of the others."""
    from hub_msif.factors.partition import module_owners

    model, corpus = example
    script = tmp_path / "held_worker.py"
    script.write_text(HELD_WORKER)
    out, record = tmp_path / "factors", tmp_path / "held"
    _launch_two([str(script), str(model), str(corpus), str(out), str(record)], cwd=tmp_path)

    owners = module_owners(reference.specs, 2)
    batches = math.ceil(math.ceil(NUM_SEQUENCES / 2) / 5)  # per pass, on each rank (the same on both)
    for rank in (0, 1):
        held = json.loads(Path(f"{record}-rank{rank}.json").read_text())
        owned = {n for n, o in owners.items() if o == rank}
        assert owned and owned != set(owners)
        assert [h["step"] for h in held] == list(range(1, 2 * batches))  # the last step is the group's end
        for h in held:
            names = {key.rsplit("/", 1)[0] for key in h["tensors"]}
            assert names == owned, f"rank {rank}, step {h['step']}: holds {sorted(names ^ owned)}"
            kinds = ("a", "s") if h["step"] <= batches else ("q_a", "q_s", "eig_a", "eig_s", "lam")
            assert set(h["tensors"]) == {f"{n}/{k}" for n in owned for k in kinds}, (rank, h["step"])
            assert set(h["tensors"].values()) == {"torch.float64"}
    assert_same_factors(load_stage(out, "pretrained"), reference, rtol=1e-9)
