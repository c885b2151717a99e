"""A toy fact world: entities, relations, a pre-training corpus, fine-tuning Q&A, test queries.

Deterministic by seed. Each fact (subject, relation, object) is stated in the pre-training corpus
by a few documents, its *proponents*, each with a different paraphrase, among distractor
documents (some mention the same objects). Fine-tuning teaches the question-answer format on one
set of facts; the test queries ask about the other facts, which the model can only know from
pre-training. ``train_pair`` trains a real tiny GPT-NeoX on this and saves the pre-trained and
fine-tuned models with ``save_pretrained``, so they load like any Hub model from a folder.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypedDict

import torch

from hub_msif.errors import MsifValueError

logger = logging.getLogger(__name__)

QA_TEMPLATE = "question : {prompt} answer :"


class Relation(TypedDict):
    objects: list[str]
    statements: list[str]  # templates over {s} (subject) and {o} (object)
    question: str  # a template over {s}


RELATIONS: dict[str, Relation] = {
    "born_in": {
        "objects": ["paris", "lisbon", "cairo", "oslo", "lima", "kyoto", "dublin", "nairobi", "quito", "hanoi"],
        "statements": ["{s} was born in {o} .", "the birthplace of {s} is {o} .", "{s} came into the world in {o} .",
                       "in {o} , {s} was born ."],
        "question": "where was {s} born ?",
    },
    "works_as": {
        "objects": ["baker", "pilot", "nurse", "farmer", "lawyer", "painter", "sailor", "tailor", "dentist", "miner"],
        "statements": ["{s} works as a {o} .", "by profession {s} is a {o} .", "{s} earns a living as a {o} .",
                       "the job of {s} is {o} ."],
        "question": "what is the job of {s} ?",
    },
    "plays": {
        "objects": ["piano", "violin", "flute", "drums", "guitar", "harp", "cello", "trumpet", "banjo", "oboe"],
        "statements": ["{s} plays the {o} .", "the instrument of {s} is the {o} .", "{s} often practises the {o} .",
                       "on weekends {s} plays the {o} ."],
        "question": "which instrument does {s} play ?",
    },
}
DISTRACTORS = [
    "{s} walked to the market on {d} .", "{s} read a long letter on {d} .", "{s} met a friend on {d} .",
    "{s} cooked soup for dinner on {d} .",
]
OBJECT_DISTRACTORS = {
    "born_in": ["{o} is a busy city .", "many tourists visit {o} in summer ."],
    "works_as": ["a {o} must work hard .", "the {o} left early today ."],
    "plays": ["the {o} is hard to learn .", "a new {o} can be expensive ."],
}
DAYS = ["monday", "tuesday", "wednesday", "thursday", "friday"]


@dataclass
class Fact:
    id: str
    subject: str
    relation: str
    object: str


@dataclass
class Query:
    """A test question about a fact seen only in pre-training, with its proponent document ids."""

    prompt: str
    answer: str
    fact_id: str
    proponents: list[str]


@dataclass
class FactWorld:
    seed: int
    facts: list[Fact]
    documents: list[dict]  # {"id", "text", "fact_id" (or "")}
    finetune: list[dict]  # {"prompt", "response", "fact_id"}
    queries: list[Query]
    template: str = QA_TEMPLATE
    config: dict = field(default_factory=dict)

    def proponents(self, fact_id: str) -> list[str]:
        return [d["id"] for d in self.documents if d["fact_id"] == fact_id]


def random_names(rng: random.Random, n: int) -> list[str]:
    onsets, vowels, codas = "bdfgklmnprstvz", "aeiou", ["", "n", "r", "l", "s"]
    names: set[str] = set()
    while len(names) < n:
        syllables = rng.randint(2, 3)
        names.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)) + rng.choice(codas))
    return sorted(names)


def number_documents(texts: list[tuple[str, str]]) -> tuple[list[dict], dict[str, list[str]]]:
    """Documents ``doc-00000``, ... from shuffled ``(text, fact id or "")`` pairs, and each fact's
    proponent document ids."""
    documents = [{"id": f"doc-{i:05d}", "text": text, "fact_id": fid} for i, (text, fid) in enumerate(texts)]
    by_fact: dict[str, list[str]] = {}
    for d in documents:
        if d["fact_id"]:
            by_fact.setdefault(d["fact_id"], []).append(d["id"])
    return documents, by_fact


def generate(seed: int = 0, num_subjects: int = 60, proponents_per_fact: int = 3, distractors_per_subject: int = 2,
             test_fraction: float = 0.25) -> FactWorld:
    """Builds the world: every subject has one fact per relation, stated by ``proponents_per_fact``
    documents with distinct paraphrases. A ``test_fraction`` of subjects is held out of fine-tuning;
    their facts become the test queries."""
    if proponents_per_fact > min(len(r["statements"]) for r in RELATIONS.values()):
        raise MsifValueError(f"at most {min(len(r['statements']) for r in RELATIONS.values())} proponents per fact")
    rng = random.Random(seed)
    subjects = random_names(rng, num_subjects)
    rng.shuffle(subjects)
    test_subjects = set(subjects[: max(1, int(round(num_subjects * test_fraction)))])
    pairs = [(s, rel) for s in subjects for rel in RELATIONS]
    facts = [Fact(f"f{k:04d}", s, rel, rng.choice(RELATIONS[rel]["objects"])) for k, (s, rel) in enumerate(pairs)]
    texts: list[tuple[str, str]] = []
    for fact in facts:
        templates = rng.sample(RELATIONS[fact.relation]["statements"], proponents_per_fact)
        texts.extend((t.format(s=fact.subject, o=fact.object), fact.id) for t in templates)
    for s in subjects:
        texts.extend((rng.choice(DISTRACTORS).format(s=s, d=rng.choice(DAYS)), "") for _ in range(distractors_per_subject))
    for rel, templates in OBJECT_DISTRACTORS.items():
        texts.extend((t.format(o=o), "") for o in RELATIONS[rel]["objects"] for t in templates)
    rng.shuffle(texts)
    documents, by_fact = number_documents(texts)
    finetune, queries = [], []
    for fact in facts:
        question = RELATIONS[fact.relation]["question"].format(s=fact.subject)
        if fact.subject in test_subjects:
            queries.append(Query(question, fact.object, fact.id, by_fact[fact.id]))
        else:
            finetune.append({"prompt": question, "response": fact.object, "fact_id": fact.id})
    config = {"seed": seed, "num_subjects": num_subjects, "proponents_per_fact": proponents_per_fact,
              "distractors_per_subject": distractors_per_subject, "test_fraction": test_fraction}
    return FactWorld(seed, facts, documents, finetune, queries, QA_TEMPLATE, config)


def save_world(world: FactWorld, folder: str | Path) -> dict[str, Path]:
    """Writes ``pretrain.jsonl`` (id, text, fact_id), ``finetune.jsonl`` (prompt, response),
    ``queries.jsonl`` and ``world.json``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.jsonl" for name in ("pretrain", "finetune", "queries")}
    rows = {"pretrain": world.documents, "finetune": world.finetune, "queries": [asdict(q) for q in world.queries]}
    for name, path in paths.items():
        path.write_text("".join(json.dumps(r) + "\n" for r in rows[name]))
    paths["world"] = folder / "world.json"
    paths["world"].write_text(json.dumps({"config": world.config, "template": world.template,
                                          "facts": [asdict(f) for f in world.facts]}, indent=1))
    return paths


def world_tokenizer(world: FactWorld):
    from hub_msif.toy.examples import word_tokenizer

    texts = [d["text"] for d in world.documents]
    texts += [world.template.format(prompt=r["prompt"]) + " " + r["response"] for r in world.finetune]
    texts += [world.template.format(prompt=q.prompt) + " " + q.answer for q in world.queries]
    return word_tokenizer(texts)


def batch_schedule(num_items: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """The ``steps`` batches of item indices that training on ``num_items`` items draws: each epoch a
    seeded shuffle cut into full batches (the last partial batch of an epoch is dropped)."""
    if num_items < 1 or batch_size < 1 or steps < 0:
        raise MsifValueError(f"a batch schedule needs items and a batch size >= 1, got {num_items} and {batch_size}")
    batch_size = min(batch_size, num_items)
    rng = random.Random(seed)
    schedule: list[list[int]] = []
    while len(schedule) < steps:
        order = list(range(num_items))
        rng.shuffle(order)
        schedule.extend(order[i : i + batch_size] for i in range(0, num_items - batch_size + 1, batch_size))
    return schedule[:steps]


def masked_schedule(schedule: list[list[int]], keep: set[int] | None) -> list[list[int]]:
    """The same schedule with every item outside ``keep`` dropped from its batches (None keeps all):
    removing a document changes only the batches it was in, never the order or the others
    (docs/design.md, "Counterfactual benchmarks")."""
    return [list(b) for b in schedule] if keep is None else [[i for i in b if i in keep] for b in schedule]


def train_loop(model, tokenizer, sequences: list[dict], steps: int, lr: float, batch_size: int, seed: int, desc: str,
               keep: set[int] | None = None) -> None:
    """AdamW with linear warm-up and decay on tokenized ``{"input_ids", "labels"}`` sequences, along
    ``batch_schedule`` over all of them; with ``keep``, the sequences outside it are masked out of
    their batches (a batch left empty is a step without an update, so the learning-rate schedule
    stays aligned with the full run's)."""
    from tqdm.auto import tqdm

    from hub_msif.data import collate
    from hub_msif.models import pad_token_id

    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))
    )
    model.train()
    pad = pad_token_id(tokenizer)
    batches = masked_schedule(batch_schedule(len(sequences), steps, batch_size, seed), keep)
    for indices in tqdm(batches, desc=desc, leave=False, disable=None):  # None: shown on a terminal only
        if indices:
            batch = collate([sequences[i] for i in indices], indices, pad)
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        schedule.step()
    model.eval()


def qa_sequences(tokenizer, rows: list[dict], template: str = QA_TEMPLATE) -> list[dict]:
    """Tokenized Q&A pairs with loss on the answer (and end-of-sequence) tokens only."""
    from hub_msif.data import CorpusSpec, tokenize_corpus

    spec = CorpusSpec(data="factworld", prompt_column="prompt", response_column="response", template=template, max_length=64)
    return tokenize_corpus(Rows(rows, ["prompt", "response"]), tokenizer, spec)[0]


class Rows(list):
    """A list of dict rows with ``column_names``, enough for ``tokenize_corpus``."""

    def __init__(self, rows, columns):
        super().__init__(rows)
        self.column_names = columns


def train_pair(world: FactWorld, folder: str | Path, hidden: int = 128, layers: int = 2, heads: int = 4,
               pretrain_steps: int = 2500, finetune_steps: int = 300, seed: int = 0) -> dict:
    """Trains the pre-trained and fine-tuned models; saves them to ``folder/pretrained`` and
    ``folder/finetuned``; returns paths and the test-query accuracy of the fine-tuned model."""
    from hub_msif.data import CorpusSpec, tokenize_corpus
    from hub_msif.models import generate_answer
    from hub_msif.toy.examples import tiny_model

    folder = Path(folder)
    tokenizer = world_tokenizer(world)
    model = tiny_model("gpt_neox", vocab_size=len(tokenizer), hidden=hidden, layers=layers, heads=heads,
                       ffn=4 * hidden, seed=seed, max_positions=64)
    docs = tokenize_corpus(Rows(world.documents, ["id", "text", "fact_id"]), tokenizer,
                           CorpusSpec(data="factworld", max_length=64))[0]
    train_loop(model, tokenizer, docs, pretrain_steps, 3e-3, 32, seed, "pre-training")
    paths = {"pretrained": folder / "pretrained", "finetuned": folder / "finetuned"}
    model.save_pretrained(paths["pretrained"])
    tokenizer.save_pretrained(paths["pretrained"])
    train_loop(model, tokenizer, qa_sequences(tokenizer, world.finetune, world.template), finetune_steps, 1e-3, 32,
           seed + 1, "fine-tuning")
    model.save_pretrained(paths["finetuned"])
    tokenizer.save_pretrained(paths["finetuned"])

    def answer(prompt: str) -> str:
        return generate_answer(model, tokenizer, world.template.format(prompt=prompt), max_new_tokens=4)

    correct = sum(answer(q.prompt) == q.answer for q in world.queries)
    train_correct = sum(answer(r["prompt"]) == r["response"] for r in world.finetune)
    return {**paths, "test_accuracy": correct / len(world.queries), "finetune_accuracy": train_correct / len(world.finetune)}
