"""Two-stage attribution with the gradient index and ``gradindex check`` (issue 18, deliverables 3-4;
docs/design.md, "Gradient index"), on the tiny model pair of conftest.py.

The references are exact: stage two is the Attributor's own MS-IF of the same documents
(``attribute(documents=...)``), and at ``projection = identity`` stage one's scores are exact MS-IF up
to the float16 storage of the index's unit rows, whose bound is derived below (elementwise rounding).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import QA_TEMPLATE

from hub_msif.errors import MsifError, MsifValueError, RetrievalError

pytestmark = pytest.mark.usefixtures("one_thread")
NUM_DOCUMENTS = 150  # gradient_world's corpus: more than the check's index top 100 (no recall of 1 by construction)
FLOAT16_UNIT = 2.0 ** -11  # float16 rounds each element to within this fraction of itself


@pytest.fixture(scope="module")
def world(gradient_world):
    return gradient_world


@pytest.fixture(scope="module")
def attributor(world):
    from hub_msif.attribution.attributor import Attributor

    return Attributor(world["factors"], index=world["index"], gradindex=world["gradindexes"]["identity"])


def _exact(attributor, prompt, answer, documents, top=None):
    """Exact MS-IF of ``documents`` (stage two alone), every one ranked."""
    return attributor.attribute(prompt, answer, documents=documents, top=top or len(documents))


def test_the_template_is_the_fine_tuning_one(attributor):
    assert attributor.template == QA_TEMPLATE


def test_identity_two_stage_over_the_whole_corpus_is_exact_ms_if(world, attributor):
    """Every document handed to stage two: the same ranking and scores as exact MS-IF of the whole
    corpus (the same documents meet in the same batches: equal to the last bit)."""
    documents = world["gradindexes"]["identity"].documents
    for prompt, answer in world["queries"]:
        two_stage = attributor.attribute(prompt, answer, candidates=NUM_DOCUMENTS, top=NUM_DOCUMENTS)
        exact = _exact(attributor, prompt, answer, documents)
        assert two_stage.num_candidates == NUM_DOCUMENTS
        assert [(r.id, r.score) for r in two_stage.rows] == [(r.id, r.score) for r in exact.rows]
        assert [(r.id, r.score) for r in two_stage.opponents] == [(r.id, r.score) for r in exact.opponents]
        stage = two_stage.stage_one
        assert stage["source"] == "gradient" and stage["candidates"] == NUM_DOCUMENTS
        assert stage["searched"] == {"gradient": NUM_DOCUMENTS} and stage["seconds"] > 0
        assert "check" not in stage  # none recorded yet
        assert two_stage.seconds >= stage["seconds"] and exact.stage_one is None


def test_identity_stage_one_scores_are_exact_ms_if_to_float16_storage(world, attributor):
    """Stage one's scores at identity: exact MS-IF, each within the float16 rounding of the stored unit
    row, ``|<q, v> - <q, v16>| <= norm * sum_i |q_i| |u_i| 2^-11`` (elementwise rounding), plus float32
    noise of the exact score (1e-5 of the largest); and its top 10 is exact MS-IF's top 10 where the
    gaps exceed that bound."""
    gradindex = world["gradindexes"]["identity"]
    norms = gradindex.norms.astype(np.float64)
    by_id = {d["id"]: i for i, d in enumerate(gradindex.documents)}
    for prompt, answer in world["queries"]:
        vector = attributor.gradient_query_vectors([(prompt, answer)], gradindex).astype(np.float64)[0]
        hits = gradindex.search(vector[None, :].astype(np.float32), NUM_DOCUMENTS)[0]
        assert len(hits) == NUM_DOCUMENTS
        exact = {r.id: r.score for r in _exact(attributor, prompt, answer, gradindex.documents).rows}
        scale = max(abs(s) for s in exact.values())
        units = np.abs(gradindex.unit_rows.astype(np.float64))
        # each stored element is within 2^-11 of itself (float16, normal range), or 2^-25 (subnormal)
        bound = norms * (FLOAT16_UNIT * (1 + FLOAT16_UNIT) * (units @ np.abs(vector))
                         + 2.0 ** -25 * np.abs(vector).sum()) + 1e-5 * scale
        errors = [abs(score - exact[gradindex.documents[row]["id"]]) - bound[row] for row, score in hits]
        assert max(errors) <= 0, max(errors)
        assert float(np.max(bound)) < 0.01 * scale, float(np.max(bound)) / scale  # far from vacuous
        ranked = sorted(exact, key=exact.get, reverse=True)
        found = [gradindex.documents[row]["id"] for row, _ in hits[:10]]
        # the exact top 10 whose 10th score stands clear of the 11th by twice the bound are found exactly
        margin = 2 * float(bound[by_id[ranked[9]]] + bound[by_id[ranked[10]]])
        if exact[ranked[9]] - exact[ranked[10]] > margin:
            assert set(found) == set(ranked[:10])


def test_candidates_from_both_is_the_union_and_scored_exactly(world, attributor):
    prompt, answer = world["queries"][1]
    embedded = attributor.candidates(prompt, answer, 20, candidates_from="embedding")
    by_gradient = attributor.candidates(prompt, answer, 20, candidates_from="gradient")
    both = attributor.candidates(prompt, answer, 20, candidates_from="both")
    union = list(dict.fromkeys([d["id"] for d in by_gradient] + [d["id"] for d in embedded]))
    assert [d["id"] for d in both] == union
    assert len(embedded) == len(by_gradient) == 20 and 20 <= len(union) <= 40
    result = attributor.attribute(prompt, answer, candidates=20, top=40, candidates_from="both")
    assert result.num_candidates == len(union)
    assert result.stage_one["source"] == "both"
    assert result.stage_one["searched"] == {"embedding": NUM_DOCUMENTS, "gradient": NUM_DOCUMENTS}
    exact = _exact(attributor, prompt, answer, both, top=40)
    assert [(r.id, r.score) for r in result.rows] == [(r.id, r.score) for r in exact.rows]
    # embedding: as before the gradient index (an index alone gives the same)
    plain = attributor.attribute(prompt, answer, candidates=20, candidates_from="embedding")
    assert plain.stage_one["source"] == "embedding" and plain.stage_one["searched"] == {"embedding": NUM_DOCUMENTS}
    assert {r.id for r in plain.rows} <= {d["id"] for d in embedded}


def test_the_default_source_and_the_refusals(world, attributor):
    from hub_msif.attribution.attributor import Attributor

    prompt, answer = world["queries"][0]
    assert attributor.attribute(prompt, answer, candidates=5).stage_one["source"] == "gradient"
    only_index = Attributor(world["factors"], index=world["index"])
    assert only_index.attribute(prompt, answer, candidates=5).stage_one["source"] == "embedding"
    with pytest.raises(MsifValueError, match=r"candidates from gradient need a gradient index \(gradindex=, --gradindex\)"):
        only_index.attribute(prompt, answer, candidates_from="gradient")
    with pytest.raises(MsifValueError, match="candidates come from embedding, gradient, both, not 'bm25'"):
        attributor.attribute(prompt, answer, candidates_from="bm25")
    with pytest.raises(MsifValueError, match="no gradindex or candidates_from with them"):
        attributor.attribute(prompt, answer, documents=world["index"].documents[:3], candidates_from="gradient")
    # a gradient index given per call is used (and checked) like the attributor's own
    result = only_index.attribute(prompt, answer, candidates=7, gradindex=world["gradindexes"]["default"])
    assert result.stage_one["source"] == "gradient" and result.num_candidates == 7


def test_a_gradient_index_of_another_stage_or_modules_is_refused_in_one_line(world):
    from hub_msif.attribution.attributor import Attributor

    with pytest.raises(RetrievalError) as info:
        Attributor(world["factors"], gradindex=world["folders"]["finetuned"])  # a location, loaded and checked
    message = str(info.value)
    assert "\n" not in message and "finetuned factors" in message and "not for the factors given" in message
    mlp = Attributor(world["factors"], modules="mlp")
    with pytest.raises(MsifError) as info:
        mlp.attribute(*world["queries"][0], gradindex=world["gradindexes"]["identity"])
    assert "\n" not in str(info.value) and "--modules all" in str(info.value)


def test_restricted_views_search_with_every_module(world, attributor):
    """An MLP-only view scores MLP modules in stage two, but stage one projects the query over every
    module the index covers: the same candidates as the full attributor's."""
    prompt, answer = world["queries"][2]
    view = attributor.restrict("mlp")
    assert [d["id"] for d in view.candidates(prompt, answer, 12)] == \
        [d["id"] for d in attributor.candidates(prompt, answer, 12)]
    result = view.attribute(prompt, answer, candidates=12, top=12)
    assert result.modules == "mlp" and result.stage_one["source"] == "gradient"


def test_many_queries_give_what_one_call_per_query_gives(world, attributor):
    queries = world["queries"]
    gradindex = world["gradindexes"]["default"]
    for source in ("gradient", "both"):
        many = attributor.attribute_many(queries, candidates=15, top=15, gradindex=gradindex, candidates_from=source)
        for (prompt, answer), got in zip(queries, many, strict=True):
            want = attributor.attribute(prompt, answer, candidates=15, top=15, gradindex=gradindex,
                                        candidates_from=source)
            assert got.num_candidates == want.num_candidates == want.stage_one["candidates"]
            assert [r.id for r in got.rows] == [r.id for r in want.rows]
            assert [r.score for r in got.rows] == pytest.approx([r.score for r in want.rows], rel=1e-6,
                                                                abs=1e-6 * want.scale)
            assert got.stage_one["source"] == source and got.seconds > 0
            json.dumps(got.to_json(), allow_nan=False)


# -- gradindex check ---------------------------------------------------------------------------------


def test_check_at_identity_finds_every_exact_top_10(world, attributor):
    from hub_msif.attribution.gradient_check import check_gradindex

    gradindex = world["gradindexes"]["identity"]
    queries = [(n, p, a) for n, (p, a) in enumerate(world["queries"])]
    check = check_gradindex(attributor, gradindex, queries, sample=3, seed=1)
    assert check.corpus_sample == NUM_DOCUMENTS and not check.trivial and len(check.queries) == 3
    assert check.recall_at_10 == 1.0 and all(q.recall_at_10 == 1.0 for q in check.queries)
    for query in check.queries:  # the exact top 10 is attribute()'s over the whole corpus
        exact = _exact(attributor, query.prompt, query.answer, gradindex.documents, top=10)
        assert query.exact_top == [r.id for r in exact.rows] and query.found == query.exact_top
    again = check_gradindex(attributor, gradindex, queries, sample=3, seed=1)
    assert [q.id for q in again.queries] == [q.id for q in check.queries]  # seeded
    json.dumps(check.to_json(), allow_nan=False)


def test_check_at_the_default_projection_on_a_corpus_sample(world, attributor):
    """A sample of 120 of the 150 documents: the exact top 10 is MS-IF's over those 120, the index's top
    100 its faiss search restricted to them (compared with brute-force inner products of its vectors)."""
    from hub_msif.attribution.gradient_check import check_gradindex

    gradindex = world["gradindexes"]["default"]
    queries = [(f"q{n}", p, a) for n, (p, a) in enumerate(world["queries"])]
    check = check_gradindex(attributor, gradindex, queries, sample=4, corpus_sample=120, seed=3)
    assert 0.0 <= check.recall_at_10 <= 1.0 and check.corpus_sample == 120 and not check.trivial
    assert check.recall_at_10 == pytest.approx(np.mean([q.recall_at_10 for q in check.queries]))
    vectors = gradindex.vectors().astype(np.float64)
    for query in check.queries:
        exact_rows = [i for i, d in enumerate(gradindex.documents) if d["id"] in set(query.exact_top)]
        assert len(query.exact_top) == 10 and len(exact_rows) == 10
        # the sample is the 120 documents the check drew: rebuild it from the same seed
        import random

        from hub_msif.attribution.gradient_check import sample_rows

        rng = random.Random(3)
        sample_rows(len(queries), 4, rng)
        rows = sample_rows(len(gradindex), 120, rng)
        exact = _exact(attributor, query.prompt, query.answer, [gradindex.documents[r] for r in rows], top=10)
        assert query.exact_top == [r.id for r in exact.rows]
        q = attributor.gradient_query_vectors([(query.prompt, query.answer)], gradindex).astype(np.float64)[0]
        scores = vectors[rows] @ q
        top100 = {gradindex.documents[rows[i]]["id"] for i in np.argsort(-scores)[:100]}
        assert set(query.found) == set(query.exact_top) & top100
        assert query.recall_at_10 == len(query.found) / 10


def test_record_writes_the_check_into_the_manifest_only(world, attributor, tmp_path):
    import shutil

    from hub_msif.attribution.gradient_check import check_gradindex, record_check
    from hub_msif.attribution.gradient_index import GradientIndex

    folder = tmp_path / "gradindex"
    shutil.copytree(world["folders"]["default"], folder)
    before = json.loads((folder / "gradindex.json").read_text())
    gradindex = GradientIndex.load(folder)
    check = check_gradindex(attributor, gradindex, [(0, *world["queries"][0])], sample=1)
    record_check(folder, check)
    after = json.loads((folder / "gradindex.json").read_text())
    assert {k: v for k, v in after.items() if k != "check"} == before
    assert after["check"] == check.record() and after["check"]["recall_at_10"] == check.recall_at_10
    reloaded = GradientIndex.load(folder)  # every sha256 still holds
    result = attributor.attribute(*world["queries"][0], candidates=5, gradindex=reloaded)
    assert result.stage_one["check"]["recall_at_10"] == check.recall_at_10


def test_restricted_search_keeps_to_the_sample_flat_and_ivf_pq(world):
    """The check's search among a sample: flat gives the brute-force top of the sample's inner products;
    ``ivf,pq`` (the index's own approximate search, its nprobe kept) returns sample rows only."""
    from hub_msif.attribution.gradient_check import restricted_search
    from hub_msif.attribution.gradient_index import GradientIndex

    flat = world["gradindexes"]["default"]
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((3, flat.dims)).astype(np.float32)
    rows = sorted(rng.choice(len(flat), 110, replace=False).tolist())
    vectors = flat.vectors().astype(np.float64)[rows]
    for query, got in zip(queries, restricted_search(flat, queries, rows, 100), strict=True):
        assert set(got) == {rows[i] for i in np.argsort(-(vectors @ query.astype(np.float64)))[:100]}
    approximate = GradientIndex.load(world["folders"]["default"], ann="ivf,pq")
    for got in restricted_search(approximate, queries, rows, 100):
        assert set(got) <= set(rows) and len(got) == len(set(got)) > 0


@pytest.mark.parametrize("settings", [{"damping_pretrained": 1.0, "damping_finetuned": 0.02},
                                      {"contrast": "subject"}], ids=["per-stage-damping", "contrast"])
def test_stage_one_scores_what_stage_two_scores(world, attributor, settings):
    """With per-stage dampings or a contrastive query, stage one's query vector is that of the same
    MS-IF as stage two: at identity, its inner products with the documents' vectors (float32, not the
    stored float16 rows) are the attributor's exact scores; and those differ from the plain ones, so
    the check would see a stage one that ignored the setting."""
    from hub_msif.attribution.attributor import Attributor
    from hub_msif.attribution.gradient_projection import candidate_vectors
    from hub_msif.attribution.stage_one import index_projection

    gradindex = world["gradindexes"]["identity"]
    prompt, answer = world["queries"][0]
    if settings.get("contrast"):
        settings = settings | {"subject": " ".join(prompt.split()[2:-2])}  # "what does {s} {v} ?"
    att = Attributor(world["factors"], gradindex=gradindex, **settings)
    vector = att.gradient_query_vectors([(prompt, answer)]).astype(np.float64)[0]
    projection = index_projection(gradindex, att.factors["pretrained"], str(world["factors"]))
    documents = gradindex.documents
    vectors = candidate_vectors(att.models["pretrained"], projection.specs, projection,
                                [att.document_sequence(d["text"]) for d in documents], att.pad_id)
    stage_one = vectors.double().numpy() @ vector
    exact = {r.id: r.score for r in _exact(att, prompt, answer, documents).rows}
    plain = {r.id: r.score for r in _exact(attributor, prompt, answer, documents).rows}
    want = np.array([exact[d["id"]] for d in documents])
    scale = float(np.abs(want).max())
    assert float(np.abs(stage_one - want).max()) <= 1e-4 * scale
    assert max(abs(exact[i] - plain[i]) for i in exact) > 0.05 * scale
