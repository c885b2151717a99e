"""Attribution on a chosen device and dtype, and the attribution plan (docs/design.md, "Device and attribution plan").

A module-scoped fixture trains the tiny pair (``save_tiny_pair``) and fits both stages' factors. On
this CPU-only machine: ``cuda`` is refused in one line; ``cpu`` gives the scores of the scoring
functions called directly; a bfloat16 pair stays close to float32; ``attribute --plan`` counts the
factor files' and the models' bytes exactly.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import fit_tiny_pair, save_tiny_pair
from safetensors.torch import load_file

from hub_msif.apps import cli
from hub_msif.artifacts.manifest import read_manifest
from hub_msif.attribution.attributor import Attributor
from hub_msif.attribution.device import check_device_text, resolve_device
from hub_msif.attribution.plan import format_attribution_plan, plan_stages
from hub_msif.attribution.scoring import per_example_gradients, precondition_queries, score_candidates
from hub_msif.errors import MsifValueError
from hub_msif.models import load_model
from hub_msif.toy.examples import example_texts

pytestmark = pytest.mark.usefixtures("one_thread")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
DOCUMENTS = [{"id": i, "text": t} for i, t in enumerate(example_texts(12, seed=5))]
PROMPT, ANSWER = "what does the cat see ?", "the river"
# Measured on the tiny pair (hidden 32, deterministic): bfloat16 models against float32, max |difference|
# of the scores / max |score| = 0.0214 (MS-IF), 0.0208 (SS-IF), 0.0160 (GDP); the bound is about 2x that.
BF16_BOUND = 0.04


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("device_pair")
    made = save_tiny_pair(root)
    factors = root / "factors"
    fit_tiny_pair(made, factors, max_length=64)
    documents = root / "documents.jsonl"
    documents.write_text("".join(json.dumps(d) + "\n" for d in DOCUMENTS))
    return {**made, "factors": factors, "documents": documents}


@pytest.fixture(scope="module")
def cpu_attributor(pair):
    return Attributor(pair["factors"], device="cpu")


# -- the device ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["gpu", "cuda:x", "cpu:0", "auto:1", "", "cuda:-1"])
def test_malformed_device_is_refused(text):
    with pytest.raises(MsifValueError, match="device must be auto, cpu, cuda or cuda:N"):
        check_device_text(text)


def test_auto_and_cpu_resolve_on_this_machine():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@NO_CUDA
@pytest.mark.parametrize("text", ["cuda", "cuda:0", "CUDA:1"])
def test_cuda_without_cuda_is_refused_by_the_library(text):
    with pytest.raises(MsifValueError, match=r"device 'cuda(:\d)?' asked for, but torch sees no CUDA device"):
        resolve_device(text)


@NO_CUDA
@pytest.mark.parametrize("command", ["attribute", "demo"])
def test_cuda_without_cuda_is_one_line_and_exit_2(command, pair, tmp_path, capsys):
    if command == "attribute":
        argv = ["attribute", "--factors", str(pair["factors"]), "--documents", str(pair["documents"]),
                "--prompt", PROMPT, "--answer", ANSWER, "--device", "cuda"]
    else:
        argv = ["demo", "--cache", str(tmp_path / "demo"), "--no-publish", "--device", "cuda:0"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cuda" in err and "no CUDA device" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()  # refused before the demo built anything


def test_malformed_device_option_exits_2(pair, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["attribute", "--factors", str(pair["factors"]), "--documents", str(pair["documents"]),
                  "--prompt", PROMPT, "--device", "gpu"])
    assert stop.value.code == 2
    assert "device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_cpu_scores_equal_the_scoring_functions_called_directly(pair, cpu_attributor):
    """``device="cpu"``: the scores of today's flow (gradients, preconditioning and the fast path
    called one by one on the models and factors loaded as the manifest records them)."""
    att = cpu_attributor
    assert att.device == torch.device("cpu")
    assert all(next(m.parameters()).device.type == "cpu" for m in att.models.values())
    texts = [d["text"] for d in DOCUMENTS]
    total, _ = att.score([(PROMPT, ANSWER)], texts)
    models = {s: load_model(str(pair[s]))[0] for s in ("pretrained", "finetuned")}
    specs = att.specs
    grads = per_example_gradients(models["finetuned"], specs, [att.query_sequence(PROMPT, ANSWER)], att.pad_id)
    weights = precondition_queries(grads, "ms-if", att.factors["finetuned"], att.factors["pretrained"], 0.1, True)
    reference = score_candidates(models["pretrained"], specs, weights, [att.document_sequence(t) for t in texts],
                                 att.pad_id).total
    assert total.dtype == reference.dtype == torch.float32 and total.device.type == "cpu"
    assert float((total - reference).abs().max()) <= 1e-6 * float(reference.abs().max())
    default, _ = Attributor(pair["factors"]).score([(PROMPT, ANSWER)], texts)  # auto is the CPU here
    assert torch.equal(default, total)


def test_factors_are_used_in_place_not_copied_per_call(cpu_attributor):
    """Factors stored in float32 on the gradients' device: ``operands`` hands out the stored tensors."""
    module = next(iter(cpu_attributor.factors["pretrained"].modules.values()))
    grad = torch.zeros(1, module.spec.d_out, module.spec.d_in)
    q_a, q_s, _ = module.operands(grad, 0.1, True)
    assert q_a.data_ptr() == module.q_a.data_ptr() and q_s.data_ptr() == module.q_s.data_ptr()


def test_bfloat16_models_score_close_to_float32(pair, cpu_attributor):
    bf16 = Attributor(pair["factors"], device="cpu", model_dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for m in bf16.models.values() for p in m.parameters())
    grads = per_example_gradients(bf16.models["finetuned"], bf16.specs, [bf16.query_sequence(PROMPT, ANSWER)],
                                  bf16.pad_id)
    assert all(g.dtype == torch.float32 for g in grads.values())  # upcast: preconditioning stays float32
    texts = [d["text"] for d in DOCUMENTS]
    for method in ("ms-if", "ss-if", "gdp"):
        ours, _ = bf16.score([(PROMPT, ANSWER)], texts, method=method)
        full, _ = cpu_attributor.score([(PROMPT, ANSWER)], texts, method=method)
        assert ours.dtype == torch.float32
        error = float((ours - full).abs().max()) / float(full.abs().max())
        assert error <= BF16_BOUND, (method, error)
        assert torch.argmax(ours) == torch.argmax(full)


def test_bad_model_dtype_is_refused(pair):
    with pytest.raises(MsifValueError, match="model dtype must be one of bfloat16, float16, float32"):
        Attributor(pair["factors"], device="cpu", model_dtype="int8")


# -- the plan -----------------------------------------------------------------------------------


def _file_bytes(folder: Path, modules: str) -> int:
    manifest = read_manifest(folder)
    total = 0
    for stage in ("pretrained", "finetuned"):
        for entry in manifest["stages"][stage]["modules"]:
            if modules == "mlp" and entry["role"] != "mlp":
                continue
            total += sum(t.numel() * t.element_size() for t in load_file(folder / entry["file"]).values())
    return total


def _model_bytes(attributor) -> dict:
    return {s: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
            for s, m in attributor.models.items()}


@pytest.mark.parametrize("modules", ["all", "mlp"])
def test_attribute_plan_counts_factor_files_and_weights_exactly(pair, cpu_attributor, modules, capsys):
    # --plan: no --index/--documents and no --prompt/--queries needed
    assert cli.main(["attribute", "--plan", "--factors", str(pair["factors"]), "--modules", modules, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["factor_bytes"] == _file_bytes(pair["factors"], modules)
    assert plan["parts"]["pretrained factors"] == plan["parts"]["finetuned factors"]
    weights = _model_bytes(cpu_attributor)
    assert plan["parts"]["pretrained weights"] == weights["pretrained"]
    assert plan["parts"]["finetuned weights"] == weights["finetuned"]
    tracked = [s for s in cpu_attributor.specs if modules == "all" or s.role == "mlp"]
    assert plan["parts"]["preconditioned query"] == 4 * sum(s.d_out * s.d_in for s in tracked)
    assert plan["total_bytes"] == max(plan["phase_bytes"].values())
    assert plan["total_bytes"] == sum(plan["phases"][plan["peak_phase"]].values())


def test_attribute_plan_text_rank_and_dtype(pair, capsys):
    argv = ["attribute", "--plan", "--factors", str(pair["factors"]), "--query-rank", "4", "--candidates", "20",
            "--model-dtype", "bfloat16", "--plan-tokens", "32"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "GB = 10**9 bytes" in text and "(rank 4) x 20 candidates" in text and "bfloat16" in text
    assert "32 tokens per candidate" in text and "total:" in text
    assert cli.main([*argv, "--json"]) == 0
    low = json.loads(capsys.readouterr().out)
    assert cli.main(["attribute", "--plan", "--factors", str(pair["factors"]), "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert low["model_dtypes"] == {"pretrained": "bfloat16", "finetuned": "bfloat16"}
    assert low["compute_dtype"] == "float32"
    assert 2 * low["weight_bytes"] < full["weight_bytes"] + 64  # floating tensors halve (integer buffers do not)
    from hub_msif.attribution import scoring
    from hub_msif.factors import attribution_plan

    assert (attribution_plan.PRODUCT_BLOCK, attribution_plan.CHUNK_ELEMENTS) == (scoring._BLOCK, scoring._MAX_CHUNK_ELEMENTS)
    assert "query float64 copy" not in full["parts"]  # the dense product takes no copy of W_q
    assert low["parts"]["candidate gradient chunk"] < full["parts"]["candidate gradient chunk"]  # no block products
    assert low["parts"]["preconditioned query"] < full["parts"]["preconditioned query"]


def test_plan_tokens_without_plan_is_refused(pair, capsys):
    assert cli.main(["attribute", "--factors", str(pair["factors"]), "--documents", str(pair["documents"]),
                     "--prompt", PROMPT, "--plan-tokens", "8"]) == 2
    assert "--plan-tokens goes with --plan" in capsys.readouterr().err


def test_plan_from_per_stage_entries_and_configs(pair):
    """The library call takes each stage's manifest entry and config on their own (factors from two places)."""
    manifest = read_manifest(pair["factors"])
    configs = {s: str(pair[s]) for s in ("pretrained", "finetuned")}
    plan = plan_stages(manifest, configs, length=16)
    assert plan.candidate_length == plan.query_length == 16
    assert "total:" in format_attribution_plan(plan)
    broken = json.loads(json.dumps(manifest))
    broken["stages"]["finetuned"]["modules"] = broken["stages"]["finetuned"]["modules"][:-1]
    with pytest.raises(MsifValueError, match="track different modules"):
        plan_stages(broken, configs)


def test_space_card_holds_the_plan_or_says_why_not(pair, tmp_path):
    from hub_msif.hub.space_push import attribution_memory

    manifest = read_manifest(pair["factors"])
    plan = plan_stages(manifest, {s: str(pair[s]) for s in ("pretrained", "finetuned")})  # 256 tokens: the maximum
    text = attribution_memory(manifest)
    assert f"**{plan.total_bytes / 1e9:.2f} GB**" in text and "`cpu-basic`" in text
    gone = json.loads(json.dumps(manifest))
    (tmp_path / "empty").mkdir()
    gone["stages"]["pretrained"]["model"] = {"id": str(tmp_path / "empty"), "revision": "sha256:" + "0" * 64}
    text = attribution_memory(gone)  # an older manifest's path record: the folder is there, its config is not
    assert "could not be planned" in text and "config.json" in text and "GB**" not in text
    assert str(tmp_path) not in text  # the pusher's paths stay off the card
    gone["stages"]["pretrained"]["model"] = {"id": "gone-model", "revision": "sha256:" + "0" * 64, "local": True}
    text = attribution_memory(gone)  # a local model this machine does not know
    assert "could not be planned" in text and "'gone-model'" in text and "GB**" not in text
