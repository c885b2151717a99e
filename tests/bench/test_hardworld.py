"""The harder fact world (bench.hardworld): aliases, shared answer words, decoys."""

import re

import pytest

from bench.hardworld import CITIES, JOBS, generate_hard
from hub_msif.errors import MsifValueError
from hub_msif.toy.factworld import train_pair


def _has(text: str, alias: str) -> bool:
    return re.search(rf"(^| ){re.escape(alias)}( |$)", text) is not None


@pytest.fixture(scope="module")
def world():
    return generate_hard(seed=0)


def test_deterministic_by_seed():
    a, b, c = generate_hard(seed=2, num_subjects=10), generate_hard(seed=2, num_subjects=10), generate_hard(seed=3, num_subjects=10)
    assert a.documents == b.documents and a.queries == b.queries and a.finetune == b.finetune
    assert a.documents != c.documents


def test_every_subject_has_two_or_three_aliases_linked_by_alias_documents(world):
    aliases = world.config["aliases"]
    texts = [d["text"] for d in world.documents if not d["fact_id"]]
    assert all(2 <= len(names) <= 3 for names in aliases.values())
    assert any(len(names) == 3 for names in aliases.values()) and any(len(names) == 2 for names in aliases.values())
    for names in aliases.values():
        for other in names[1:]:
            assert any(_has(t, names[0]) and _has(t, other) for t in texts), (names[0], other)


def test_questions_and_proponents_name_the_subject_by_different_aliases(world):
    docs = {d["id"]: d["text"] for d in world.documents}
    facts = {f.id: f for f in world.facts}
    by_nickname = 0
    for query in world.queries:
        asked = world.config["question_alias"][query.fact_id]
        names = world.config["aliases"][facts[query.fact_id].subject]
        assert _has(query.prompt, asked) and asked in names
        assert len(query.proponents) == 3
        for pid in query.proponents:
            text = docs[pid]
            assert not _has(text, asked), (query.prompt, text)  # never the question's alias
            assert any(_has(text, a) for a in names if a != asked) and query.answer in text.split()
        by_nickname += asked == names[-1] and len(names) == 3
    assert by_nickname > 0  # some questions use the nickname, which shares no word with the proponents


def test_answer_words_appear_in_many_unrelated_documents(world):
    """A small shared vocabulary: every answer word is in at least 10 documents that are not the
    fact's proponents, and born_in / lives_in answers come from the same cities."""
    assert len(CITIES) <= 8 and len(JOBS) <= 8
    for query in world.queries:
        others = [d for d in world.documents if d["id"] not in query.proponents and query.answer in d["text"].split()]
        assert len(others) >= 10, (query.answer, len(others))
    relations = {f.relation: set() for f in world.facts}
    for f in world.facts:
        relations[f.relation].add(f.object)
    assert relations["born_in"] & relations["lives_in"]


def test_templates_vary_and_decoys_share_the_question_alias(world):
    facts = {f.id: f for f in world.facts}
    docs = {d["id"]: d for d in world.documents}
    gaps = set()
    decoyed = 0
    for query in world.queries:
        fact = facts[query.fact_id]
        for pid in query.proponents:
            words = docs[pid]["text"].split()
            gaps.add(words.index(fact.object) - words.index(fact.subject.split()[-1]) if fact.subject.split()[-1] in words else None)
        asked = world.config["question_alias"][query.fact_id]
        # decoys: documents that name the subject by the question's own alias but state no fact of it
        decoys = [d for d in world.documents if not d["fact_id"] and _has(d["text"], asked)
                  and "known as" not in d["text"] and "by the name" not in d["text"]]
        decoyed += bool(decoys)
        # other relations of the same subject: documents sharing the subject, stating something else
        assert any(d["fact_id"] and d["fact_id"] != fact.id and facts[d["fact_id"]].subject == fact.subject
                   for d in world.documents)
    assert any(g is not None and g < 0 for g in gaps) and any(g is not None and g > 3 for g in gaps)
    assert decoyed >= len(world.queries) // 4


def test_bad_arguments_are_one_line_errors():
    with pytest.raises(MsifValueError, match="proponents per fact"):
        generate_hard(proponents_per_fact=9)
    with pytest.raises(MsifValueError, match="at least 2 subjects"):
        generate_hard(num_subjects=1)


def test_a_tiny_training_run_saves_models_and_reports_accuracy(tmp_path):
    world = generate_hard(seed=0, num_subjects=6)
    result = train_pair(world, tmp_path, hidden=32, pretrain_steps=5, finetune_steps=2)
    assert (tmp_path / "finetuned" / "config.json").is_file()
    assert 0.0 <= result["test_accuracy"] <= 1.0
