"""``Attributor`` end to end on a tiny model pair saved like Hub models (docs/design.md, "Scores and their sign").

A module-scoped fixture trains a tiny GPT-NeoX briefly on a toy corpus (the pre-trained model),
trains a copy of it briefly on templated question-answer pairs (the fine-tuned model), saves both
with ``save_pretrained`` (plus a word-level tokenizer), and fits both stages' factors with
``fit_stage`` into one folder: the pre-trained stage from a plain-text jsonl, the fine-tuned
stage from a prompt/response jsonl and a template. ``Attributor(folder)`` then loads the models
that the manifest records.
"""

import copy
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import QA_TEMPLATE, save_tiny_pair

from hub_msif.attribution import baselines
from hub_msif.attribution.attributor import METHODS, Attributor
from hub_msif.data import CorpusSpec
from hub_msif.errors import FactorError
from hub_msif.factors.fit import FitConfig, fit_stage
from hub_msif.toy.examples import example_texts, tiny_model

MAX_POSITIONS = 256  # tiny_model's max_position_embeddings


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class PairFolder:
    factors: Path
    pretrained: Path
    finetuned: Path
    other: Path  # a model of another shape (hidden size 48)
    root: Path


def _fit(model_dir, data, folder, stage, modules="all", **corpus):
    config = FitConfig(stage=stage, batch_size=8, checkpoint_every=0, modules=modules)
    return fit_stage(str(model_dir), str(data), folder, config, corpus=CorpusSpec(data=str(data), max_length=64, **corpus),
                     show_progress=False)


@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory) -> PairFolder:
    root = tmp_path_factory.mktemp("pair")
    pair = save_tiny_pair(root)
    other = tiny_model("gpt_neox", vocab_size=len(pair["tokenizer"]), hidden=48, ffn=96, seed=2)
    other.save_pretrained(root / "other")
    pair["tokenizer"].save_pretrained(root / "other")
    dirs = {"pretrained": pair["pretrained"], "finetuned": pair["finetuned"], "other": root / "other"}
    pre_data, ft_data = pair["pretrain"], pair["finetune"]
    factors = root / "factors"
    _fit(dirs["pretrained"], pre_data, factors, "pretrained")
    _fit(dirs["finetuned"], ft_data, factors, "finetuned", prompt_column="prompt", response_column="response",
         template=QA_TEMPLATE)
    return PairFolder(factors, dirs["pretrained"], dirs["finetuned"], dirs["other"], root)


@pytest.fixture(scope="module")
def attributor(pair_folder) -> Attributor:
    return Attributor(pair_folder.factors)


DOCUMENTS = [{"id": i, "text": t} for i, t in enumerate(example_texts(12, seed=5))]
PROMPT, ANSWER = "what does the cat see ?", "the river"


def _check_rows(result, n_rows):
    rows = result.rows
    assert [r.rank for r in rows] == list(range(1, n_rows + 1))
    scores = [r.score for r in rows]
    assert all(math.isfinite(s) for s in scores)
    assert scores == sorted(scores, reverse=True)
    relative = [r.relative_score for r in rows]
    assert all(-1.0 <= x <= 1.0 for x in relative)
    return scores


# -- results --------------------------------------------------------------------------------------
def test_attribute_ranks_and_breaks_down(attributor):
    assert attributor.template == QA_TEMPLATE  # the fine-tuning template recorded in the manifest
    result = attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, top=len(DOCUMENTS))
    assert (result.prompt, result.answer, result.answer_generated) == (PROMPT, ANSWER, False)
    assert (result.method, result.modules, result.damping, result.relative_damping) == ("ms-if", "all", 0.1, True)
    assert result.num_candidates == len(DOCUMENTS)
    scores = _check_rows(result, len(DOCUMENTS))
    assert max(abs(r.relative_score) for r in result.rows) == pytest.approx(1.0, abs=1e-12)
    assert sorted(r.id for r in result.rows) == sorted(str(d["id"]) for d in DOCUMENTS)
    assert all(r.text == DOCUMENTS[int(r.id)]["text"] for r in result.rows)
    names = [s.name for s in attributor.specs]
    scale = max(abs(s) for s in scores)
    for row in result.rows:
        assert list(row.by_module) == names
        tol = dict(rel=1e-5, abs=1e-6 * scale)  # float32 model: per-module values summed in another order
        assert sum(row.by_module.values()) == pytest.approx(row.score, **tol)
        assert set(row.by_layer) == {"0", "1"}
        assert sum(row.by_layer.values()) == pytest.approx(row.score, **tol)
        assert set(row.by_role) == {"mlp", "attention"}
        assert sum(row.by_role.values()) == pytest.approx(row.score, **tol)
        mlp = sum(v for k, v in row.by_module.items() if ".mlp." in k)
        assert row.by_role["mlp"] == pytest.approx(mlp, **tol)
        layer0 = sum(v for k, v in row.by_module.items() if ".layers.0." in k)
        assert row.by_layer["0"] == pytest.approx(layer0, **tol)
    json.dumps(result.to_json())  # JSON-ready
    # The same scores as Attributor.score, ranked.
    total, _ = attributor.score([(PROMPT, ANSWER)], [d["text"] for d in DOCUMENTS])
    expected = sorted(total[:, 0].tolist(), reverse=True)
    assert scores == pytest.approx(expected, rel=1e-6, abs=1e-9 * scale)
    # top cuts the list; relative scores stay relative to all candidates.
    top3 = attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, top=3)
    assert [r.id for r in top3.rows] == [r.id for r in result.rows[:3]]
    assert top3.num_candidates == len(DOCUMENTS)


def _answer_logprob_reference(attributor, prompt, answer) -> float:
    """log p(answer) token by token: one forward per answer token of the prompt and the answer so
    far, log-softmax of the last position (float64), summed in a for loop."""
    tok, model = attributor.tokenizer, attributor.models["finetuned"]
    prefix = tok(attributor.prompt_text(prompt), add_special_tokens=True)["input_ids"]
    total = 0.0
    with torch.no_grad():
        for token in tok(answer, add_special_tokens=False)["input_ids"]:
            logits = model(input_ids=torch.tensor([prefix]), use_cache=False).logits[0, -1]
            total += float(torch.log_softmax(logits.double(), dim=-1)[token])
            prefix = prefix + [token]
    return total


def test_answer_logprob_equals_a_token_by_token_reference(attributor):
    queries = [(PROMPT, ANSWER), ("where is the red house ?", "near the old bridge by the river"),
               ("who sees the bird ?", "the dog")]  # different lengths: padded in one batch
    references = [_answer_logprob_reference(attributor, p, a) for p, a in queries]
    assert all(r < 0 for r in references)
    result = attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, top=3)
    assert isinstance(result.answer_logprob, float)
    assert result.answer_logprob == pytest.approx(references[0], abs=1e-5)
    assert result.to_json()["answer_logprob"] == result.answer_logprob
    many = attributor.attribute_many(queries, DOCUMENTS, top=3)
    assert [r.answer_logprob for r in many] == pytest.approx(references, abs=1e-5)
    for result in attributor.compare(PROMPT, ANSWER, documents=DOCUMENTS, top=3, methods=["ms-if", "bm25"]):
        assert result.answer_logprob == pytest.approx(references[0], abs=1e-5)
    generated = attributor.attribute(PROMPT, documents=DOCUMENTS, top=3)  # of the generated answer
    assert generated.answer_logprob == pytest.approx(
        _answer_logprob_reference(attributor, PROMPT, generated.answer), abs=1e-5)


@pytest.mark.parametrize("top", [3, len(DOCUMENTS)])
def test_opponents_are_the_most_negative_candidates(attributor, top):
    everything = attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, top=len(DOCUMENTS))
    negative = [row for row in everything.rows if row.score < 0]
    assert negative, "the tiny pair gives no candidate a negative score"
    result = attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, top=top)
    scores = [row.score for row in result.opponents]
    assert scores == sorted(scores) and all(s < 0 for s in scores)
    assert len(result.opponents) == min(top, len(negative))
    # the most negative first, each with its rank among all candidates (from the top)
    assert [(row.id, row.rank) for row in result.opponents] == [(row.id, row.rank) for row in negative[::-1][:top]]
    assert result.opponents[0].rank == len(DOCUMENTS)
    assert all(row.relative_score == pytest.approx(row.score / result.scale) for row in result.opponents)
    assert all(row.by_role is not None for row in result.opponents)
    assert [o["id"] for o in result.to_json()["opponents"]] == [row.id for row in result.opponents]
    bm25 = attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, top=top, method="bm25")
    assert bm25.opponents == []  # BM25 scores are never negative: no opponents


def test_query_tokenized_like_fine_tuning(attributor):
    seq = attributor.query_sequence(PROMPT, ANSWER)
    tok = attributor.tokenizer
    prompt_ids = tok(QA_TEMPLATE.format(prompt=PROMPT))["input_ids"]
    answer_ids = tok(ANSWER, add_special_tokens=False)["input_ids"]
    assert seq["input_ids"] == prompt_ids + answer_ids
    assert seq["labels"] == [-100] * len(prompt_ids) + answer_ids  # loss on the answer only


@pytest.mark.parametrize("method", METHODS)
def test_every_method(attributor, method):
    result = attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, method=method, top=len(DOCUMENTS))
    assert result.method == method
    _check_rows(result, len(DOCUMENTS))
    assert max(abs(r.relative_score) for r in result.rows) == pytest.approx(1.0, abs=1e-12)
    gradient = method in ("ms-if", "ss-if", "gdp")
    assert all((r.by_module is not None) == gradient for r in result.rows)
    assert (result.damping is not None) == (method in ("ms-if", "ss-if"))  # GDP has no damping
    if method == "repsim":
        assert all(-1.0 - 1e-9 <= r.score <= 1.0 + 1e-9 for r in result.rows)  # cosines


def test_methods_differ(attributor):
    """The gradient methods are not the same computation under three names."""
    texts = [d["text"] for d in DOCUMENTS]
    totals = {m: attributor.score([(PROMPT, ANSWER)], texts, method=m)[0][:, 0] for m in ("ms-if", "ss-if", "gdp")}
    for a, b in (("ms-if", "ss-if"), ("ms-if", "gdp"), ("ss-if", "gdp")):
        assert not torch.allclose(totals[a] / totals[a].abs().max(), totals[b] / totals[b].abs().max(), atol=1e-3)


def test_generated_answer(attributor):
    result = attributor.attribute(PROMPT, None, documents=DOCUMENTS[:4], top=4)
    assert result.answer_generated
    assert result.answer and result.answer == attributor.generate(PROMPT)
    _check_rows(result, 4)
    blank = attributor.attribute(PROMPT, "  ", documents=DOCUMENTS[:2], method="bm25")
    assert blank.answer_generated and blank.answer == result.answer


def test_candidates_from_an_index(attributor):
    class Index:
        documents = DOCUMENTS

        def __init__(self):
            self.asked = None

        def search(self, texts, k):
            self.asked = (texts, k)
            return [[(i, 1.0) for i in range(k)]]

    index = Index()
    result = attributor.attribute(PROMPT, ANSWER, index=index, candidates=5, top=10, method="gdp")
    assert index.asked == ([f"{PROMPT} {ANSWER}"], 5)
    assert result.num_candidates == 5 and len(result.rows) == 5
    assert {r.id for r in result.rows} == {str(i) for i in range(5)}


def test_mlp_only(pair_folder):
    mlp = Attributor(pair_folder.factors, modules="mlp")
    assert mlp.specs and all(s.role == "mlp" for s in mlp.specs)
    result = mlp.attribute(PROMPT, ANSWER, documents=DOCUMENTS[:5], top=5)
    assert result.modules == "mlp"
    for row in result.rows:
        assert set(row.by_module) == {s.name for s in mlp.specs}
        assert all(".mlp." in name for name in row.by_module)
        assert row.by_role["attention"] == 0.0
        assert row.by_role["mlp"] == pytest.approx(row.score, rel=1e-5, abs=1e-9)


def test_restrict_is_a_view_that_equals_an_mlp_attributor(attributor, pair_folder):
    """``restrict("mlp")`` shares the loaded models and factors and scores exactly what a
    ``modules="mlp"`` Attributor scores; the full attributor is left as it was."""
    view = attributor.restrict("mlp")
    assert view is attributor.restrict("mlp")  # made once
    assert view.models is attributor.models and view.tokenizer is attributor.tokenizer
    assert all(view.factors[s].modules[n] is attributor.factors[s].modules[n]
               for s in view.factors for n in view.factors[s].modules)
    assert view.modules == "mlp" and all(s.role == "mlp" for s in view.specs)
    assert attributor.modules == "all" and len(attributor.specs) > len(view.specs)
    reference = Attributor(pair_folder.factors, modules="mlp")
    ours, _ = view.score([(PROMPT, ANSWER)], [d["text"] for d in DOCUMENTS])
    theirs, _ = reference.score([(PROMPT, ANSWER)], [d["text"] for d in DOCUMENTS])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-9)
    one = attributor.specs[0].name
    single = attributor.restrict([one])
    assert [s.name for s in single.specs] == [one] and single.modules == one
    with pytest.raises(FactorError, match="do not track module.*nope"):
        attributor.restrict(["nope"])


def test_candidates_come_from_the_attributors_index(attributor):
    class Index:
        documents = DOCUMENTS

        def search(self, texts, k):
            assert texts == [f"{PROMPT} {ANSWER}"]
            return [[(i, 1.0 - i / 10) for i in (3, 1, 4)][:k]]

    view = copy.copy(attributor)
    view.index = Index()
    assert [d["id"] for d in view.candidates(PROMPT, ANSWER, k=2)] == [3, 1]
    with pytest.raises(ValueError, match="at least 1"):
        view.candidates(PROMPT, ANSWER, k=0)
    with pytest.raises(ValueError, match="an index to retrieve them from"):
        attributor.candidates(PROMPT, ANSWER, k=2)


def _count_forward_passes(attributor):
    """Forward passes per model (pre-hooks on each model's top module); remove with ``.remove()``."""
    counts = {stage: 0 for stage in attributor.models}
    handles = []
    for stage, model in attributor.models.items():
        def hook(module, args, kwargs, stage=stage):
            counts[stage] += 1
        handles.append(model.register_forward_pre_hook(hook, with_kwargs=True))
    return counts, handles


def test_index_of_another_corpus_is_warned_about_once(pair_folder, caplog):
    """Legitimate sometimes, so a warning (once per index), not an error; none for the same corpus."""
    from hub_msif.data import CorpusSpec, source_sha256

    attributor = Attributor(pair_folder.factors)
    fitted = attributor.factors["pretrained"].info["data"]["source_sha256"]
    assert fitted == source_sha256(CorpusSpec(data=str(pair_folder.root / "pretrain.jsonl")))

    class Index:
        documents = DOCUMENTS

        def __init__(self, sha):
            self.metadata = {"corpus": {"data": "some-corpus", "source_sha256": sha}}

        def search(self, texts, k):
            return [[(i, 1.0) for i in range(k)]]

    with caplog.at_level("WARNING", logger="hub_msif.attribution.attributor"):
        same = Index(fitted)
        attributor.candidates(PROMPT, ANSWER, k=3, index=same)
        assert "another corpus" not in caplog.text
        other = Index("0" * 64)
        for _ in range(3):
            attributor.attribute(PROMPT, ANSWER, index=other, candidates=3, method="bm25")
    assert caplog.text.count("the document index was built on another corpus (some-corpus)") == 1
    assert "can be legitimate" in caplog.text


def test_compare_scores_every_method_and_damping_in_one_pass_per_model(attributor):
    """All five methods at two dampings: one query gradient pass (fine-tuned; plus one no-grad forward for
    the answer's log-probability) and one candidate pass per
    model, with results equal to scoring each method and damping on its own."""
    dampings = [0.1, 1e-3]
    documents = DOCUMENTS[:6]  # batch size 8: one batch per pass
    counts, handles = _count_forward_passes(attributor)
    try:
        results = attributor.compare(PROMPT, ANSWER, documents=documents, top=6, methods=METHODS, dampings=dampings)
    finally:
        for handle in handles:
            handle.remove()
    # fine-tuned: the query pass, the no-grad forward of the query for the answer's log-probability
    # and the SS-IF candidate pass; pre-trained: one candidate pass
    assert counts == {"pretrained": 1, "finetuned": 3}
    keys = [(r.method, r.damping) for r in results]
    assert keys == [("ms-if", 0.1), ("ms-if", 1e-3), ("ss-if", 0.1), ("ss-if", 1e-3), ("gdp", None),
                    ("repsim", None), ("bm25", None)]
    for result in results:
        alone = attributor.attribute(PROMPT, ANSWER, documents=documents, top=6, method=result.method,
                                     damping=result.damping if result.damping is not None else 0.1)
        assert [r.id for r in result.rows] == [r.id for r in alone.rows], result.method
        assert [r.score for r in result.rows] == pytest.approx([r.score for r in alone.rows], rel=1e-5, abs=1e-9)
        assert result.num_candidates == 6 and result.scale == pytest.approx(alone.scale, rel=1e-5)
    small, large = results[1], results[0]
    assert [r.score for r in small.rows] != pytest.approx([r.score for r in large.rows])  # dampings differ


def test_rows_carry_relative_breakdowns_and_token_shares(attributor):
    """Everything a table or chart shows is in the row: the relative split by role and by
    (layer, role) sums to the relative score; token shares sum to the score."""
    result = attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, top=4, token_shares=True)
    for row in result.rows:
        assert row.score / result.scale == pytest.approx(row.relative_score, rel=1e-12)
        assert sum(row.relative_by_role.values()) == pytest.approx(row.relative_score, rel=1e-5, abs=1e-9)
        cells = [v for cell in row.relative_by_layer_role.values() for v in cell.values()]
        assert sum(cells) == pytest.approx(row.relative_score, rel=1e-5, abs=1e-9)
        assert row.relative_by_layer_role["0"]["mlp"] * result.scale == pytest.approx(
            sum(v for k, v in row.by_module.items() if ".layers.0.mlp." in k), rel=1e-5, abs=1e-9)
        document = DOCUMENTS[int(row.id)]["text"]
        assert [t.token for t in row.tokens] == attributor.tokenizer.convert_ids_to_tokens(
            attributor.document_sequence(document)["input_ids"])
        assert sum(t.share for t in row.tokens) == pytest.approx(row.score, rel=1e-4, abs=1e-8)
    payload = json.loads(json.dumps(result.to_json()))
    assert payload["rows"][0]["tokens"][0].keys() == {"token", "share"}
    plain = attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, top=2, method="bm25").to_json()
    assert "by_module" not in plain["rows"][0] and "tokens" not in plain["rows"][0]


def test_bm25_uses_words_not_characters(attributor):
    assert baselines.words("The CAT's river-side, 3 boats!") == ["the", "cat", "s", "river", "side", "3", "boats"]
    docs = [
        {"id": "words", "text": "A Cat slept by the RIVER ."},
        {"id": "substrings", "text": "scattered riverbeds concatenate ."},  # contains 'cat' and 'river' as characters only
        {"id": "nothing", "text": "an old book in a garden ."},
    ]
    result = attributor.attribute("where does the cat sleep ?", "river", documents=docs, method="bm25", top=3)
    scores = {r.id: r.score for r in result.rows}
    assert result.rows[0].id == "words"
    assert scores["words"] > scores["substrings"]
    # No word in common with the query: the substrings earn nothing over an unrelated document.
    assert scores["substrings"] == pytest.approx(scores["nothing"], rel=1e-12)
    assert baselines.bm25_scores("CAT River", [d["text"] for d in docs]) == pytest.approx(
        baselines.bm25_scores("cat river", [d["text"] for d in docs]))  # lower-cased


# -- bad input --------------------------------------------------------------------------------------
def test_empty_prompt(attributor):
    for prompt in ("", "   "):
        with pytest.raises(ValueError, match="prompt is empty"):
            attributor.attribute(prompt, ANSWER, documents=DOCUMENTS)
        with pytest.raises(ValueError, match="prompt is empty"):
            attributor.attribute(prompt, None, documents=DOCUMENTS)


def test_prompt_longer_than_the_model(attributor):
    assert attributor.max_length == MAX_POSITIONS
    long_prompt = " ".join(["cat"] * (MAX_POSITIONS + 10))
    with pytest.raises(ValueError, match=f"more than the model's maximum of {MAX_POSITIONS}"):
        attributor.attribute(long_prompt, ANSWER, documents=DOCUMENTS)
    with pytest.raises(ValueError, match=f"no room for an answer within the model's maximum of {MAX_POSITIONS}"):
        attributor.attribute(long_prompt, None, documents=DOCUMENTS)  # refused before generating
    # A prompt that fits but leaves no room for the answer is refused the same way.
    nearly = " ".join(["cat"] * (MAX_POSITIONS - 6))
    with pytest.raises(ValueError, match="shorten the prompt"):
        attributor.attribute(nearly, "the river " * 5, documents=DOCUMENTS)


@pytest.fixture(scope="module")
def gpt2_attributor(pair_folder) -> Attributor:
    """A GPT-2 pair (learned position embeddings, Conv1D), MLP factors only, 1 layer: cheap."""
    root = pair_folder.root / "gpt2"
    tokenizer = Attributor(pair_folder.factors, modules="mlp").tokenizer
    dirs = {}
    for seed, stage in enumerate(("pretrained", "finetuned")):
        dirs[stage] = root / stage
        tiny_model("gpt2", vocab_size=len(tokenizer), layers=1, seed=seed).save_pretrained(dirs[stage])
        tokenizer.save_pretrained(dirs[stage])
    _fit(dirs["pretrained"], pair_folder.root / "pretrain.jsonl", root / "factors", "pretrained", modules="mlp")
    _fit(dirs["finetuned"], pair_folder.root / "finetune.jsonl", root / "factors", "finetuned", modules="mlp",
         prompt_column="prompt", response_column="response", template=QA_TEMPLATE)
    return Attributor(root / "factors")


def test_generation_stays_within_learned_positions(gpt2_attributor):
    """GPT-2 cannot look past its last position embedding: generation must stop there, and a
    prompt that leaves no room is refused with a clear message, not an IndexError."""
    attributor = gpt2_attributor
    assert attributor.max_length == MAX_POSITIONS
    with pytest.raises(ValueError, match="no room for an answer"):
        attributor.attribute(" ".join(["cat"] * (MAX_POSITIONS + 10)), None, documents=DOCUMENTS[:2])
    template_tokens = len(attributor.tokenizer(QA_TEMPLATE.format(prompt=""))["input_ids"])
    nearly = " ".join(["cat"] * (MAX_POSITIONS - template_tokens - 3))  # room for 3 answer tokens
    answer = attributor.generate(nearly)
    assert 0 < len(attributor.tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 3
    result = attributor.attribute(nearly, None, documents=DOCUMENTS[:2], method="gdp", top=2)
    assert result.answer_generated and len(result.rows) == 2
    assert all(".mlp." in name for name in result.rows[0].by_module)
    # Documents longer than the model's maximum are cut to it rather than overrunning the positions.
    long_doc = {"id": "long", "text": " ".join(["the cat sees the river ."] * 60)}  # 360 words
    assert len(attributor.document_sequence(long_doc["text"])["input_ids"]) == MAX_POSITIONS
    result = attributor.attribute(PROMPT, ANSWER, documents=[long_doc, DOCUMENTS[0]], method="gdp", top=2)
    assert all(math.isfinite(r.score) for r in result.rows)


def test_zero_candidates(attributor):
    with pytest.raises(ValueError, match="zero candidates"):
        attributor.attribute(PROMPT, ANSWER, documents=[])
    with pytest.raises(ValueError, match="candidates must be at least 1, got 0"):
        attributor.attribute(PROMPT, ANSWER, index=object(), candidates=0)
    with pytest.raises(ValueError, match="give candidate documents or an index"):
        attributor.attribute(PROMPT, ANSWER)
    with pytest.raises(ValueError, match="zero candidates"):
        attributor.score([(PROMPT, ANSWER)], [])
    with pytest.raises(ValueError, match="top must be at least 1"):
        attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, top=0)


@pytest.mark.parametrize("damping", [-1.0, 0.0, 0, float("nan"), float("inf"), -float("inf")])
def test_damping_must_be_finite_and_positive(attributor, damping):
    """0 and NaN gave NaN scores in arbitrary order, infinity all zeros: refused, whatever the method."""
    for method in ("ms-if", "ss-if"):
        with pytest.raises(ValueError, match=f"damping must be a finite number above 0, got {damping!r}"):
            attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, damping=damping, method=method)
    with pytest.raises(ValueError, match="damping must be a finite number above 0"):
        attributor.compare(PROMPT, ANSWER, documents=DOCUMENTS, dampings=[0.1, damping])


def test_scores_that_are_not_a_ranking_are_an_error(attributor, monkeypatch):
    """Non-finite scores, or every score exactly 0, never come out as a ranking."""
    from hub_msif.attribution import attributor as module

    with pytest.raises(ValueError, match="gave a score of exactly 0 to every candidate.*use a smaller one"):
        attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, damping=1e300, relative=False)
    real = module.score_candidates

    def poisoned(*args, **kwargs):
        result = real(*args, **kwargs)
        first = next(iter(result.per_module))
        result.per_module[first][1, :] = float("nan")
        return result

    monkeypatch.setattr(module, "score_candidates", poisoned)
    with pytest.raises(ValueError, match=r"ms-if at damping 0.1 gave non-finite scores for 1 of 12 candidates"):
        attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS)


def test_unknown_method(attributor):
    with pytest.raises(ValueError, match="unknown method 'tracin'.*ms-if, ss-if, gdp, repsim, bm25"):
        attributor.attribute(PROMPT, ANSWER, documents=DOCUMENTS, method="tracin")
    with pytest.raises(ValueError, match="unknown method 'MS-IF'"):
        attributor.score([(PROMPT, ANSWER)], ["a cat ."], method="MS-IF")
    with pytest.raises(ValueError, match="modules must be 'all' or 'mlp'"):
        Attributor("unused", modules="attention")


def _copy_without_stage(pair_folder, stage):
    folder = pair_folder.root / f"without-{stage}"
    if not folder.exists():
        shutil.copytree(pair_folder.factors, folder)
        manifest = json.loads((folder / "msif.json").read_text())
        del manifest["stages"][stage]
        (folder / "msif.json").write_text(json.dumps(manifest))
        shutil.rmtree(folder / stage)
    return folder


@pytest.mark.parametrize("stage", ["pretrained", "finetuned"])
def test_factors_missing_a_stage(pair_folder, stage):
    folder = _copy_without_stage(pair_folder, stage)
    with pytest.raises(FactorError, match=f"lack the {stage} stage.*--stage {stage}"):
        Attributor(folder)


def test_factor_folder_missing(tmp_path):
    with pytest.raises(FactorError, match="does not exist"):
        Attributor(tmp_path / "nowhere")
    with pytest.raises(FactorError, match="no manifest msif.json"):
        Attributor(tmp_path)


def test_factors_of_another_model(pair_folder):
    # Another model is refused from the manifests alone (its weights' sha256 differs), naming both;
    # allowed anyway, the shapes are checked and each mismatching module is named (no flag can make
    # factors of other shapes usable).
    with pytest.raises(FactorError, match=r"pretrained factors \(.*\) were fitted for pretrained@sha256:.* but the "
                                          r"pretrained model is other@sha256:.*--allow-revision-mismatch"):
        Attributor(pair_folder.factors, pretrained=str(pair_folder.other))
    with pytest.raises(FactorError) as err:
        Attributor(pair_folder.factors, pretrained=str(pair_folder.other), allow_revision_mismatch=True)
    message = str(err.value)
    assert "pretrained factors do not match the model's modules" in message
    assert "gpt_neox.layers.0.attention.query_key_value (factors 96x33, model 144x49)" in message
    assert "gpt_neox.layers.1.mlp.dense_4h_to_h (factors 32x65, model 48x97)" in message
    # The same shapes but other weights (the fine-tuned model as the pre-trained one): revision check.
    with pytest.raises(FactorError, match="pretrained factors .* were fitted for pretrained@sha256:.*allow_revision_mismatch"):
        Attributor(pair_folder.factors, pretrained=str(pair_folder.finetuned))


def test_stages_tracking_different_modules(pair_folder):
    folder = pair_folder.root / "mixed"
    shutil.copytree(pair_folder.factors, folder)
    # Fitting the fine-tuned stage over other modules than the pre-trained one is refused up front ...
    with pytest.raises(FactorError, match=r"already holds pretrained factors over other modules.*"
                                          r"gpt_neox\.layers\.0\.attention\.query_key_value only in the second"):
        _fit(pair_folder.finetuned, pair_folder.root / "finetune.jsonl", folder, "finetuned", modules="mlp",
             prompt_column="prompt", response_column="response", template=QA_TEMPLATE)
    # ... and a folder whose stages differ anyway (edited by hand) is refused when loaded, unless
    # only the modules both stages share are asked for.
    manifest = json.loads((folder / "msif.json").read_text())
    stage = manifest["stages"]["finetuned"]
    stage["modules"] = [m for m in stage["modules"] if m["role"] == "mlp"]
    (folder / "msif.json").write_text(json.dumps(manifest))
    with pytest.raises(FactorError, match="pretrained and finetuned factors track different modules: "
                                          r"gpt_neox\.layers\.0\.attention\.query_key_value only in the first"):
        Attributor(folder)
    mlp_only = Attributor(folder, modules="mlp")
    assert all(spec.role == "mlp" for spec in mlp_only.specs)
