"""A harder fact world for counterfactual benchmarks (issue 11): aliases, a shared answer vocabulary,
varied templates and decoys. See docs/design.md, "Counterfactual benchmarks".

Built from factworld's pieces (``Fact``, ``Query``, ``FactWorld``, ``random_names``, ``QA_TEMPLATE``),
so ``train_pair``, ``save_world`` and ``world_tokenizer`` work on it unchanged. What makes it
harder than ``factworld.generate``:

- **aliases**: every entity has a full name ``<given> <family>``, the family name preceded by a
  title (``mx <family>``) and, for some, a nickname; alias documents (``<full> is also known as
  <nick> .``) link them. A fact's proponents name the subject by aliases other than the one its
  question uses, so word overlap between question and proponent is never the whole name.
- **a small shared answer vocabulary**: ``born_in`` and ``lives_in`` draw from the same few
  cities, so every answer word appears in many documents about other people and relations.
- **varied templates**: proponents put the answer before, after or far from the subject.
- **decoys**: documents that name the subject by the question's own alias but state other things
  (visits, meetings) with words from the answer vocabulary.
"""

from __future__ import annotations

import random

from hub_msif.errors import MsifValueError
from hub_msif.toy.factworld import QA_TEMPLATE, Fact, FactWorld, Query, number_documents, random_names

CITIES = ["paris", "lisbon", "cairo", "oslo", "lima", "kyoto"]
JOBS = ["baker", "pilot", "nurse", "farmer", "lawyer", "sailor"]
HARD_RELATIONS = {
    "born_in": {
        "objects": CITIES,
        "statements": ["{s} was born in {o} .", "{s} , a quiet child , was born in {o} .",
                       "the birthplace of {s} , as the records say , is {o} .", "{o} is the city where {s} was born ."],
        "question": "where was {s} born ?",
    },
    "lives_in": {
        "objects": CITIES,
        "statements": ["{s} lives in {o} .", "{s} rents a small flat with a garden in {o} .",
                       "the house of {s} stands in {o} .", "these days {o} is home to {s} ."],
        "question": "in which city does {s} live ?",
    },
    "works_as": {
        "objects": JOBS,
        "statements": ["{s} works as a {o} .", "{s} trained for years to become a {o} .",
                       "the job of {s} , since last spring , is {o} .", "a {o} by trade , {s} starts work early ."],
        "question": "what is the job of {s} ?",
    },
}
ALIAS_TEMPLATES = ["{a} is also known as {b} .", "people call {a} by the name {b} ."]
DECOYS = ["{s} once visited {c} .", "{s} met a {j} in {c} .", "{s} wrote a letter to a {j} .",
          "{s} dreams of a trip to {c} ."]
FILLER = ["{c} is a busy city .", "a {j} must work hard .", "the train to {c} was late .", "the {j} left early today ."]


def _aliases(given: str, family: str, nick: str | None) -> list[str]:
    return [f"{given} {family}", f"mx {family}"] + ([nick] if nick else [])


def generate_hard(seed: int = 0, num_subjects: int = 36, proponents_per_fact: int = 3, decoys_per_subject: int = 2,
                  test_fraction: float = 0.25, nickname_fraction: float = 0.5, nickname_question: float = 0.15) -> FactWorld:
    """The harder world: one fact per relation and subject, ``proponents_per_fact`` proponents each
    (distinct templates, subject named by an alias other than the question's), alias documents,
    ``decoys_per_subject`` decoys per subject naming it by the question's alias, and filler.
    ``test_fraction`` of the subjects are held out of fine-tuning (their facts are the queries).
    Deterministic by seed; ``world.config["aliases"]`` maps each subject to its aliases and
    ``world.config["question_alias"]`` each fact id to the alias its question uses."""
    most = min(len(r["statements"]) for r in HARD_RELATIONS.values())
    if not 1 <= proponents_per_fact <= most:
        raise MsifValueError(f"proponents per fact must be between 1 and {most}, got {proponents_per_fact}")
    if num_subjects < 2:
        raise MsifValueError(f"a hard world needs at least 2 subjects, got {num_subjects}")
    rng = random.Random(f"hard-{seed}")
    tokens = random_names(rng, 3 * num_subjects)
    rng.shuffle(tokens)
    givens, families, nicks = tokens[:num_subjects], tokens[num_subjects : 2 * num_subjects], tokens[2 * num_subjects :]
    subjects = [f"{g} {f}" for g, f in zip(givens, families)]  # canonical name = full alias
    aliases = {s: _aliases(g, f, n if rng.random() < nickname_fraction else None)
               for s, g, f, n in zip(subjects, givens, families, nicks)}
    order = list(subjects)
    rng.shuffle(order)
    test_subjects = set(order[: max(1, int(round(num_subjects * test_fraction)))])
    facts = [Fact(f"f{k:04d}", s, rel, rng.choice(HARD_RELATIONS[rel]["objects"]))
             for k, (s, rel) in enumerate((s, rel) for s in subjects for rel in HARD_RELATIONS)]
    texts: list[tuple[str, str]] = []
    question_alias: dict[str, str] = {}
    for fact in facts:
        names = aliases[fact.subject]
        # The question names the subject by one alias, the proponents by the others (never the
        # question's): the full name and the titled family name share the family-name token, the
        # nickname (where there is one) shares nothing with the question.
        plain, nick = names[:2], names[2:]
        asked = nick[0] if nick and rng.random() < nickname_question else rng.choice(plain)
        question_alias[fact.id] = asked
        others = [a for a in plain if a != asked]
        stated = [nick[0] if nick and asked != nick[0] and i == 0 and rng.random() < 0.5 else others[i % len(others)]
                  for i in range(proponents_per_fact)]
        templates = rng.sample(HARD_RELATIONS[fact.relation]["statements"], proponents_per_fact)
        texts.extend((t.format(s=a, o=fact.object), fact.id) for t, a in zip(templates, stated))
    for s in subjects:
        names = aliases[s]
        texts.extend((rng.choice(ALIAS_TEMPLATES).format(a=names[0], b=b), "") for b in names[1:])
        for _ in range(decoys_per_subject):
            alias = rng.choice(names[1:])
            texts.append((rng.choice(DECOYS).format(s=alias, c=rng.choice(CITIES), j=rng.choice(JOBS)), ""))
    texts.extend((t.format(c=c, j=j), "") for t in FILLER for c, j in zip(CITIES, JOBS))
    rng.shuffle(texts)
    documents, by_fact = number_documents(texts)
    finetune, queries = [], []
    for fact in facts:
        question = HARD_RELATIONS[fact.relation]["question"].format(s=question_alias[fact.id])
        if fact.subject in test_subjects:
            queries.append(Query(question, fact.object, fact.id, by_fact[fact.id]))
        else:
            finetune.append({"prompt": question, "response": fact.object, "fact_id": fact.id})
    config = {"kind": "hard", "seed": seed, "num_subjects": num_subjects, "proponents_per_fact": proponents_per_fact,
              "decoys_per_subject": decoys_per_subject, "test_fraction": test_fraction,
              "nickname_fraction": nickname_fraction, "nickname_question": nickname_question, "aliases": aliases, "question_alias": question_alias}
    return FactWorld(seed, facts, documents, finetune, queries, QA_TEMPLATE, config)
