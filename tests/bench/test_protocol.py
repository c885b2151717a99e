"""The counterfactual bench's protocol (issue 19): the fixed batch schedule with removed documents
masked, the seeded held-out split of the queries, paired differences and the ceiling score
(docs/design.md, "Counterfactual benchmarks")."""

import copy

import numpy as np
import pytest
import torch

from bench import lds
from bench.counterfactual import SETTINGS, relation_defaults, rival_answers, subject_of
from hub_msif.data import CorpusSpec, tokenize_corpus
from hub_msif.errors import MsifValueError
from hub_msif.toy.examples import tiny_model
from hub_msif.toy.factworld import Rows, batch_schedule, generate, masked_schedule, train_loop, world_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fact_world():
    return generate(seed=0, num_subjects=12, test_fraction=1 / 3)


def test_batch_schedule_is_seeded_epochs_of_full_batches():
    schedule = batch_schedule(10, 7, 4, seed=3)
    assert len(schedule) == 7 and all(len(b) == 4 for b in schedule)
    for epoch in range(3):  # two full batches per epoch of 10 items, no item twice within an epoch
        items = schedule[2 * epoch] + schedule[2 * epoch + 1]
        assert len(set(items)) == 8
    assert schedule == batch_schedule(10, 7, 4, seed=3) and schedule != batch_schedule(10, 7, 4, seed=4)
    assert batch_schedule(3, 2, 8, seed=0)[0] != [] and len(batch_schedule(3, 2, 8, seed=0)[0]) == 3
    with pytest.raises(MsifValueError, match="batch schedule"):
        batch_schedule(0, 2, 4, seed=0)


def test_removing_a_document_changes_only_the_batches_it_was_in():
    schedule = batch_schedule(40, 30, 8, seed=0)
    assert masked_schedule(schedule, None) == schedule
    assert masked_schedule(schedule, set(range(40))) == schedule
    gone = 17
    masked = masked_schedule(schedule, set(range(40)) - {gone})
    assert len(masked) == len(schedule)  # the same steps, in the same order
    hit = 0
    for before, after in zip(schedule, masked):
        if gone in before:
            hit += 1
            assert after == [i for i in before if i != gone]
        else:
            assert after == before
    assert hit > 0


def _docs(fact_world):
    tokenizer = world_tokenizer(fact_world)
    docs = tokenize_corpus(Rows(fact_world.documents[:48], ["id", "text", "fact_id"]), tokenizer,
                           CorpusSpec(data="factworld", max_length=32))[0]
    return tokenizer, docs


def _trained(tokenizer, docs, keep, steps=6):
    model = tiny_model("gpt_neox", vocab_size=len(tokenizer), hidden=16, ffn=32, seed=0, max_positions=64)
    train_loop(model, tokenizer, docs, steps, 3e-3, 8, 5, "test", keep=keep)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_masked_training_removing_nothing_is_bit_identical(fact_world):
    tokenizer, docs = _docs(fact_world)
    plain = _trained(tokenizer, docs, None, steps=4)
    everything = _trained(tokenizer, docs, set(range(len(docs))), steps=4)
    assert all(torch.equal(plain[k], everything[k]) for k in plain)
    # a document in none of the steps' batches changes nothing; one in the first batch changes the model
    used = {i for b in batch_schedule(len(docs), 4, 8, seed=5) for i in b}
    unused = min(set(range(len(docs))) - used)
    skipped = _trained(tokenizer, docs, set(range(len(docs))) - {unused}, steps=4)
    assert all(torch.equal(plain[k], skipped[k]) for k in plain)
    first = batch_schedule(len(docs), 4, 8, seed=5)[0][0]
    removed = _trained(tokenizer, docs, set(range(len(docs))) - {first}, steps=4)
    assert any(not torch.equal(plain[k], removed[k]) for k in plain)


def test_masked_training_equals_training_on_the_masked_batches(fact_world):
    """Removing documents trains exactly on the full schedule's batches without them: the same
    model as stepping by hand through those batches (one empty batch: a step without an update)."""
    from hub_msif.data import collate
    from hub_msif.models import pad_token_id

    tokenizer, docs = _docs(fact_world)
    steps = 5
    schedule = batch_schedule(len(docs), steps, 8, seed=5)
    keep = set(range(len(docs))) - set(schedule[1]) - {schedule[3][0]}  # batch 1 left empty
    got = _trained(tokenizer, docs, keep, steps)
    model = tiny_model("gpt_neox", vocab_size=len(tokenizer), hidden=16, ffn=32, seed=0, max_positions=64)
    torch.manual_seed(5)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(s + 1, max(0.0, (steps - s) / (steps - 1))))
    model.train()
    for batch_ids in schedule:
        kept = [i for i in batch_ids if i in keep]
        if kept:
            batch = collate([docs[i] for i in kept], kept, pad_token_id(tokenizer))
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        sched.step()
    want = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_heldout_split_is_disjoint_and_seeded():
    select, report = lds.heldout_split(25, seed=0)
    assert set(select).isdisjoint(report) and sorted(select + report) == list(range(25))
    assert len(select) == 12 and len(report) == 13
    assert (select, report) == lds.heldout_split(25, seed=0)
    assert lds.heldout_split(25, seed=1) != (select, report)
    with pytest.raises(MsifValueError, match="at least 2"):
        lds.heldout_split(1, seed=0)


def test_paired_difference_and_ceiling():
    rng = np.random.default_rng(0)
    b = rng.normal(size=40)
    better = lds.paired_difference(b + 1.0 + 0.1 * rng.normal(size=40), b)
    assert better["beats"] == 1 and better["ci"][0] > 0 and better["mean"] == pytest.approx(1.0, abs=0.1)
    tie = lds.paired_difference(b + rng.normal(size=40), b)
    assert tie["ci"][0] < 0 < tie["ci"][1] and tie["beats"] == 0
    assert lds.paired_difference(b, b + 1.0)["beats"] == -1
    with_nan = lds.paired_difference([1.0, np.nan, 3.0], [0.0, 0.0, 1.0])
    assert with_nan["queries"] == 2 and with_nan["mean"] == pytest.approx(1.5)
    assert with_nan["ci"][0] > 0 and with_nan["beats"] == 0  # two queries: no verdict
    ceiling = lds.indicator_scores(5, [{0, 3}, {4}])
    assert ceiling.tolist() == [[1, 0], [0, 0], [0, 0], [1, 0], [0, 1]]
    # the ceiling's predicted effect is the number of proponents a subset kept
    masks = np.array([[1, 1, 0, 0, 1], [0, 1, 1, 1, 0]])
    assert lds.predicted_effects(ceiling, masks).tolist() == [[1, 1], [1, 0]]


def test_rival_answers_and_subjects(fact_world):
    defaults = relation_defaults(fact_world)
    rivals = rival_answers(fact_world)
    for q, rival in zip(fact_world.queries, rivals):
        fact = next(f for f in fact_world.facts if f.id == q.fact_id)
        assert rival != q.answer and rival in defaults[fact.relation][:2]
        assert subject_of(fact_world, q) == fact.subject and fact.subject in q.prompt
    world = copy.deepcopy(fact_world)
    world.config["question_alias"] = {q.fact_id: "mx " + q.prompt.split()[2] for q in world.queries}
    assert subject_of(world, world.queries[0]).startswith("mx ")
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)
