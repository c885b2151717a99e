"""Bad input gives a clear error that names the problem, and leaves nothing half-written.

Factor folders: models with other module shapes or another revision, damaged, truncated or
missing files, missing manifest or stage. Fitting: empty or malformed corpora, missing columns,
bad lengths, missing files and folders. Through the Python API and through ``hub-msif fit``
(exit status 2, one error line on stderr, no traceback).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hub_msif.apps import cli
from hub_msif.artifacts.atomic import sha256_bytes
from hub_msif.artifacts.manifest import read_manifest
from hub_msif.data import CorpusSpec
from hub_msif.errors import CorpusError, FactorError
from hub_msif.factors.fit import FitConfig, fit_stage
from hub_msif.factors.storage import MANIFEST_NAME, load_stage

HUB_MSIF = Path(sys.executable).with_name("hub-msif")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny GPT-NeoX saved with its tokenizer, and a jsonl corpus of 9 texts."""
    from hub_msif.toy.examples import example_texts, tiny_model, word_tokenizer

    folder = tmp_path_factory.mktemp("bad-input-example")
    tokenizer = word_tokenizer(example_texts(200))
    model = tiny_model("gpt_neox", vocab_size=len(tokenizer), hidden=16, heads=2, ffn=32, layers=2)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    corpus = folder / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in example_texts(9, seed=1)))
    return folder / "model", corpus


@pytest.fixture(scope="module")
def fitted(example, tmp_path_factory) -> Path:
    """A factor folder with the pretrained stage of the example model."""
    model, corpus = example
    out = tmp_path_factory.mktemp("bad-input-factors")
    fit_stage(str(model), str(corpus), out, FitConfig(batch_size=4, checkpoint_every=0), show_progress=False)
    return out


@pytest.fixture
def factors_copy(fitted, tmp_path) -> Path:
    """A private copy of the fitted folder, free to damage."""
    return Path(shutil.copytree(fitted, tmp_path / "factors"))


def _entries(folder: Path) -> list[dict]:
    return read_manifest(folder)["stages"]["pretrained"]["modules"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- factors against the wrong model ------------------------------------------------------------


def test_factors_against_other_module_shapes_name_module_and_both_shapes(fitted):
    from hub_msif.toy.examples import tiny_model

    factors = load_stage(fitted, "pretrained")
    wider = tiny_model("gpt_neox", vocab_size=64, hidden=24, heads=2, ffn=32, layers=2)
    with pytest.raises(FactorError) as info:
        factors.check_model(wider)
    message = str(info.value)
    assert "do not match the model's modules" in message
    assert "gpt_neox.layers.0.attention.query_key_value (factors 48x17, model 72x25)" in message
    assert "gpt_neox.layers.1.mlp.dense_4h_to_h (factors 16x33, model 24x33)" in message

    shallower = tiny_model("gpt_neox", vocab_size=64, hidden=16, heads=2, ffn=32, layers=1)
    with pytest.raises(FactorError, match=r"gpt_neox\.layers\.1\.attention\.dense \(missing in GPTNeoXForCausalLM\)"):
        factors.check_model(shallower)

    other_architecture = tiny_model("llama", vocab_size=64, hidden=16, heads=2, kv_heads=2, ffn=32, layers=2)
    with pytest.raises(FactorError, match="missing in LlamaForCausalLM"):
        factors.check_model(other_architecture)


def test_factors_match_their_own_model(example, fitted):
    from hub_msif.models import load_model

    model, _, ref = load_model(str(example[0]))
    factors = load_stage(fitted, "pretrained")
    factors.check_model(model, revision=ref.revision)  # no error
    assert factors.info["model"]["revision"] == ref.revision


def test_factors_of_another_revision_are_refused_unless_allowed(example, fitted, caplog):
    from hub_msif.models import load_model

    model = load_model(str(example[0]))[0]
    factors = load_stage(fitted, "pretrained")
    recorded = factors.info["model"]["revision"]
    other = "sha256:" + "0" * 64
    with pytest.raises(FactorError) as info:
        factors.check_model(model, revision=other)
    message = str(info.value)
    assert recorded in message and other in message, "the error must name both revisions"
    assert "allow_revision_mismatch" in message

    with caplog.at_level(logging.WARNING):
        factors.check_model(model, revision=other, allow_revision_mismatch=True)
    assert recorded in caplog.text and other in caplog.text

    # The override is about revisions only: other shapes still fail.
    from hub_msif.toy.examples import tiny_model

    with pytest.raises(FactorError, match="do not match the model's modules"):
        factors.check_model(tiny_model("gpt_neox", vocab_size=64, hidden=24, heads=2, ffn=32),
                            revision=other, allow_revision_mismatch=True)


# --- damaged factor folders ---------------------------------------------------------------------


def test_truncated_module_file_is_refused_naming_it(factors_copy):
    victim = factors_copy / _entries(factors_copy)[2]["file"]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(FactorError, match=re.escape(str(victim)) + ".*corrupted or was altered"):
        load_stage(factors_copy, "pretrained")


def test_truncated_file_with_a_matching_hash_is_not_parsed_as_factors(factors_copy):
    """Even when the manifest's sha256 is made to agree, a truncated file fails as invalid safetensors."""
    manifest = read_manifest(factors_copy)
    entry = manifest["stages"]["pretrained"]["modules"][0]
    victim = factors_copy / entry["file"]
    data = victim.read_bytes()[:-40]
    victim.write_bytes(data)
    entry["sha256"] = sha256_bytes(data)
    (factors_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(FactorError, match=re.escape(str(victim)) + ".*not a valid safetensors file"):
        load_stage(factors_copy, "pretrained")


def _rewrite_tensors(folder: Path, change) -> Path:
    """Alters one module file's tensors with ``change(tensors)`` and updates the manifest's sha256
    to match, as an attacker who edits both would; returns the altered file."""
    from safetensors import safe_open
    from safetensors.torch import load, save

    manifest = read_manifest(folder)
    entry = manifest["stages"]["pretrained"]["modules"][0]
    victim = folder / entry["file"]
    with safe_open(str(victim), framework="pt") as handle:
        metadata = handle.metadata()  # the module and stage record kept, as a careful attacker would
    tensors = load(victim.read_bytes())
    change(tensors)
    data = save(tensors, metadata=metadata)
    victim.write_bytes(data)
    entry["sha256"] = sha256_bytes(data)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return victim


@pytest.mark.parametrize("change, message", [
    (lambda t: t["lam"].fill_(-1.0), "'lam' has negative values"),
    (lambda t: t["lam"].view(-1).__setitem__(0, float("nan")), "tensor 'lam' holds NaN or infinite values"),
    (lambda t: t["eig_a"].view(-1).__setitem__(0, float("inf")), "tensor 'eig_a' holds NaN or infinite"),
    (lambda t: t["eig_s"].mul_(-1.0).sub_(1.0), "'eig_s' has negative values"),
    (lambda t: t["q_a"].mul_(1.5), "eigenvectors 'q_a' are not orthonormal"),
    (lambda t: t["q_s"].copy_(torch.randn(t["q_s"].shape, dtype=t["q_s"].dtype)), "eigenvectors 'q_s' are not"),
], ids=["negative-lambda", "nan-lambda", "inf-eig-a", "negative-eig-s", "scaled-q-a", "random-q-s"])
def test_implausible_factors_are_refused_whatever_the_checksum_says(factors_copy, change, message):
    victim = _rewrite_tensors(factors_copy, change)
    with pytest.raises(FactorError, match=re.escape(str(victim)) + ".*" + re.escape(message)):
        load_stage(factors_copy, "pretrained")


def test_a_manifest_dtype_that_differs_from_the_files_is_refused(factors_copy):
    """Issue 23 item 5: the manifest's ``dtype`` is checked against the file's tensors on load:
    bfloat16 tensors under a manifest that says float32 (file and sha256 consistent)."""
    victim = _rewrite_tensors(factors_copy, lambda t: t.update({k: v.bfloat16() for k, v in t.items()}))
    entry = _entries(factors_copy)[0]
    assert entry["dtype"] == "float32"
    with pytest.raises(FactorError, match=re.escape(str(victim)) + ".*manifest says dtype 'float32', the file holds "
                                          "bfloat16"):
        load_stage(factors_copy, "pretrained")
    manifest = read_manifest(factors_copy)  # the same file under its own dtype loads
    manifest["stages"]["pretrained"]["modules"][0]["dtype"] = "bfloat16"
    (factors_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert load_stage(factors_copy, "pretrained")


def test_plausibility_check_accepts_every_fitted_module(fitted):
    """The checks pass on real factors, in float32 and in bfloat16 storage."""
    from hub_msif.factors.storage import check_plausible

    stage = load_stage(fitted, "pretrained")
    assert stage.modules
    for module in stage.modules.values():
        tensors = module.tensors()
        check_plausible(Path("x"), {k: v.to(torch.bfloat16) for k, v in tensors.items()})


def test_bit_flip_is_refused_naming_file_and_hashes(factors_copy):
    entry = _entries(factors_copy)[1]
    victim = factors_copy / entry["file"]
    data = bytearray(victim.read_bytes())
    data[len(data) - 7] ^= 0x01  # one bit of one tensor value
    victim.write_bytes(bytes(data))
    with pytest.raises(FactorError) as info:
        load_stage(factors_copy, "pretrained")
    message = str(info.value)
    assert str(victim) in message and "corrupted" in message
    assert entry["sha256"] in message and sha256_bytes(bytes(data)) in message


def test_file_with_wrong_tensor_shape_is_refused(factors_copy):
    from safetensors.torch import load, save

    manifest = read_manifest(factors_copy)
    entry = manifest["stages"]["pretrained"]["modules"][0]
    victim = factors_copy / entry["file"]
    tensors = load(victim.read_bytes())
    tensors["lam"] = tensors["lam"][..., :-1].contiguous()
    data = save(tensors)
    victim.write_bytes(data)
    entry["sha256"] = sha256_bytes(data)
    (factors_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(FactorError, match=re.escape(str(victim)) + r".*tensor 'lam' should be \(6, 8, 17\)"):
        load_stage(factors_copy, "pretrained")


def test_missing_module_file_is_named(factors_copy):
    victim = factors_copy / _entries(factors_copy)[3]["file"]
    victim.unlink()
    with pytest.raises(FactorError, match=re.escape(str(victim)) + ".*listed in the manifest is missing"):
        load_stage(factors_copy, "pretrained")


def test_missing_manifest(factors_copy, tmp_path):
    (factors_copy / MANIFEST_NAME).unlink()
    with pytest.raises(FactorError, match=f"has no manifest {MANIFEST_NAME}"):
        load_stage(factors_copy, "pretrained")
    with pytest.raises(FactorError, match="does not exist"):
        load_stage(tmp_path / "nowhere", "pretrained")


def test_broken_or_foreign_manifest(factors_copy):
    path = factors_copy / MANIFEST_NAME
    path.write_text('{"format": "hub_msif.factors", "stages": ')
    with pytest.raises(FactorError, match="not valid JSON"):
        load_stage(factors_copy, "pretrained")
    path.write_text(json.dumps({"format": "something.else"}))
    with pytest.raises(FactorError, match="not a hub_msif factor manifest"):
        load_stage(factors_copy, "pretrained")
    path.write_text(json.dumps({"format": "hub_msif.factors", "format_version": 99, "stages": {}}))
    with pytest.raises(FactorError, match="format version 99.*upgrade hub_msif"):
        load_stage(factors_copy, "pretrained")


def test_missing_stage_lists_the_stages_present(fitted):
    with pytest.raises(FactorError, match=r"no 'finetuned' factors \(stages present: pretrained\)"):
        load_stage(fitted, "finetuned")


def test_unknown_module_requested(fitted):
    with pytest.raises(FactorError, match="do not cover module.*no.such.module"):
        load_stage(fitted, "pretrained", modules=["no.such.module"])


# --- hand-edited manifests (issue 21, items 1 and 2) -----------------------------------------------


def _edit_manifest(folder: Path, change) -> None:
    """Applies ``change(manifest)`` to the manifest's JSON as a hand edit would (files untouched)."""
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def _one_line_factor_error(folder: Path, stage: str = "pretrained") -> str:
    with pytest.raises(FactorError) as info:
        load_stage(folder, stage)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_swapped_module_names_are_refused_naming_the_module(factors_copy):
    entries = _entries(factors_copy)
    first, second = entries[0]["name"], entries[1]["name"]

    def swap(manifest):
        modules = manifest["stages"]["pretrained"]["modules"]
        modules[0]["name"], modules[1]["name"] = modules[1]["name"], modules[0]["name"]

    _edit_manifest(factors_copy, swap)
    message = _one_line_factor_error(factors_copy)
    assert f"of module {second!r}, but the file holds the pretrained factors of module {first!r}" in message
    assert "the manifest was edited" in message


def test_swapped_names_of_same_shaped_modules_are_refused(factors_copy):
    """The case that loaded silently: two modules of the same shape whose names (and nothing else)
    are swapped; every file, sha256 and shape still agrees with its entry."""
    entries = _entries(factors_copy)
    shape = {(e["d_in"], e["d_out"], tuple(e["blocks"])): i for i, e in enumerate(entries)}
    pair = next((shape[(e["d_in"], e["d_out"], tuple(e["blocks"]))], i) for i, e in enumerate(entries)
                if shape[(e["d_in"], e["d_out"], tuple(e["blocks"]))] != i)
    a, b = pair

    def swap(manifest):
        modules = manifest["stages"]["pretrained"]["modules"]
        modules[a]["name"], modules[b]["name"] = modules[b]["name"], modules[a]["name"]

    _edit_manifest(factors_copy, swap)
    message = _one_line_factor_error(factors_copy)
    assert entries[a]["name"] in message and entries[b]["name"] in message


def test_a_module_listed_twice_is_refused(factors_copy):
    name = _entries(factors_copy)[2]["name"]

    def duplicate(manifest):
        modules = manifest["stages"]["pretrained"]["modules"]
        modules.append(dict(modules[2]))

    _edit_manifest(factors_copy, duplicate)
    message = _one_line_factor_error(factors_copy)
    assert f"stage 'pretrained' lists module {name!r} twice" in message
    with pytest.raises(FactorError, match="twice"):
        read_manifest(factors_copy)  # the one manifest reader refuses it, whoever reads


def test_a_stage_copied_under_another_stage_is_refused(factors_copy):
    def copy_stage(manifest):
        manifest["stages"]["finetuned"] = manifest["stages"]["pretrained"]

    _edit_manifest(factors_copy, copy_stage)
    message = _one_line_factor_error(factors_copy, "finetuned")
    assert "as the finetuned factors of module" in message and "holds the pretrained factors" in message


def test_a_file_without_its_module_record_is_refused(factors_copy):
    from safetensors.torch import load, save

    manifest = read_manifest(factors_copy)
    entry = manifest["stages"]["pretrained"]["modules"][0]
    victim = factors_copy / entry["file"]
    data = save(load(victim.read_bytes()))  # the same tensors, no hub_msif metadata
    victim.write_bytes(data)
    entry["sha256"] = sha256_bytes(data)
    (factors_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert "records no module and stage" in _one_line_factor_error(factors_copy)


@pytest.mark.parametrize("where", ["parent", "absolute", "inner-parent", "symlink-file", "symlink-folder"])
def test_a_file_outside_the_folder_is_refused_before_it_is_opened(factors_copy, tmp_path, where):
    """A valid module file copied outside the folder (its sha256 matches the manifest): a manifest or
    a link that points there is refused, and the message never shows the outside file's sha256."""
    entries = _entries(factors_copy)
    relative = entries[0]["file"]
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.safetensors"
    shutil.copyfile(factors_copy / relative, secret)
    secret_sha = sha256_bytes(secret.read_bytes())
    if where in ("parent", "absolute", "inner-parent"):
        path = {"parent": "../outside/secret.safetensors", "absolute": str(secret),
                "inner-parent": "pretrained/../../outside/secret.safetensors"}[where]

        def point(manifest):
            manifest["stages"]["pretrained"]["modules"][0]["file"] = path

        _edit_manifest(factors_copy, point)
        expected = "unsafe file path"
    elif where == "symlink-file":
        (factors_copy / relative).unlink()
        (factors_copy / relative).symlink_to(secret)
        expected = "symbolic link"
    else:  # the module's folder is a link to a copy of it outside
        folder = (factors_copy / relative).parent
        shutil.copytree(folder, outside / "mlp-copy")
        shutil.rmtree(folder)
        folder.symlink_to(outside / "mlp-copy", target_is_directory=True)
        expected = "symbolic link"
    message = _one_line_factor_error(factors_copy)
    assert expected in message
    assert secret_sha not in message and "sha256" not in message


def test_a_symbolic_link_inside_the_folder_loads(factors_copy):
    """Links that stay inside the folder are fine (a folder assembled with links)."""
    relative = _entries(factors_copy)[0]["file"]
    before = load_stage(factors_copy, "pretrained")
    moved = factors_copy / "pretrained" / "kept.bin"
    (factors_copy / relative).rename(moved)
    (factors_copy / relative).symlink_to(moved)
    after = load_stage(factors_copy, "pretrained")
    for name, module in before.modules.items():
        assert all(torch.equal(a, b) for a, b in zip(module.tensors().values(), after.modules[name].tensors().values()))


# --- fitting on bad input (Python API) -----------------------------------------------------------


def _bad_corpus(kind: str, folder: Path, good: Path) -> tuple[str, CorpusSpec | None]:
    """``(data, corpus spec)`` for one kind of bad corpus."""
    if kind == "empty file":
        (folder / "empty.jsonl").write_text("")
        return str(folder / "empty.jsonl"), None
    if kind == "blank lines jsonl":
        (folder / "blank.jsonl").write_text("\n\n   \n\n")
        return str(folder / "blank.jsonl"), None
    if kind == "blank lines txt":
        (folder / "blank.txt").write_text("\n  \n\t\n")
        return str(folder / "blank.txt"), None
    if kind == "empty texts":
        (folder / "empty_texts.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
        return str(folder / "empty_texts.jsonl"), None
    if kind == "malformed json":
        (folder / "bad.jsonl").write_text('{"text": "the cat sees the river ."}\n{"text": oops\n')
        return str(folder / "bad.jsonl"), None
    if kind == "missing column":
        return str(good), CorpusSpec(data=str(good), text_column="body")
    if kind == "max length 0":
        return str(good), CorpusSpec(data=str(good), max_length=0)
    if kind == "missing file":
        return str(folder / "no-such-corpus.jsonl"), None
    if kind == "folder without data":
        (folder / "nodata").mkdir()
        (folder / "nodata" / "notes.md").write_text("nothing here")
        return str(folder / "nodata"), None
    raise AssertionError(kind)


BAD_CORPORA = {
    "empty file": "the corpus is empty: .*empty.jsonl",
    "blank lines jsonl": "the corpus is empty: .*blank.jsonl",
    "blank lines txt": "the corpus is empty: .*blank.txt",
    "empty texts": "yields no sequence with at least 2 tokens",
    "malformed json": "cannot read the corpus .*bad.jsonl as json data: JSON parse error",
    "missing column": "column\\(s\\) 'body' not in the data; it has text",
    "max length 0": "max length must be at least 2 tokens, got 0",
    "missing file": "data file\\(s\\) not found: .*no-such-corpus.jsonl",
    "folder without data": "no .txt, .jsonl, .json or .parquet files in .*nodata",
}


@pytest.mark.parametrize("kind", list(BAD_CORPORA))
def test_fit_on_bad_corpus_fails_clearly_and_writes_nothing(example, tmp_path, kind):
    model, good = example
    data, spec = _bad_corpus(kind, tmp_path, good)
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=BAD_CORPORA[kind]):
        fit_stage(str(model), data, out, FitConfig(checkpoint_every=0), corpus=spec, show_progress=False)
    assert not out.exists(), f"the failed fit created {sorted(p.name for p in out.rglob('*'))}"


def test_columns_error_lists_every_available_column(example, tmp_path):
    model, _ = example
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "who sees the river ?", "answer": "the cat", "id": 1}) + "\n")
    with pytest.raises(CorpusError, match="'text' not in the data; it has question, answer, id"):
        fit_stage(str(model), str(data), tmp_path / "out", show_progress=False)
    spec = CorpusSpec(data=str(data), prompt_column="question", response_column="response")
    with pytest.raises(CorpusError, match="'response' not in the data; it has question, answer, id"):
        fit_stage(str(model), str(data), tmp_path / "out", corpus=spec, show_progress=False)


@pytest.mark.parametrize("kind", ["missing", "empty", "no tokenizer"])
def test_fit_with_bad_model_folder(example, tmp_path, kind):
    model, corpus = example
    folder = tmp_path / "model"
    if kind == "empty":
        folder.mkdir()
    elif kind == "no tokenizer":
        folder.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(model / name, folder / name)
    expected = {
        "missing": f"model folder {re.escape(str(folder))} does not exist",
        "empty": f"no weight files .* in model folder {re.escape(str(folder))}",
        "no tokenizer": "has no usable tokenizer",
    }[kind]
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match=expected):
        fit_stage(str(folder), str(corpus), out, show_progress=False)
    assert not out.exists()


@pytest.mark.parametrize("value, shown", [(5, "int 5"), (["a", "b"], "list ['a', 'b']"), ({"t": 1}, "dict")])
def test_non_text_value_in_the_text_column_is_an_error_naming_the_row(example, tmp_path, value, shown):
    """Not silently coerced: ``5`` would become the text "5"."""
    model, _ = example
    data = tmp_path / "mixed.jsonl"
    data.write_text("".join(json.dumps({"text": v}) + "\n" for v in ["the cat sees the river", value, "a dog"]))
    out = tmp_path / "out"
    with pytest.raises(CorpusError, match=re.escape(f"row 2 (1-based) of column 'text' holds {shown}")):
        fit_stage(str(model), str(data), out, FitConfig(checkpoint_every=0), show_progress=False)
    assert not out.exists()
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"prompt": "who ?", "response": "the cat"}) + "\n" + json.dumps({"prompt": 7, "response": "x"}))
    spec = CorpusSpec(data=str(qa), prompt_column="prompt", response_column="response")
    with pytest.raises(CorpusError, match=re.escape("row 2 (1-based) of column 'prompt' holds int 7")):
        fit_stage(str(model), str(qa), out, FitConfig(checkpoint_every=0), corpus=spec, show_progress=False)


def test_empty_and_null_texts_are_skipped_and_counted(example, tmp_path, caplog):
    model, _ = example
    data = tmp_path / "gaps.jsonl"
    values = ["the cat sees the river", None, "", "   ", "a dog finds the market"]
    data.write_text("".join(json.dumps({"text": v}) + "\n" for v in values))
    with caplog.at_level("WARNING", logger="hub_msif.data"):
        factors = fit_stage(str(model), str(data), tmp_path / "out", FitConfig(checkpoint_every=0), show_progress=False)
    assert factors.info["fit"]["num_sequences"] == 2
    assert "skipped 3 of 5 row(s) with empty or missing text in column 'text'" in caplog.text


def test_truncated_model_weights_are_one_clear_error(example, tmp_path, capsys):
    """Not a SafetensorError traceback: fit and attribute name the damaged weights."""
    model, corpus = example
    folder = Path(shutil.copytree(model, tmp_path / "model"))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    out = tmp_path / "out"
    assert cli.main(["fit", "--model", str(folder), "--stage", "pretrained", "--data", str(corpus),
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"model {folder}: a weights file in {folder} is damaged or truncated" in err
    assert not out.exists()


@pytest.mark.parametrize("bad, expected", [
    (dict(batch_size=0), "batch size must be positive, got 0"),
    (dict(stage="middle"), "stage must be one of pretrained, finetuned, not 'middle'"),
    (dict(label_mode="greedy"), "label mode must be one of sampled, empirical"),
    (dict(storage_dtype="int8"), "storage dtype must be one of"),
    (dict(checkpoint_every=-1), "checkpoint_every must be >= 0"),
])
def test_bad_fit_settings_fail_before_any_work(example, tmp_path, bad, expected):
    model, corpus = example
    with pytest.raises(ValueError, match=expected):
        fit_stage(str(model), str(corpus), tmp_path / "out", FitConfig(**bad), show_progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_refit_keeps_the_existing_factors(example, factors_copy):
    """A refit into a factor folder that fails on bad input leaves the folder exactly as it was."""
    model, corpus = example
    before = _snapshot(factors_copy)
    with pytest.raises(CorpusError):
        fit_stage(str(model), str(corpus), factors_copy, corpus=CorpusSpec(data=str(corpus), text_column="body"),
                  show_progress=False)
    assert _snapshot(factors_copy) == before
    load_stage(factors_copy, "pretrained")


# --- the command line ---------------------------------------------------------------------------


def _error_line(stderr: str) -> str:
    """The one error line of a failed command (progress bars may share stderr)."""
    assert "Traceback" not in stderr, stderr
    lines = [line.strip() for line in re.split(r"[\r\n]+", stderr) if "hub-msif fit: error:" in line]
    assert len(lines) == 1, f"expected exactly one error line, got:\n{stderr}"
    line = lines[0]
    return line[line.index("hub-msif fit: error:"):]


def _fit_args(model, data, out, *extra) -> list[str]:
    return ["fit", "--model", str(model), "--stage", "pretrained", "--data", str(data), "--out", str(out), *extra]


@pytest.mark.parametrize("kind", ["empty file", "missing column", "missing model folder"])
def test_cli_subprocess_exit_2_with_one_line(example, tmp_path, kind):
    model, good = example
    out = tmp_path / "out"
    if kind == "empty file":
        (tmp_path / "empty.jsonl").write_text("")
        args, expected = _fit_args(model, tmp_path / "empty.jsonl", out), "the corpus is empty"
    elif kind == "missing column":
        args, expected = _fit_args(model, good, out, "--text-column", "body"), "'body' not in the data; it has text"
    else:
        args, expected = _fit_args(tmp_path / "no-model", good, out), f"model folder {tmp_path / 'no-model'} does not exist"
    env = {k: v for k, v in os.environ.items() if k != "HUB_MSIF_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run([str(HUB_MSIF), *args], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert expected in _error_line(result.stderr)
    assert result.stdout == ""
    assert not out.exists()


CLI_CASES = {
    "max length 0": (["--max-length", "0"], "max length must be at least 2 tokens, got 0"),
    "batch size 0": (["--batch-size", "0"], "batch size must be positive, got 0"),
    "max sequences 0": (["--max-sequences", "0"], "max sequences must be positive, got 0"),
    "prompt without response": (["--prompt-column", "text"], "give both --prompt-column and --response-column"),
    "bad module role": (["--module", "gpt_neox.layers.0.mlp.dense_h_to_4h=ffn"], "bad module spec"),
    "unknown module": (["--module", "no.such.module=mlp"], "has no module named 'no.such.module'"),
    "more partitions than modules": (["--module-partitions", "9"], "9 module partitions but only 8 tracked module(s)"),
    "max tokens 1": (["--max-tokens", "1"], "max tokens must be at least 2, got 1"),
    "samples with true labels": (["--samples-per-sequence", "2", "--labels", "empirical"],
                                 "several samples per sequence need sampled labels"),
    "missing data file": (None, "data file(s) not found"),
    "blank lines": (None, "the corpus is empty"),
    "malformed json": (None, "JSON parse error"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input(example, tmp_path, case, capsys, monkeypatch):
    monkeypatch.delenv("HUB_MSIF_DEBUG", raising=False)
    model, good = example
    extra, expected = CLI_CASES[case]
    data = good
    if case == "missing data file":
        data = tmp_path / "missing.jsonl"
    elif case == "blank lines":
        data = tmp_path / "blank.jsonl"
        data.write_text("\n \n")
    elif case == "malformed json":
        data = tmp_path / "bad.jsonl"
        data.write_text('{"text": "a dog sees the river ."}\n{"text": \n')
    out = tmp_path / "out"
    status = cli.main(_fit_args(model, data, out, *(extra or [])))
    captured = capsys.readouterr()
    assert status == 2
    assert expected in _error_line(captured.err)
    assert captured.out == ""
    assert not out.exists() or not any(out.rglob("*")), "the failed fit wrote files"


def test_cli_fit_refuses_missing_required_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["fit", "--model", "x", "--stage", "pretrained"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--data" in err and "--out" in err and "Traceback" not in err


def test_hub_ids_with_dots_are_hub_ids_not_missing_folders(monkeypatch):
    """``Qwen/Qwen2.5-0.5B`` was taken for a missing local folder because its name has a "suffix"."""
    import huggingface_hub

    from hub_msif import models

    asked = []

    def fake_snapshot_download(repo_id, revision=None):
        asked.append(repo_id)
        raise OSError("offline in this test")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    for model_id in ("Qwen/Qwen2.5-0.5B", "gpt2"):
        with pytest.raises(FileNotFoundError, match=f"model '{re.escape(model_id)}' is not a local folder and could "
                                                    "not be fetched from the Hub"):
            models.resolve_model(model_id)
    assert asked == ["Qwen/Qwen2.5-0.5B", "gpt2"]
    for path in ("./model.v2", "/no/such/model", "weights.safetensors/x/y"):
        with pytest.raises(FileNotFoundError, match="model folder .* does not exist"):
            models.resolve_model(path)
