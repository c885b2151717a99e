"""The toy fact world: deterministic, disjoint fine-tuning and test facts, correct proponents."""

import json

import pytest

from hub_msif.toy.factworld import RELATIONS, generate, save_world, train_pair


def test_same_seed_same_world_other_seed_other_world():
    a, b, c = generate(seed=3), generate(seed=3), generate(seed=4)
    assert a.documents == b.documents and a.finetune == b.finetune and a.queries == b.queries
    assert a.documents != c.documents


def test_finetuning_and_test_facts_are_disjoint_and_cover_the_world():
    world = generate(seed=0, num_subjects=20)
    finetune_facts = {r["fact_id"] for r in world.finetune}
    test_facts = {q.fact_id for q in world.queries}
    assert finetune_facts.isdisjoint(test_facts)
    assert finetune_facts | test_facts == {f.id for f in world.facts}
    # Test subjects never appear in the fine-tuning questions: their knowledge is pre-training only.
    test_subjects = {f.subject for f in world.facts if f.id in test_facts}
    assert not any(s in r["prompt"].split() for r in world.finetune for s in test_subjects)


def test_proponents_state_their_fact_with_distinct_paraphrases():
    world = generate(seed=1, num_subjects=12, proponents_per_fact=3)
    facts = {f.id: f for f in world.facts}
    docs = {d["id"]: d for d in world.documents}
    for query in world.queries:
        fact = facts[query.fact_id]
        assert query.answer == fact.object and fact.subject in query.prompt.split()
        assert len(query.proponents) == 3
        texts = [docs[i]["text"] for i in query.proponents]
        assert len(set(texts)) == 3
        for text in texts:
            assert fact.subject in text.split() and fact.object in text.split()
    # Distractors exist, and some share an answer word with a fact without stating it.
    distractors = [d for d in world.documents if not d["fact_id"]]
    objects = {o for r in RELATIONS.values() for o in r["objects"]}
    assert distractors and any(set(d["text"].split()) & objects for d in distractors)


def test_too_many_proponents_is_an_error():
    with pytest.raises(ValueError, match="proponents per fact"):
        generate(proponents_per_fact=9)


def test_save_world_writes_loadable_jsonl(tmp_path):
    world = generate(seed=0, num_subjects=8)
    paths = save_world(world, tmp_path)
    rows = [json.loads(line) for line in paths["pretrain"].read_text().splitlines()]
    assert [r["id"] for r in rows] == [d["id"] for d in world.documents]
    queries = [json.loads(line) for line in paths["queries"].read_text().splitlines()]
    assert queries[0]["proponents"] == world.queries[0].proponents


@pytest.mark.slow
def test_trained_pair_answers_pretraining_only_facts(tmp_path):
    """The real demo-sized training: the fine-tuned model answers most held-out questions."""
    world = generate(seed=0)
    result = train_pair(world, tmp_path, pretrain_steps=1500, finetune_steps=300)
    assert result["finetune_accuracy"] > 0.9
    assert result["test_accuracy"] > 0.6


def test_demo_pair_answers_most_pretraining_only_facts(fact_world):
    """The demo's trained pair (the session's fact world): the fine-tuned model answers held-out
    questions whose facts it saw only in pre-training. The demo measured 91% (41/45); 80% leaves
    room for other torch builds, and a broken training or data path lands far below it."""
    from hub_msif.models import generate_answer, load_model

    world = fact_world["world"]
    model, tokenizer, _ = load_model(str(fact_world["models"] / "finetuned"))

    def accuracy(pairs) -> float:
        answers = [generate_answer(model, tokenizer, world.template.format(prompt=p), max_new_tokens=4) for p, _ in pairs]
        return sum(a == expected for a, (_, expected) in zip(answers, pairs)) / len(pairs)

    assert accuracy([(q.prompt, q.answer) for q in world.queries]) >= 0.8
    assert accuracy([(r["prompt"], r["response"]) for r in world.finetune[:45]]) >= 0.9


def test_small_training_run_saves_loadable_models(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    world = generate(seed=0, num_subjects=8)
    result = train_pair(world, tmp_path, hidden=32, pretrain_steps=5, finetune_steps=2)
    for stage in ("pretrained", "finetuned"):
        model = AutoModelForCausalLM.from_pretrained(result[stage])
        tokenizer = AutoTokenizer.from_pretrained(result[stage])
        assert model.config.model_type == "gpt_neox"
        assert tokenizer.convert_ids_to_tokens(tokenizer(world.queries[0].prompt)["input_ids"])[1:] == world.queries[0].prompt.split()
    assert 0.0 <= result["test_accuracy"] <= 1.0
