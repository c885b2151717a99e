"""Streaming data: a fit that tokenizes the corpus as it reads it (``TokenStream``, what
``fit_stage`` uses) gives the same factors as the in-memory list of ``tokenize_corpus``, re-reads
the corpus once per pass, and stops at a token budget (docs/design.md, "Streaming data")."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import save_tiny_example

from hub_msif.data import CorpusSpec, TokenStream, load_rows, tokenize_corpus
from hub_msif.errors import CorpusError
from hub_msif.factors.fit import FitConfig, fit_factors, fit_stage
from hub_msif.models import load_model, pad_token_id

NUM_SEQUENCES = 13
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> tuple[Path, Path]:
    return save_tiny_example(tmp_path_factory.mktemp("streaming-example"), NUM_SEQUENCES)


def _config(k: int = 1) -> FitConfig:
    return FitConfig(batch_size=3, storage_dtype="float64", checkpoint_every=0, module_partitions=k)


def _in_memory(example, folder, corpus_spec):
    """The in-memory path: every sequence tokenized into a list first, then fitted."""
    model_dir, _ = example
    model, tokenizer, _ = load_model(str(model_dir))
    sequences, _ = tokenize_corpus(load_rows(corpus_spec), tokenizer, corpus_spec)
    return sequences, fit_factors(model, sequences, folder, _config(), pad_id=pad_token_id(tokenizer), info={},
                                  show_progress=False)


def _assert_equal(got, want):
    assert list(got.modules) == list(want.modules)
    for name, w in want.modules.items():
        for key, tensor in w.tensors().items():
            assert torch.equal(getattr(got.modules[name], key), tensor), f"{name} {key}"


def test_streaming_fit_equals_the_in_memory_fit(example, tmp_path):
    model, corpus = example
    sequences, want = _in_memory(example, tmp_path / "memory", CorpusSpec(data=str(corpus)))
    got = fit_stage(str(model), str(corpus), tmp_path / "stream", _config(), show_progress=False)
    _assert_equal(got, want)
    assert got.info["fit"]["num_sequences"] == len(sequences) == NUM_SEQUENCES
    assert got.info["fit"]["num_tokens"] == sum(len(s["input_ids"]) for s in sequences)


class _CountingStream(TokenStream):
    def __init__(self, *args):
        super().__init__(*args)
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        return super().__iter__()


def test_the_stream_is_read_once_per_pass(example, tmp_path):
    """A covariance and a Lambda pass for each of K = 2 groups: the corpus is iterated 4 times
    (besides the survey that counts it), and the factors equal the in-memory fit's."""
    model_dir, corpus = example
    spec = CorpusSpec(data=str(corpus))
    model, tokenizer, _ = load_model(str(model_dir))
    stream = _CountingStream(load_rows(spec), tokenizer, spec)
    got = fit_factors(model, stream, tmp_path / "stream", _config(k=2), pad_id=pad_token_id(tokenizer), info={},
                      show_progress=False)
    assert stream.passes == 2 * 2
    _, want = _in_memory(example, tmp_path / "memory", spec)
    for name, w in want.modules.items():
        for key, tensor in w.tensors().items():
            assert (getattr(got.modules[name], key) - tensor).abs().max() <= 1e-10 * tensor.abs().max(), f"{name} {key}"


def test_max_tokens_stops_before_the_budget_is_exceeded(example, tmp_path):
    model, corpus = example
    full, _ = tokenize_corpus(load_rows(CorpusSpec(data=str(corpus))), load_model(str(model))[1], CorpusSpec(data=str(corpus)))
    lengths = [len(s["input_ids"]) for s in full]
    budget = sum(lengths[:5]) + lengths[5] - 1  # the 6th sequence would exceed it
    spec = CorpusSpec(data=str(corpus), max_tokens=budget)
    sequences, want = _in_memory(example, tmp_path / "memory", spec)
    assert len(sequences) == 5
    got = fit_stage(str(model), str(corpus), tmp_path / "stream", _config(), corpus=spec, show_progress=False)
    _assert_equal(got, want)
    assert got.info["fit"]["num_tokens"] == sum(lengths[:5]) <= budget
    assert got.info["data"]["max_tokens"] == budget
    with pytest.raises(CorpusError, match="max tokens must be at least 2"):
        CorpusSpec(data=str(corpus), max_tokens=1).validate()
