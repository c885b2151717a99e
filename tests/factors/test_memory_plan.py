"""The memory plan of a fit (hub_msif/factors/memory_plan.py; docs/design.md, "Memory plan").

- Exact parts against the real objects: the parameter count of four public 7B-8B/2.8B configs
  built on the meta device (their published counts), the accumulator bytes against the fit's own
  ``CovarianceAccumulator``/``LambdaAccumulator``, the artifact size against the tensor bytes of
  saved factor files, the full-rank query against the tracked weights.
- The big configurations fit the issue's budgets on 8 processes (numbers printed with ``-s``).
- The whole plan against the peak resident memory of a real fit of the paper's scalability model
  (GPT-NeoX, 2 layers, hidden 256) in a subprocess, K = 1 and K = 4 module partitions.
- ``hub-msif fit --plan``: table, JSON, and one-line errors before any data or weights are read.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from hub_msif.apps import cli
from hub_msif.errors import MsifValueError, UnsupportedArchitectureError
from hub_msif.factors.architectures import find_modules
from hub_msif.factors.ekfac import CovarianceAccumulator, LambdaAccumulator
from hub_msif.factors.fit import FitConfig, fit_factors
from hub_msif.factors.memory_plan import format_plan, parse_size, plan_fit, plan_of_fit
from hub_msif.factors.partition import module_groups, module_owners
from hub_msif.toy.examples import tiny_model

GB = 10**9

# Public config.json values of each model (only what shapes the model; no download).
PYTHIA_2_8B = {
    "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 2560, "intermediate_size": 10240,
    "num_attention_heads": 32, "num_hidden_layers": 32, "vocab_size": 50304, "max_position_embeddings": 2048,
    "rotary_pct": 0.25, "rotary_emb_base": 10000, "use_parallel_residual": True, "hidden_act": "gelu",
    "layer_norm_eps": 1e-05, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
    "torch_dtype": "float16",
}
LLAMA_3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
    "max_position_embeddings": 8192, "rope_theta": 500000.0, "rms_norm_eps": 1e-05, "hidden_act": "silu",
    "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001,
    "torch_dtype": "bfloat16",
}
QWEN2_5_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064,
    "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "hidden_act": "silu",
    "sliding_window": 131072, "max_window_layers": 28, "use_sliding_window": False, "tie_word_embeddings": False,
    "bos_token_id": 151643, "eos_token_id": 151643, "torch_dtype": "bfloat16",
}
MISTRAL_7B = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 32000,
    "max_position_embeddings": 32768, "rope_theta": 10000.0, "rms_norm_eps": 1e-05, "hidden_act": "silu",
    "sliding_window": 4096, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
# name: (config, published parameter count, tracked modules: 4 or 7 per layer)
BIG = {
    "pythia-2.8b": (PYTHIA_2_8B, 2_775_208_960, 4 * 32),
    "llama-3-8b": (LLAMA_3_8B, 8_030_261_248, 7 * 32),
    "qwen2.5-7b": (QWEN2_5_7B, 7_615_616_512, 7 * 28),
    "mistral-7b": (MISTRAL_7B, 7_241_732_096, 7 * 32),
}


def config_folder(tmp_path: Path, name: str, values: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(values))
    return folder


@pytest.fixture(scope="module")
def big_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("configs")
    return {name: config_folder(root, name, values) for name, (values, _, _) in BIG.items()}


# ----------------------------------------------------------------------------------------------
# The big configurations


@pytest.mark.parametrize("name", list(BIG))
def test_big_config_fits_70gb_on_8_processes(big_folders, name):
    values, parameters, modules = BIG[name]
    plan = plan_fit(big_folders[name], num_processes=8, max_memory="70GB")
    print(f"\n{name}: {plan.note}; peak {plan.per_process_peak_bytes / GB:.2f} GB "
          f"({plan.peak_process.peak_phase}), model {plan.model_bytes / GB:.2f} GB")
    assert plan.parameters == parameters  # the meta model is the published architecture
    assert len(plan.tracked_modules) == modules
    assert plan.model_dtype == values["torch_dtype"]
    assert plan.fits and plan.per_process_peak_bytes <= 70 * GB
    assert plan.passes == 2 * plan.module_partitions
    if plan.module_partitions > 1:  # the smallest K: one partition fewer does not fit
        fewer = plan_fit(big_folders[name], FitConfig(module_partitions=plan.module_partitions - 1), num_processes=8)
        assert fewer.per_process_peak_bytes > 70 * GB


def test_pythia_2_8b_fits_40gb_on_8_processes(big_folders):
    plan = plan_fit(big_folders["pythia-2.8b"], num_processes=8, max_memory="40GB")
    print(f"\npythia-2.8b: {plan.note}; peak {plan.per_process_peak_bytes / GB:.2f} GB")
    assert plan.fits and plan.per_process_peak_bytes <= 40 * GB


def test_one_process_holds_everything(big_folders):
    """K = 1 on one process: every module's accumulators at once (today's 386 GB-class fit)."""
    plan = plan_fit(big_folders["llama-3-8b"])
    assert plan.num_processes == 1 and plan.module_partitions == 1 and plan.passes == 2
    p = plan.processes[0]
    cov = sum(m.covariance_elements for m in plan.tracked_modules)
    assert p.phases["covariance"]["covariance_accumulators"] == 8 * cov
    assert p.phases["lambda"]["eigenbases_float64"] == 8 * cov
    assert p.phases["lambda"]["eigenbasis_copies"] == 4 * cov  # bfloat16 model: float32 compute
    assert p.phases["lambda"]["owned_eigenvalues_float64"] == 8 * sum(m.eigenvalue_elements for m in plan.tracked_modules)
    assert plan.per_process_peak_bytes > 300 * GB


def test_memory_falls_with_partitions_processes_and_float32(big_folders):
    folder = big_folders["pythia-2.8b"]
    k1, k4 = plan_fit(folder, FitConfig(module_partitions=1)), plan_fit(folder, FitConfig(module_partitions=4))
    n8 = plan_fit(folder, FitConfig(module_partitions=4), num_processes=8)
    f32 = plan_fit(folder, FitConfig(module_partitions=4, accumulate_dtype="float32"), num_processes=8)
    acc = lambda plan: plan.peak_process.phases["covariance"]["covariance_accumulators"]  # noqa: E731
    assert acc(k4) < acc(k1) / 3.5  # about K-fold (balanced greedy)
    assert n8.per_process_peak_bytes < k4.per_process_peak_bytes
    assert acc(f32) * 2 == acc(n8)


# ----------------------------------------------------------------------------------------------
# Exact parts against the real objects


def _tiny(arch="gpt_neox"):
    return tiny_model(arch, vocab_size=64, hidden=32, layers=2, heads=4, kv_heads=2, ffn=64)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("k", [1, 3])
def test_accumulator_bytes_equal_the_fits_accumulators(arch, k):
    model = _tiny(arch)
    tracked = find_modules(model)
    plan = plan_fit(model, FitConfig(module_partitions=k, accumulate_dtype="float64"))
    groups = module_groups(tracked, k)
    by_name = {t.name: t for t in tracked}
    cov_bytes, lam_bytes, copy_bytes = [], [], []
    for names in groups:
        covs = [CovarianceAccumulator(by_name[n]) for n in names]
        cov_bytes.append(sum(c.a.nbytes + c.s.nbytes for c in covs))
        lams = [LambdaAccumulator(by_name[n], *(x.contiguous() for x in c.eigendecompose()[1::2]), torch.float32)
                for n, c in zip(names, covs)]
        lam_bytes.append(sum(x.lam.nbytes for x in lams))
        copy_bytes.append(sum(x.q_a.nbytes + x.q_s.nbytes for x in lams))
    phases = plan.processes[0].phases
    assert phases["covariance"]["covariance_accumulators"] in cov_bytes  # of the partition with the highest peak
    assert (phases["lambda"]["lambda_accumulators"], phases["lambda"]["eigenbasis_copies"]) in zip(lam_bytes, copy_bytes)
    assert [m.partition for m in plan.tracked_modules] == [
        next(i for i, g in enumerate(groups) if t.name in g) for t in tracked]


def test_owners_follow_the_fit_partition_rules():
    model = _tiny("llama")
    tracked = find_modules(model)  # 14 modules
    plan = plan_fit(model, FitConfig(module_partitions=2), num_processes=16)
    owners = module_owners(tracked, 16)
    assert {m.name: m.owner for m in plan.tracked_modules} == owners
    assert [p.owned_modules for p in plan.processes] == [sum(1 for o in owners.values() if o == r) for r in range(16)]
    idle = [p for p in plan.processes if p.owned_modules == 0]
    assert len(idle) == 2
    for p in idle:  # only owners eigendecompose and keep eigenvalues
        assert p.phases["eigendecomposition"]["eigh_workspace"] == 0
        assert p.phases["lambda"]["owned_eigenvalues_float64"] == 0
    busy = max(plan.processes, key=lambda p: p.phases["eigendecomposition"]["eigh_workspace"])
    assert busy.phases["eigendecomposition"]["eigh_workspace"] > 0
    assert busy.peak_bytes >= idle[0].peak_bytes


def _tensor_bytes(path: Path) -> int:
    raw = path.read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    return len(raw) - 8 - header


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_artifact_and_query_bytes_equal_real_files_and_weights(arch, tmp_path):
    model = _tiny(arch)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 64, (6, 10), generator=gen)
    fit_factors(model, [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids], tmp_path,
                FitConfig(batch_size=3, checkpoint_every=0), pad_id=0, info={}, show_progress=False)
    files = sorted((tmp_path / "pretrained").rglob("*.safetensors"))
    plan = plan_fit(model)
    assert plan.artifact_bytes == sum(_tensor_bytes(f) for f in files)
    tracked_weights = sum(model.get_submodule(t.name).weight.numel()
                          + (model.get_submodule(t.name).bias.numel() if t.has_bias else 0)
                          for t in find_modules(model))
    assert plan.full_rank_query_bytes == plan.query_bytes == 4 * tracked_weights
    low = plan_fit(model, query_rank=2)
    assert low.query_bytes == 4 * sum(min(2 * (m.d_in + m.d_out), m.d_in * m.d_out) for m in low.tracked_modules)
    assert low.query_bytes < plan.query_bytes


def test_plan_of_a_fit_config():
    model = _tiny("llama").double()
    config = FitConfig(stage="finetuned", batch_size=3, modules="mlp", storage_dtype="bfloat16")
    plan = plan_of_fit(model, config, num_processes=2, max_length=40)
    expected = plan_fit(model, replace(config, model_dtype="float64"), num_processes=2, max_length=40)
    assert (expected.stage, expected.model_dtype, expected.batch_size, expected.modules, expected.storage_dtype) == (
        "finetuned", "float64", 3, "mlp", "bfloat16")
    assert plan == expected
    assert plan.compute_dtype == "float64" and plan.processes[0].phases["lambda"]["eigenbasis_copies"] == 0
    assert f"{len(plan.tracked_modules)} tracked modules (mlp), 2 process(es)" in format_plan(plan)


def test_model_bytes_follow_the_model_dtype(big_folders):
    plan16 = plan_fit(big_folders["mistral-7b"])
    plan32 = plan_fit(big_folders["mistral-7b"], FitConfig(model_dtype="float32"))
    assert plan16.model_dtype == "bfloat16"
    assert abs(plan32.model_bytes - 2 * plan16.model_bytes) < 10**6  # buffers are tiny
    assert plan16.model_bytes >= 2 * 7_241_732_096


# ----------------------------------------------------------------------------------------------
# Against a measured fit: peak resident memory in a subprocess

MEASURE = textwrap.dedent(
    """
    import gc, json, sys, tempfile
    import torch
    torch.set_num_threads(1)
    from hub_msif.factors.fit import FitConfig, fit_factors
    from hub_msif.toy.examples import tiny_model

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    args = json.loads(sys.argv[1])
    # Warm-up: a tiny fit loads every library the fit uses (accelerate, safetensors, tqdm, ...),
    # so the baseline below is the runtime, and what comes after it is the fit's own memory.
    warm = tiny_model("gpt_neox", vocab_size=64, hidden=32, layers=2, heads=4, ffn=64)
    text = {"input_ids": list(range(4, 20)), "labels": list(range(4, 20))}
    fit_factors(warm, [text, text], tempfile.mkdtemp(), FitConfig(batch_size=2, checkpoint_every=0),
                pad_id=0, info={}, show_progress=False)
    del warm
    gc.collect()
    baseline = status("VmRSS:")
    model = tiny_model("gpt_neox", vocab_size=args["vocab"], hidden=256, layers=2, heads=2, ffn=1024,
                       max_positions=args["length"])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, args["vocab"], (args["sequences"], args["length"]), generator=gen)
    sequences = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    extra = {"module_partitions": args["k"]} if args["k"] != 1 else {}
    fit_factors(model, sequences, args["out"], FitConfig(batch_size=args["batch"], checkpoint_every=0, **extra),
                pad_id=0, info={}, show_progress=False)
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM:")}))
    """
)
PAPER = {"vocab": 1024, "length": 256, "batch": 8, "sequences": 16}


@pytest.mark.parametrize("k", [1, 4])
def test_plan_within_25_percent_of_measured_peak(k, tmp_path):
    """Plan vs peak RSS of the fit of the paper's scalability model (GPT-NeoX, 2 layers, hidden 256).

    glibc's malloc keeps freed blocks of up to 32 MB in its heap by default (its mmap threshold
    rises to the largest freed block), so a process's RSS then also counts cached free memory;
    ``MALLOC_MMAP_THRESHOLD_`` fixes the threshold so that freed tensors return to the system and
    the peak RSS is the peak of live memory, which is what the plan adds up. The runtime measured
    after a warm-up fit is subtracted (the plan excludes it). Both numbers are printed with ``-s``.
    """
    args = dict(PAPER, k=k, out=str(tmp_path / "factors"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    done = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(args)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    fit_bytes = measured["peak"] - measured["baseline"]
    model = tiny_model("gpt_neox", vocab_size=PAPER["vocab"], hidden=256, layers=2, heads=2, ffn=1024,
                       max_positions=PAPER["length"])
    plan = plan_fit(model, FitConfig(module_partitions=k, batch_size=PAPER["batch"]), max_length=PAPER["length"])
    print(f"\nK={k}: plan {plan.per_process_peak_bytes / 1e6:.1f} MB ({plan.peak_process.peak_phase}), "
          f"measured {fit_bytes / 1e6:.1f} MB, plan/measured {plan.per_process_peak_bytes / fit_bytes:.3f}")
    assert abs(plan.per_process_peak_bytes - fit_bytes) <= 0.25 * fit_bytes


# ----------------------------------------------------------------------------------------------
# Inputs and the command line


def test_parse_size():
    assert parse_size("70GB") == 70 * GB == parse_size("70 gb") == parse_size("70G") == parse_size(7e10)
    assert parse_size("40GiB") == 40 * 2**30
    assert parse_size("512MB") == 512 * 10**6
    assert parse_size("1000") == 1000
    for bad in ("", "GB", "70XB", "-3GB", "0", "1e999GB", "nan"):
        with pytest.raises(MsifValueError):
            parse_size(bad)


def test_nothing_fits_says_what_would(big_folders):
    with pytest.raises(MsifValueError) as err:  # batch 8 x 512: the weights and activations alone are ~40 GB
        plan_fit(big_folders["llama-3-8b"], num_processes=8, max_memory="40GB")
    message = str(err.value)
    assert "\n" not in message and "nothing fits 40.00 GB per process" in message
    assert "would fit: --batch-size 4 with" in message
    smaller = plan_fit(big_folders["llama-3-8b"], FitConfig(batch_size=4), num_processes=8, max_memory="40GB")
    assert f"--batch-size 4 with {smaller.module_partitions} partition(s)" in message
    with pytest.raises(MsifValueError, match="no change tried fits"):
        plan_fit(big_folders["llama-3-8b"], num_processes=8, max_memory="10GB")  # the weights alone are 16 GB
    with pytest.raises(MsifValueError, match="partitions would fit"):
        plan_fit(big_folders["pythia-2.8b"], FitConfig(module_partitions=1), num_processes=8, max_memory="40GB",
                 choose_partitions=False)


def test_unknown_architecture(tmp_path):
    folder = config_folder(tmp_path, "alien", {"model_type": "no-such-architecture", "hidden_size": 8})
    with pytest.raises(UnsupportedArchitectureError, match="no-such-architecture"):
        plan_fit(folder)


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        code = cli.main(args)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plan_table_and_json(big_folders, capsys, tmp_path):
    folder = big_folders["pythia-2.8b"]
    base = ["fit", "--plan", "--model", str(folder), "--stage", "pretrained", "--num-processes", "8"]
    code, out, err = _cli(base + ["--max-memory", "40GB"], capsys)
    assert code == 0, err
    assert "per-process peak" in out and "smallest number of module partitions that fits 40.00 GB" in out
    code, out, err = _cli(base + ["--max-memory", "40GB", "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    plan = plan_fit(folder, num_processes=8, max_memory="40GB")
    assert data["per_process_peak_bytes"] == plan.per_process_peak_bytes <= 40 * GB
    assert data["module_partitions"] == plan.module_partitions and data["passes"] == plan.passes
    assert format_plan(plan) in _cli(base + ["--max-memory", "40GB"], capsys)[1]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case, extra, needle", [
    ("nothing-fits", ["--max-memory", "1GB"], "nothing fits 1.00 GB per process"),
    ("bad-size", ["--max-memory", "70XB"], "argument --max-memory: bad memory size '70XB'"),
    ("zero-size", ["--max-memory", "0GB"], "argument --max-memory: bad memory size"),
    ("unknown-architecture", ["--model", "{alien}"], "an architecture transformers does not know"),
    ("no-config", ["--model", "{empty}"], "has no config.json"),
    ("too-many-partitions", ["--module-partitions", "999"], "999 module partitions but only 128"),
])
def test_cli_bad_input_one_line_before_any_data(case, extra, needle, big_folders, tmp_path, capsys, monkeypatch):
    """Each refusal is one line on stderr, exit 2; with and without --plan (a real fit is planned
    first when --max-memory is given), before the data (which does not exist) is looked at."""
    alien = config_folder(tmp_path, "alien", {"model_type": "no-such-architecture", "hidden_size": 8})
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = [x.format(alien=alien, empty=empty) for x in extra]
    base = ["fit", "--model", str(big_folders["pythia-2.8b"]), "--stage", "pretrained", "--num-processes", "8"]
    import hub_msif.data

    monkeypatch.setattr(hub_msif.data, "load_rows", lambda *a, **k: pytest.fail("data was read"))
    runs = [base + extra + ["--plan"]]
    if case in ("nothing-fits", "bad-size"):
        runs.append(base + extra + ["--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "out")])
    for args in runs:
        code, out, err = _cli(args, capsys)
        assert code == 2 and out == ""
        assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "out").exists()


def test_cli_plan_needs_no_data_or_out_but_a_fit_does(capsys, big_folders):
    code, _, err = _cli(["fit", "--model", str(big_folders["mistral-7b"]), "--stage", "pretrained"], capsys)
    assert code == 2 and "required: --data, --out" in err
    code, out, _ = _cli(["fit", "--plan", "--model", str(big_folders["mistral-7b"]), "--stage", "finetuned",
                         "--modules", "mlp", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["stage"] == "finetuned" and data["tracked_modules"] == 3 * 32 and data["modules"] == "mlp"


def test_fit_plan_measure_times_the_planned_batch_and_estimates_the_fit(tmp_path, capsys):
    """``fit --plan --measure``: one timed forward and backward of the planned batch (random weights
    from the config), the estimate = seconds per token x tokens to fit, and --json carries it."""
    folder = tmp_path / "tiny"
    _tiny("gpt_neox").save_pretrained(folder)
    base = ["fit", "--plan", "--measure", "--model", str(folder), "--stage", "pretrained", "--batch-size", "2",
            "--max-length", "16", "--threads", "1"]
    assert cli.main(base + ["--max-sequences", "100", "--module-partitions", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    measured = data["measured"]
    assert measured["batch_size"] == 2 and measured["max_length"] == 16 and measured["tokens"] == 100 * 16
    assert measured["forward_seconds"] > 0 and measured["backward_seconds"] > 0
    assert measured["covariance_update_seconds"] > 0 and measured["lambda_update_seconds"] > 0
    per_batch = (2 * (2 * measured["forward_seconds"] + 2 * measured["backward_seconds"])
                 + measured["covariance_update_seconds"] + measured["lambda_update_seconds"])
    assert measured["seconds_per_batch"] == pytest.approx(per_batch)
    assert measured["estimated_seconds"] == pytest.approx(per_batch / 32 * 1600)
    assert data["module_partitions"] == 2 and data["per_process_peak_bytes"] > 0
    assert cli.main(base) == 0
    text = capsys.readouterr().out
    assert "(sizes in GB = 10^9 bytes)" in text and "per million tokens" in text and "measured on cpu" in text
    assert cli.main(base + ["--max-tokens", "5000"]) == 0
    assert "estimated fit time for 5,000 tokens:" in capsys.readouterr().out


def test_measure_without_plan_is_refused_in_one_line(tmp_path, capsys):
    status = cli.main(["fit", "--measure", "--model", str(tmp_path), "--stage", "pretrained", "--data", "x.txt",
                       "--out", str(tmp_path / "o")])
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--measure goes with --plan" in err


TINY_NEOX = {"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 64,
             "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 512,
             "max_position_embeddings": 128, "rotary_pct": 0.25}


@pytest.mark.parametrize("field, value, needle", [
    ("vocab_size", 512.0, "field vocab_size must be a positive integer, got 512.0"),
    ("num_hidden_layers", "2", "field num_hidden_layers must be a positive integer, got '2'"),
    ("hidden_size", 0, "field hidden_size must be a positive integer, got 0"),
    ("num_attention_heads", 0, "field num_attention_heads must be a positive integer, got 0"),
    ("num_attention_heads", 5, "field num_attention_heads (5) must divide the hidden size (64)"),
    ("num_hidden_layers", 0, "field num_hidden_layers must be a positive integer, got 0"),
    ("intermediate_size", -4, "field intermediate_size must be a positive integer, got -4"),
])
def test_plan_of_an_odd_config_is_one_line_naming_the_field(field, value, needle, tmp_path, capsys):
    """Issue 23 item 4: transformers tracebacks (or a misleading "MoE experts" error for 0 layers)
    become one line naming the config.json field, exit 2, nothing written."""
    folder = config_folder(tmp_path, "odd", {**TINY_NEOX, field: value})
    code, out, err = _cli(["fit", "--plan", "--model", str(folder), "--stage", "pretrained"], capsys)
    assert code == 2 and out == "", err
    assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["config.json", "odd"]
    assert len(plan_fit(config_folder(tmp_path, "fine", TINY_NEOX)).tracked_modules) == 8  # the unedited config plans
