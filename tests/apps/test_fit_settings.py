"""One definition of each fit setting (docs/design.md, "Command line"): the ``fit`` options are
generated from the fields of ``FitConfig`` and ``CorpusSpec``, the manifest records the config, and
the card's reproduce command, parsed back by the real ``fit`` parser, gives the same settings."""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import replace

import pytest
from conftest import save_tiny_example

from hub_msif.apps import cli
from hub_msif.apps.commands import fit as fit_cmd
from hub_msif.data import CorpusSpec
from hub_msif.factors.config import FitConfig
from hub_msif.factors.fit import fit_stage
from hub_msif.factors.storage import MANIFEST_NAME
from hub_msif.hub.cards import factors_card, fit_command, public_stage
from hub_msif.options import default_of, option_fields

pytestmark = pytest.mark.usefixtures("one_thread")

MLP0 = "gpt_neox.layers.0.mlp.dense_h_to_4h"
ATTN1 = "gpt_neox.layers.1.attention.dense"

# Two fits that between them give every setting a value other than its default (some settings
# exclude each other: empirical labels take one sample per sequence, text and prompt columns).
CASES = {
    "text": (
        FitConfig(stage="finetuned", batch_size=3, modules={MLP0: "mlp", ATTN1: "attn_out"}, split_heads=False,
                  label_mode="empirical", seed=7, storage_dtype="float64", checkpoint_every=3, module_partitions=2,
                  accumulate_dtype="float32", model_dtype="float32"),
        dict(split="validation", revision="v1.0", text_column="text", max_length=24, max_sequences=10,
             max_tokens=150),
    ),
    "instruction": (
        FitConfig(stage="pretrained", batch_size=5, modules="mlp", seed=2**63 - 1, storage_dtype="bfloat16",
                  checkpoint_every=0, accumulate_dtype="float32", model_dtype="bfloat16", samples_per_sequence=2),
        dict(prompt_column="question", response_column="answer", template="Q: {prompt}\nA:", max_length=20),
    ),
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Each case fitted for real on a tiny GPT-NeoX: ``{case: (config, corpus spec, stage entry)}``."""
    root = tmp_path_factory.mktemp("fit-settings")
    model, text_corpus = save_tiny_example(root, 14)
    rows = [json.loads(line)["text"].split(" ", 3) for line in text_corpus.read_text().splitlines()]
    qa_corpus = root / "qa.jsonl"
    qa_corpus.write_text("".join(json.dumps({"question": " ".join(r[:3]), "answer": r[-1]}) + "\n" for r in rows))
    out = {}
    for case, (config, corpus) in CASES.items():
        data = str(text_corpus if case == "text" else qa_corpus)
        spec = CorpusSpec(data=data, **corpus)
        folder = root / case
        fit_stage(str(model), data, folder, config, corpus=spec, show_progress=False, load_result=False)
        entry = json.loads((folder / MANIFEST_NAME).read_text())["stages"][config.stage]
        out[case] = config, spec, entry
    return out


def _parse_command(command: str):
    """``(FitConfig, CorpusSpec, args)`` of a card's command, through the real ``fit`` parser."""
    words = shlex.split(command)
    words = words[words.index("fit"):]
    args = cli.build_parser().parse_args(words)
    config, corpus = fit_cmd.fit_settings(args)
    return config, corpus, args


def test_the_cases_set_every_setting_to_a_non_default_value():
    """A setting added to FitConfig or CorpusSpec must be added here too (else this test fails)."""
    for cls, pick in ((FitConfig, lambda c: c[0]), (CorpusSpec, lambda c: c[1])):
        for field, _ in option_fields(cls):
            values = [getattr(pick(c), field.name) if cls is FitConfig else pick(c).get(field.name, default_of(field))
                      for c in CASES.values()]
            assert any(v != default_of(field) for v in values), f"{cls.__name__}.{field.name} keeps its default"


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_card_command_parses_back_to_the_same_settings(fitted, case):
    config, spec, entry = fitted[case]
    assert entry["fit"]["config"] == json.loads(json.dumps(dataclasses.asdict(config)))
    # What the card shows (model and data named for the public), as factors_card renders it.
    command = fit_command(config.stage, public_stage(entry), entry["modules"][0]["dtype"])
    got_config, got_corpus, args = _parse_command(command)
    # checkpoint_every changes no factor: not on the card, so the parsed command has the default.
    assert "--checkpoint-every" not in command
    assert got_config == replace(config, checkpoint_every=FitConfig().checkpoint_every)
    assert replace(got_corpus, data=spec.data) == spec
    assert args.out == "factors" and args.model == public_stage(entry)["model"]["id"]


def test_only_settings_that_differ_from_their_defaults_are_written():
    info = {"model": {"id": "acme/base", "revision": "a" * 40},
            "data": CorpusSpec(data="acme/pile").describe(),
            "fit": {"config": dataclasses.asdict(FitConfig()), "num_processes": 1}}
    assert fit_command("pretrained", info) == (f"hub-msif fit --model acme/base --revision {'a' * 40} "
                                               "--data acme/pile --stage pretrained --out factors")
    info["fit"] |= {"config": dataclasses.asdict(FitConfig(seed=5)),
                    "num_processes": 4}
    assert fit_command("pretrained", info).startswith("accelerate launch --num_processes 4 -m hub_msif fit ")
    assert fit_command("pretrained", info).endswith("--stage pretrained --seed 5 --out factors")


def test_a_manifest_without_the_recorded_config_still_renders_a_card(fitted):
    """Manifests written before ``fit.config`` keep the settings as top-level ``fit`` keys; the
    storage dtype comes from the module entries, an explicit module mapping cannot be recovered."""
    config, spec, entry = fitted["text"]
    old = json.loads(json.dumps(entry))
    del old["fit"]["config"]
    for key in ("module_partitions", "samples_per_sequence", "accumulate_dtype", "model_dtype"):
        del old["fit"][key]  # the oldest manifests lack these too
    command = fit_command(config.stage, public_stage(old), old["modules"][0]["dtype"])
    got, corpus, _ = _parse_command(command)
    assert (got.batch_size, got.split_heads, got.label_mode, got.seed, got.storage_dtype) == (3, False, "empirical", 7,
                                                                                               "float64")
    assert got.modules == "all"  # recorded as "explicit": not recoverable
    assert replace(corpus, data=spec.data) == spec
    manifest = {"format_version": 1, "stages": {"pretrained": old, "finetuned": old}}
    card = str(factors_card(manifest, "me/factors", "v1", {"a": 10}))
    assert command in card
