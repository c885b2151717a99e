"""Multi-stage attribution end to end: a model pair, its factors, candidates, ranked results.

``Attributor`` loads the pair artifact (both stages' factors) and the two models it records (or
the ones given), checks that they match, and scores candidate documents for a prompt and answer
with any method (MS-IF by default, SS-IF, GDP, RepSim, BM25). Candidates come from a
``DocumentIndex`` (the k nearest documents to the query text) or are given directly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import baselines
from .data import DEFAULT_TEMPLATE
from .hub import resolve_factors
from .models import generate_answer, load_model, pad_token_id
from .scoring import GRADIENT_METHODS, layer_of, per_example_gradients, precondition_queries, score_candidates
from .storage import FactorError, check_stage_pair, load_stage, read_manifest

logger = logging.getLogger(__name__)
METHODS = ("ms-if", "ss-if", "gdp", "repsim", "bm25")
DEFAULT_DAMPING = 0.1  # relative: 0.1 x mean(Lambda) per module, as in Grosse et al.


@dataclass
class Attribution:
    """One query's ranked candidates.

    Each row: ``rank``, ``id``, ``text``, ``score`` (raw), ``relative_score`` (score over the
    largest absolute score among the candidates: +1 strongest support, -1 strongest opposition),
    and for gradient methods ``by_module``, ``by_layer`` and ``by_role`` (which sum to ``score``).
    """

    prompt: str
    answer: str
    answer_generated: bool
    method: str
    modules: str
    damping: float | None
    relative_damping: bool
    num_candidates: int
    rows: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class Attributor:
    """A model pair with its factors, ready to attribute answers to pre-training documents.

    ``factors``: a pair factor folder (``msif.json`` with ``pretrained`` and ``finetuned``
    stages), or ``REPO[@REV]`` of published factors, pulled into the Hugging Face cache (only
    the ``modules`` needed; a folder that exists wins). ``pretrained`` / ``finetuned``: model ids
    or folders; by default the ones the manifest records, at the recorded revision.
    ``modules``: ``all`` or ``mlp``. ``token``: for pulling private factors.
    """

    def __init__(self, factors: str | Path, pretrained: str | None = None, finetuned: str | None = None,
                 modules: str = "all", allow_revision_mismatch: bool = False, dtype=None, token: str | None = None):
        if modules not in ("all", "mlp"):
            raise ValueError(f"modules must be 'all' or 'mlp', not {modules!r}")
        self.modules = modules
        self.location = str(factors)
        factors = resolve_factors(factors, modules=modules, token=token)
        manifest = read_manifest(factors)
        check_stage_pair(manifest, modules)
        self.factors = {stage: load_stage(factors, stage, modules) for stage in ("pretrained", "finetuned")}
        if not self.factors["pretrained"].modules:
            raise FactorError(f"the factors in {factors} have no {modules} modules")
        self.models, self.refs = {}, {}
        tokenizer = None
        for stage, given in (("pretrained", pretrained), ("finetuned", finetuned)):
            recorded = self.factors[stage].info["model"]
            # The recorded Hub model is loaded at the recorded commit, not whatever main is now.
            pinned = recorded.get("revision") if given is None and _is_commit(recorded.get("revision")) else None
            model, tok, ref = load_model(given or recorded["id"], pinned, dtype)
            self.factors[stage].check_model(model, ref.revision, allow_revision_mismatch, model_id=ref.id)
            self.models[stage], self.refs[stage] = model, ref
            tokenizer = tokenizer or tok
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        data = self.factors["finetuned"].info.get("data", {})
        self.template = (data.get("template") if data.get("prompt_column") else None) or DEFAULT_TEMPLATE
        self.specs = self.factors["pretrained"].specs
        self.max_length = getattr(self.models["finetuned"].config, "max_position_embeddings", None) or 2048

    # -- inputs ---------------------------------------------------------------------------------
    def prompt_text(self, prompt: str) -> str:
        return self.template.format(prompt=prompt)

    def query_sequence(self, prompt: str, answer: str) -> dict:
        """Prompt and answer tokenized as in fine-tuning; only answer tokens carry loss."""
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty")
        if not answer or not answer.strip():
            raise ValueError("the answer is empty")
        prompt_ids = self.tokenizer(self.prompt_text(prompt), add_special_tokens=True)["input_ids"]
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(answer_ids) > self.max_length:
            raise ValueError(
                f"prompt and answer are {len(prompt_ids) + len(answer_ids)} tokens, more than the model's "
                f"maximum of {self.max_length}; shorten the prompt"
            )
        return {"input_ids": prompt_ids + answer_ids, "labels": [-100] * len(prompt_ids) + answer_ids}

    def document_sequence(self, text: str) -> dict:
        """A candidate document; longer documents are cut to the model's maximum length."""
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"][: self.max_length]
        if len(ids) < 2:
            ids = ids + [self.tokenizer.eos_token_id or self.pad_id]
        return {"input_ids": ids, "labels": list(ids)}

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        """The fine-tuned model's greedy answer to ``prompt``."""
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty")
        text = self.prompt_text(prompt)
        room = self.max_length - len(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if room < 1:  # models with learned positions (GPT-2) fail with an IndexError past the maximum
            raise ValueError(
                f"the prompt is {self.max_length - room} tokens, leaving no room for an answer within the "
                f"model's maximum of {self.max_length}; shorten the prompt"
            )
        return generate_answer(self.models["finetuned"], self.tokenizer, text, min(max_new_tokens, room))

    # -- scores ---------------------------------------------------------------------------------
    def query_weights(self, queries: Sequence[tuple[str, str]], method: str, damping: float,
                      relative: bool = True) -> dict[str, torch.Tensor]:
        """``W_q`` per module for (prompt, answer) pairs: each query preconditioned once."""
        sequences = [self.query_sequence(p, a) for p, a in queries]
        grads = per_example_gradients(self.models["finetuned"], self.specs, sequences, self.pad_id)
        return precondition_queries(grads, method, self.factors["finetuned"], self.factors["pretrained"],
                                    damping, relative)

    def score(self, queries: Sequence[tuple[str, str]], documents: Sequence[str], method: str = "ms-if",
              damping: float = DEFAULT_DAMPING, relative: bool = True, batch_size: int = 8,
              show_progress: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Scores ``[C, Q]`` of ``documents`` for (prompt, answer) ``queries``, and for gradient
        methods the per-module scores ``{name: [C, Q]}``."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        if not documents:
            raise ValueError("no candidate documents to score (zero candidates)")
        if not queries:
            raise ValueError("no queries")
        if method == "bm25":
            columns = [baselines.bm25_scores(f"{p} {a}", documents) for p, a in queries]
            return torch.tensor(columns, dtype=torch.float64).t(), None
        candidates = [self.document_sequence(t) for t in documents]
        if method == "repsim":
            q = baselines.mean_hidden_states(self.models["finetuned"], [self.query_sequence(p, a) for p, a in queries], self.pad_id)
            c = baselines.mean_hidden_states(self.models["pretrained"], candidates, self.pad_id)
            return baselines.repsim_scores(q, c), None
        weights = self.query_weights(queries, method, damping, relative)
        model = self.models["finetuned" if method == "ss-if" else "pretrained"]
        result = score_candidates(model, self.specs, weights, candidates, self.pad_id, batch_size,
                                  show_progress=show_progress)
        return result.total, result.per_module

    def attribute(self, prompt: str, answer: str | None = None, documents: Sequence[dict] | None = None,
                  index=None, candidates: int = 100, top: int = 10, method: str = "ms-if",
                  damping: float = DEFAULT_DAMPING, relative: bool = True, show_progress: bool = False) -> Attribution:
        """Ranks candidate documents for one prompt (and answer; generated greedily when None).

        Candidates are ``documents`` (dicts with ``id`` and ``text``) or the ``candidates``
        nearest documents of ``index`` to the prompt and answer text.
        """
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty")
        if candidates < 1:
            raise ValueError(f"the number of candidates must be at least 1, got {candidates}")
        if top < 1:
            raise ValueError(f"top must be at least 1, got {top}")
        generated = answer is None or not answer.strip()
        if generated:
            answer = self.generate(prompt)
            if not answer:
                raise ValueError("the fine-tuned model generated an empty answer; give one with --answer")
        self.query_sequence(prompt, answer)  # validates length before any retrieval work
        if documents is None:
            if index is None:
                raise ValueError("give candidate documents or an index to retrieve them from")
            hits = index.search([f"{prompt} {answer}"], candidates)[0]
            documents = [index.documents[i] for i, _ in hits]
        if not documents:
            raise ValueError("no candidate documents to score (zero candidates)")
        total, per_module = self.score([(prompt, answer)], [d["text"] for d in documents], method, damping,
                                       relative, show_progress=show_progress)
        scores = total[:, 0]
        order = torch.argsort(scores, descending=True)[:top]
        scale = float(scores.abs().max()) or 1.0
        rows = []
        for rank, i in enumerate(order.tolist(), start=1):
            row = {"rank": rank, "id": str(documents[i]["id"]), "text": documents[i]["text"],
                   "score": float(scores[i]), "relative_score": float(scores[i]) / scale}
            if per_module is not None:
                by_module = {name: float(v[i, 0]) for name, v in per_module.items()}
                row["by_module"] = by_module
                row["by_layer"], row["by_role"] = _breakdown(by_module, self.specs)
            rows.append(row)
        return Attribution(prompt, answer, generated, method, self.modules,
                           damping if method in GRADIENT_METHODS else None, relative, len(documents), rows)


def _is_commit(revision) -> bool:
    return isinstance(revision, str) and len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)


def _breakdown(by_module: dict[str, float], specs) -> tuple[dict[str, float], dict[str, float]]:
    """Per-layer and per-role (``mlp`` vs ``attention``) sums of per-module scores."""
    roles = {s.name: ("mlp" if s.role == "mlp" else "attention") for s in specs}
    by_layer: dict[str, float] = {}
    by_role: dict[str, float] = {"mlp": 0.0, "attention": 0.0}
    for name, value in by_module.items():
        layer = layer_of(name)
        key = str(layer) if layer is not None else "other"
        by_layer[key] = by_layer.get(key, 0.0) + value
        by_role[roles[name]] += value
    return by_layer, by_role
