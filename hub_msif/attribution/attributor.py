"""Multi-stage attribution end to end: a model pair, its factors, candidates, ranked results.

``Attributor`` is the one attribution flow; the CLI, the Space and the benchmarks only present
its results. It loads the pair artifact (both stages' factors) and the two models the manifest
records (or the ones given), checks that they match, retrieves candidates from a
``DocumentIndex`` (``candidates``), and scores them with any mix of methods and dampings
(``compare``; ``attribute`` for one): one gradient pass over the query under the fine-tuned model
and one pass over the candidates per model, however many methods and dampings are asked for.
See docs/design.md, "Scores and their sign".
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hub_msif.artifacts.manifest import FACTORS, STAGES, check_same_modules, read_manifest, stage_info
from hub_msif.attribution import baselines
from hub_msif.attribution.checks import (
    DEFAULT_DAMPING,
    METHODS,
    check_candidates,
    check_damping,
    check_dampings,
    check_methods,
    check_prompt,
    check_top,
)
from hub_msif.attribution.contrast import check_contrast, find_subject, neutral_token, replace_subject, subject_for
from hub_msif.attribution.device import model_dtype as to_model_dtype
from hub_msif.attribution.device import resolve_device
from hub_msif.attribution.refine import DEFAULT_CURVATURE_SEQUENCES, GGNProduct, curvature_sequences, refine_queries
from hub_msif.attribution.results import Attribution, TokenShare, make_row
from hub_msif.attribution.scoring import (
    GRADIENT_METHODS,
    LowRankQueries,
    check_rank,
    per_example_gradients,
    precondition_queries,
    score_candidates,
    stack_queries,
)
from hub_msif.attribution.stage_one import (
    StageOne,
    choose_source,
    index_projection,
    query_vectors,
    recorded_check,
    union,
)
from hub_msif.data import DEFAULT_TEMPLATE, collate
from hub_msif.errors import FactorError, MsifValueError
from hub_msif.factors.objectives import shifted_targets
from hub_msif.factors.storage import StageFactors, load_stage
from hub_msif.hub.location import stage_locations
from hub_msif.hub.pull import pull_factors
from hub_msif.models import generate_answer, load_model, pad_token_id, recorded_model, resolve_adapter

logger = logging.getLogger(__name__)
# METHODS (ms-if, ss-if, gdp, repsim, bm25) is defined with the checks (hub_msif.attribution.checks).
DAMPED_METHODS = ("ms-if", "ss-if")
# Which model's gradients (or hidden states) each method takes of the candidates.
CANDIDATE_STAGE = {"ms-if": "pretrained", "gdp": "pretrained", "repsim": "pretrained", "ss-if": "finetuned"}


@dataclass
class MethodScores:
    """Scores ``[C, Q]`` of C candidates for Q queries under one method and damping, with the
    per-module scores ``{name: [C, Q]}`` and per-token shares ``[T_c, Q]`` where they exist."""

    method: str
    damping: float | None
    total: torch.Tensor
    per_module: dict[str, torch.Tensor] | None = None
    tokens: list[torch.Tensor] | None = None


class Attributor:
    """A model pair with its factors, ready to attribute answers to pre-training documents.

    ``factors``: a pair factor folder (``msif.json`` with ``pretrained`` and ``finetuned``
    stages), or ``REPO[@REV]`` of published factors, pulled into the Hugging Face cache (only
    the ``modules`` needed; a folder that exists wins). ``factors_pretrained`` /
    ``factors_finetuned``: one stage's location each (a folder or ``REPO[@REV]`` holding that stage,
    alone or in a pair), so that a published pre-trained stage serves any fine-tune of its base; each
    replaces that stage of ``factors``. ``pretrained`` / ``finetuned``: model ids or folders; by
    default the ones the manifests record (a Hub model at the recorded commit; a local folder found by
    the sha256 of its weights, or through ``model_paths`` ``{recorded name: folder}``). A stage
    fitted for another model or revision than the one given is refused before any factor file or
    weights load (``allow_revision_mismatch`` warns instead).
    ``modules``: ``all`` or ``mlp``. ``token``: for pulling private factors. ``index``: the
    ``DocumentIndex`` that ``candidates`` searches when none is passed to it. ``gradindex``: a
    ``GradientIndex`` (or its location, a folder or ``REPO[@REV]``, loaded here) of the pre-trained
    stage, searched over the whole corpus for candidates (``candidates_from``; docs/design.md,
    "Gradient index"); one built for another model or stage is refused here.
    ``query_rank``: keep each module's preconditioned query as a rank-r factorization (None: full
    rank, the default; docs/design.md, "Low-rank queries"). ``normalize``: gradient-method scores
    are cosines ``<W_q, G_c> / (||W_q|| ||G_c||)`` ("Unit-normalised scores"). ``base_model``: the
    base of a PEFT adapter given (or recorded) as the fine-tuned model, instead of the one its
    adapter config names. ``refine_steps`` (default 0: plain EK-FAC; not with ``query_rank``) refines MS-IF and SS-IF query iHVPs by that many CG steps on exact
    GGN products over each stage's curvature sample: ``curvature_data`` ``{stage: file(s) or
    token sequences}``, by default the stage's recorded local data file, at most
    ``curvature_size`` sequences (docs/design.md, "Refined queries").
    ``device``: ``auto`` (CUDA when there is one, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``:
    both models and both stages' factors are put there once; query and candidate gradients and
    their products stay there, scores come back to the CPU. ``model_dtype``: ``bfloat16``,
    ``float16`` or ``float32`` for both models' forward and backward (None: as loaded); gradients
    and preconditioning stay float32 (docs/design.md, "Device and attribution plan").
    ``damping_pretrained`` / ``damping_finetuned``: each stage's damping (relative or absolute as
    the call's), replacing the damping a scoring call gives for that stage (MS-IF damps both, SS-IF
    the fine-tuned one; docs/design.md, "Per-stage damping"). ``contrast="subject"``: gradient
    methods score the answer's gradient minus that with the prompt's subject replaced by a neutral
    token; ``subject`` gives the subject's text (one string, or a mapping prompt -> subject), else
    it is found from each prompt (docs/design.md, "Contrastive queries").
    """

    def __init__(self, factors: str | Path | None = None, pretrained: str | None = None,
                 finetuned: str | None = None, modules: str = "all", allow_revision_mismatch: bool = False,
                 dtype=None, token: str | None = None, index=None, query_rank: int | None = None,
                 normalize: bool = False, base_model: str | None = None, refine_steps: int = 0,
                 curvature_data: Mapping | None = None, curvature_size: int = DEFAULT_CURVATURE_SEQUENCES,
                 factors_pretrained: str | Path | None = None, factors_finetuned: str | Path | None = None,
                 model_paths: Mapping[str, str] | None = None, device: str = "auto", model_dtype: str | None = None,
                 gradindex=None, damping_pretrained: float | None = None, damping_finetuned: float | None = None,
                 contrast: str | None = None, subject: str | Mapping[str, str] | None = None):
        if modules not in ("all", "mlp"):
            raise MsifValueError(f"modules must be 'all' or 'mlp', not {modules!r}")
        self.query_rank = check_rank(query_rank) if query_rank is not None else None
        if self.query_rank is not None and refine_steps:
            raise MsifValueError("refined queries are kept dense: use query_rank or refine_steps, not both")
        self.normalize = bool(normalize)
        self.damping_pretrained = None if damping_pretrained is None else check_dampings([damping_pretrained])[0]
        self.damping_finetuned = None if damping_finetuned is None else check_dampings([damping_finetuned])[0]
        if refine_steps and (damping_pretrained is not None or damping_finetuned is not None):
            raise MsifValueError("refined queries take one damping: give refine_steps or per-stage dampings, not both")
        self.contrast, self.subject = check_contrast(contrast), subject
        if subject is not None and contrast is None:
            raise MsifValueError("a subject is given for a contrastive query, but no contrast is asked for")
        self.modules = modules
        self.locations = stage_locations(factors, factors_pretrained, factors_finetuned)
        self.index = index
        folders, infos = {}, {}
        for stage, location in self.locations.items():  # manifests only, so far
            folders[stage] = pull_factors(location, modules=modules, stages=[stage], token=token)
            infos[stage] = stage_info(read_manifest(folders[stage], FACTORS), stage, location)
        check_same_modules(infos, modules)
        places, refs = {}, {}
        for stage, given in (("pretrained", pretrained), ("finetuned", finetuned)):
            recorded = infos[stage]["model"]
            base, base_pinned = _base_model(recorded, given, base_model if stage == "finetuned" else None,
                                            model_paths)
            where, pinned = (given, None) if given is not None else recorded_model(recorded, f"{stage} model",
                                                                                      model_paths)
            refs[stage] = resolve_adapter(where, pinned, base, base_pinned)[2]
            _check_recorded(stage, self.locations[stage], recorded, refs[stage], allow_revision_mismatch)
            _check_base(stage, recorded, refs[stage], allow_revision_mismatch)
            places[stage] = (where, pinned, base, base_pinned)
        self.factors = {stage: load_stage(folders[stage], stage, modules) for stage in STAGES}
        if not self.factors["pretrained"].modules:
            raise FactorError(f"the factors in {folders['pretrained']} have no {modules} modules")
        self.models, self.refs = {}, {}
        tokenizer: Any = None
        for stage in STAGES:
            where, pinned, base, base_pinned = places[stage]
            model, tok, ref = load_model(where, pinned, dtype, base, base_pinned, name=refs[stage].id)
            self.factors[stage].check_model(model, model_id=ref.id)  # shapes; revisions were checked above
            self.models[stage], self.refs[stage] = model, ref
            tokenizer = tokenizer or tok
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        data = self.factors["finetuned"].info.get("data", {})
        self.template = (data.get("template") if data.get("prompt_column") else None) or DEFAULT_TEMPLATE
        self.max_length = getattr(self.models["finetuned"].config, "max_position_embeddings", None) or 2048
        self._views: dict[tuple[str, ...], Attributor] = {}
        self._checked_indexes: set[int] = set()  # indexes whose corpus was compared with the factors'
        if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
            raise MsifValueError(f"refinement steps must be a non-negative integer, got {refine_steps!r}")
        unknown = sorted(set(curvature_data or {}) - set(STAGES))
        if unknown:
            raise MsifValueError(f"curvature data for unknown stage {unknown[0]!r}; use {' or '.join(STAGES)}")
        # Refined queries (docs/design.md, "Refined queries"): samples are loaded on first use.
        self.refine_steps, self.curvature_data, self.curvature_size = refine_steps, dict(curvature_data or {}), curvature_size
        self._curvature: dict[str, list[dict]] = {}
        self._place(device, model_dtype)
        self._root = self  # views (restrict) share it: stage one projects over every module the index covers
        self._token = token
        # id(gradient index) -> (the index, kept alive so that its id stays its own; its GradientProjection)
        self._projections: dict[int, tuple[Any, Any]] = {}
        self.gradindex = self._gradient_index(gradindex) if gradindex is not None else None

    def _place(self, device: str, model_dtype: str | None) -> None:
        """Both models (cast to ``model_dtype`` when given) and both stages' factors on ``device``
        (docs/design.md, "Device and attribution plan"). The factors move once, in their storage
        dtype; ``ModuleFactors.operands`` then finds them on the gradients' device and casts only
        where the storage dtype differs from the compute dtype (float32, float64 for float64
        models: bf16 and fp16 models' captured activations and gradients are upcast)."""
        self.device = resolve_device(device)
        dtype = to_model_dtype(model_dtype)
        for model in self.models.values():
            model.to(device=self.device, dtype=dtype)
        if self.device.type != "cpu":
            logger.info("both models and factors on %s", self.device)
            self.factors = {stage: StageFactors(f.stage, f.info, {n: m.to(device=self.device) for n, m in f.modules.items()})
                            for stage, f in self.factors.items()}

    @property
    def location(self) -> str:
        """Where the factors came from: the pair's location, or ``pretrained LOC + finetuned LOC``."""
        pretrained, finetuned = self.locations["pretrained"], self.locations["finetuned"]
        return pretrained if pretrained == finetuned else f"pretrained {pretrained} + finetuned {finetuned}"

    @property
    def specs(self):
        """The tracked modules scored (both stages track the same ones)."""
        return self.factors["pretrained"].specs

    @property
    def roles(self) -> dict[str, str]:
        """Module name -> role (``mlp``, ``attn_qkv``, ``attn_out``)."""
        return {spec.name: spec.role for spec in self.specs}

    def restrict(self, modules: str | Iterable[str]) -> Attributor:
        """The same models and factors, scoring only ``modules`` (``mlp`` or module names).

        Nothing is copied or reloaded: the view shares the loaded weights, factors and index.
        EK-FAC is block-diagonal across modules, so each module is preconditioned on its own and
        a restricted score is exactly the sum of those modules' scores in the full one.
        """
        key = ("mlp",) if modules == "mlp" else tuple(modules)
        if key not in self._views:
            keep = ({s.name for s in self.specs if s.role == "mlp"} if modules == "mlp" else set(key))
            unknown = sorted(keep - set(self.roles))
            if unknown:
                raise FactorError(f"these factors do not track module(s) {', '.join(unknown)}")
            if not keep:
                raise FactorError("these factors track no MLP modules" if modules == "mlp" else "no modules given")
            view = copy.copy(self)
            view.factors = {stage: StageFactors(f.stage, f.info, {n: m for n, m in f.modules.items() if n in keep})
                            for stage, f in self.factors.items()}
            view.modules = "mlp" if modules == "mlp" else ",".join(key)
            view._views = {}
            self._views[key] = view
        return self._views[key]

    # -- inputs ---------------------------------------------------------------------------------
    def prompt_text(self, prompt: str) -> str:
        return self.template.format(prompt=prompt)

    def query_sequence(self, prompt: str, answer: str) -> dict:
        """Prompt and answer tokenized as in fine-tuning; only answer tokens carry loss."""
        if not prompt or not prompt.strip():
            check_prompt(prompt)
        if not answer or not answer.strip():
            raise MsifValueError("the answer is empty")
        prompt_ids = self.tokenizer(self.prompt_text(prompt), add_special_tokens=True)["input_ids"]
        answer_ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if len(prompt_ids) + len(answer_ids) > self.max_length:
            raise MsifValueError(
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

    def contrast_prompt(self, prompt: str, answer: str) -> str:
        """``prompt`` with its subject (given, else found by occlusion under the fine-tuned model)
        replaced by the tokenizer's neutral token (docs/design.md, "Contrastive queries")."""
        neutral = neutral_token(self.tokenizer)
        subject = subject_for(prompt, self.subject)
        if subject is None:
            subject = find_subject(prompt, answer, neutral, self.answer_logprobs)
        return replace_subject(prompt, subject, neutral)

    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        """The fine-tuned model's greedy answer to ``prompt``."""
        check_prompt(prompt)
        text = self.prompt_text(prompt)
        room = self.max_length - len(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if room < 1:  # models with learned positions (GPT-2) fail with an IndexError past the maximum
            raise MsifValueError(
                f"the prompt is {self.max_length - room} tokens, leaving no room for an answer within the "
                f"model's maximum of {self.max_length}; shorten the prompt"
            )
        return generate_answer(self.models["finetuned"], self.tokenizer, text, min(max_new_tokens, room))

    def candidates(self, prompt: str, answer: str, k: int = 100, index=None, gradindex=None,
                   candidates_from: str | None = None, damping: float = DEFAULT_DAMPING,
                   relative: bool = True) -> list[dict]:
        """Stage one: the ``k`` documents of ``index`` (default: this attributor's) nearest to the
        prompt and answer text, or of ``gradindex`` (default: this attributor's) with the largest
        compressed MS-IF at ``damping``, or the union of both (``candidates_from``: ``embedding``,
        ``gradient``, ``both``; by default the gradient index when there is one), best first (the
        gradient index's first), as dicts with ``id`` and ``text``."""
        check_candidates(k)
        return self.stage_one(prompt, answer, k, index, gradindex, candidates_from, damping, relative)[0]

    def stage_one(self, prompt: str, answer: str, k: int, index=None, gradindex=None,
                  candidates_from: str | None = None, damping: float = DEFAULT_DAMPING,
                  relative: bool = True) -> tuple[list[dict], StageOne]:
        """``candidates`` with how they were found (``StageOne``): docs/design.md, "Gradient index"."""
        index = index if index is not None else self.index
        gradindex = self._gradient_index(gradindex)
        source = choose_source(candidates_from, index, gradindex)
        started = time.perf_counter()
        embedded: list[dict] = []
        by_gradient: list[dict] = []
        searched: dict[str, int] = {}
        if source in ("embedding", "both"):
            self._check_corpus(index)
            embedded = [index.documents[i] for i, _ in index.search([f"{prompt} {answer}"], k)[0]]
            searched["embedding"] = len(index.documents)
        if source in ("gradient", "both"):
            self._check_corpus(gradindex)
            vectors = self.gradient_query_vectors([(prompt, answer)], gradindex, damping, relative)
            by_gradient = [gradindex.documents[i] for i, _ in gradindex.search(vectors, k)[0]]
            searched["gradient"] = len(gradindex.documents)
        documents = union(by_gradient, embedded)
        return documents, StageOne(source, len(documents), searched, time.perf_counter() - started,
                                   recorded_check(gradindex) if gradindex is not None and by_gradient else None)

    def gradient_query_vectors(self, queries: Sequence[tuple[str, str]], gradindex=None,
                               damping: float = DEFAULT_DAMPING, relative: bool = True):
        """``[Q, dims]`` float32 (numpy) vectors of (prompt, answer) ``queries`` for ``gradindex``
        (default: this attributor's): each query's multi-stage vector at ``damping`` (or this
        attributor's per-stage dampings, and its contrastive query when it has one, as stage two
        scores), projected as the index's documents were; their inner products with the index's
        vectors are its scores (docs/design.md, "Gradient index")."""
        gradindex = self._gradient_index(gradindex)
        if gradindex is None:
            raise MsifValueError("no gradient index given (gradindex=, --gradindex)")
        root = self._root
        damping = check_damping(damping)
        neutral = ([self.query_sequence(self.contrast_prompt(p, a), a) for p, a in queries]
                   if self.contrast is not None else None)
        return query_vectors(root._projections[id(gradindex)][1], root.models["finetuned"], root.factors["finetuned"],
                             root.factors["pretrained"], root.pad_id, [self.query_sequence(p, a) for p, a in queries],
                             damping if self.damping_finetuned is None else self.damping_finetuned, relative,
                             damping if self.damping_pretrained is None else self.damping_pretrained, neutral)

    def _gradient_index(self, gradindex=None):
        """``gradindex`` (a ``GradientIndex`` or its location), else this attributor's, else None;
        checked once against the pre-trained stage's factors (model, stage, modules)."""
        if gradindex is None:
            gradindex = getattr(self, "gradindex", None)
        if gradindex is None:
            return None
        if isinstance(gradindex, (str, Path)):
            from hub_msif.attribution.gradient_index import GradientIndex

            gradindex = GradientIndex.load(gradindex, token=self._token)
        root = self._root
        if id(gradindex) not in root._projections:
            where = root.locations["pretrained"]
            gradindex.check_stage(root.factors["pretrained"].info, where)
            root._projections[id(gradindex)] = (gradindex, index_projection(gradindex, root.factors["pretrained"], where))
        return gradindex

    def _answered(self, prompt: str, answer: str | None) -> tuple[str, bool]:
        """``(answer, generated)``: the given answer, or the fine-tuned model's greedy one when it is
        None or blank; the query sequence is checked (length) either way."""
        generated = answer is None or not answer.strip()
        if answer is None or generated:
            answer = self.generate(prompt)
            if not answer:
                raise MsifValueError("the fine-tuned model generated an empty answer; give one with --answer")
        self.query_sequence(prompt, answer)
        return answer, generated

    def _check_corpus(self, index) -> None:
        """Warns once per index when it was built on another corpus than the pre-trained stage's
        factors were fitted on (both manifests record ``source_sha256``; older ones do not)."""
        if id(index) in self._checked_indexes:
            return
        self._checked_indexes.add(id(index))
        fitted = self.factors["pretrained"].info.get("data", {})
        corpus = (getattr(index, "metadata", None) or {}).get("corpus") or {}
        if fitted.get("source_sha256") and corpus.get("source_sha256") and \
                fitted["source_sha256"] != corpus["source_sha256"]:
            logger.warning(
                "the document index was built on another corpus (%s) than the pre-trained factors were fitted on "
                "(%s). This can be legitimate (say, an index of the whole corpus and factors fitted on a sample of "
                "it), but if the index holds other documents, their scores do not say what shaped the model.",
                corpus.get("data"), fitted.get("data"))

    # -- scores ---------------------------------------------------------------------------------
    def score_methods(self, queries: Sequence[tuple[str, str]], documents: Sequence[str],
                      methods: Sequence[str] = ("ms-if",), dampings: Sequence[float] = (DEFAULT_DAMPING,),
                      relative: bool = True, batch_size: int = 8, token_shares: bool = False,
                      show_progress: bool = False, query_batch_size: int = 8) -> list[MethodScores]:
        """Scores of ``documents`` for (prompt, answer) ``queries`` under every method, and every
        damping for the damped methods (MS-IF, SS-IF), in this order.

        One gradient pass over the queries (fine-tuned model) and at most one pass over the
        candidates per model: the preconditioned queries of all methods and dampings that score
        against the same model are stacked and scored together; RepSim's hidden states come from
        the same passes.
        """
        methods, dampings = check_methods(methods), check_dampings(dampings)
        if not documents:
            raise MsifValueError("no candidate documents to score (zero candidates)")
        if not queries:
            raise MsifValueError("no queries")
        settings = [(m, d) for m in methods for d in (dampings if m in DAMPED_METHODS else [None])]
        order, inverse = _scoring_order(documents)
        documents = [documents[i] for i in order]
        out: dict[tuple[str, float | None], MethodScores] = {}
        if "bm25" in methods:
            columns = [baselines.bm25_scores(f"{p} {a}", documents) for p, a in queries]
            out[("bm25", None)] = MethodScores("bm25", None, torch.tensor(columns, dtype=torch.float64).t())
        gradient = [(m, d) for m, d in settings if m in GRADIENT_METHODS]
        repsim = "repsim" in methods
        if gradient or repsim:
            query_sequences = [self.query_sequence(p, a) for p, a in queries]
            query_hidden: list[torch.Tensor] = []
            if gradient:
                grads = per_example_gradients(self.models["finetuned"], self.specs, query_sequences, self.pad_id,
                                              query_batch_size, representations=query_hidden if repsim else None)
                if self.contrast is not None:  # scores are linear in the query gradient
                    neutral = [self.query_sequence(self.contrast_prompt(p, a), a) for p, a in queries]
                    base = per_example_gradients(self.models["finetuned"], self.specs, neutral, self.pad_id,
                                                 query_batch_size)
                    grads = {name: g - base.pop(name) for name, g in grads.items()}
            elif repsim:
                query_hidden.append(baselines.mean_hidden_states(self.models["finetuned"], query_sequences, self.pad_id))
            candidates = [self.document_sequence(t) for t in documents]
            # Every stage's preconditioned queries first, so that the query gradients are freed before
            # the candidates are scored (docs/design.md, "Device and attribution plan").
            stacked_by_stage = {}
            for stage in STAGES:
                mine = [(m, d) for m, d in gradient if CANDIDATE_STAGE[m] == stage]
                if mine:
                    stacked_by_stage[stage] = stack_queries(  # [S*Q, ...]
                        [self._query_weights(grads, m, d if d is not None else DEFAULT_DAMPING, relative)
                         for m, d in mine])
            grads = {}  # frees the query gradients
            for stage in STAGES:
                mine = [(m, d) for m, d in gradient if CANDIDATE_STAGE[m] == stage]
                hidden_here = repsim and CANDIDATE_STAGE["repsim"] == stage
                if not mine and not hidden_here:
                    continue
                model = self.models[stage]
                candidate_hidden: torch.Tensor | None
                if not mine:
                    candidate_hidden = baselines.mean_hidden_states(model, candidates, self.pad_id)
                else:
                    stacked = stacked_by_stage.pop(stage)
                    result = score_candidates(model, self.specs, stacked, candidates, self.pad_id, batch_size,
                                              token_shares=token_shares, show_progress=show_progress,
                                              representations=hidden_here, normalize=self.normalize)
                    del stacked
                    candidate_hidden = result.representations
                    q = len(queries)
                    for i, (m, d) in enumerate(mine):
                        cols = slice(i * q, (i + 1) * q)
                        per_module = {name: v[:, cols] for name, v in result.per_module.items()}
                        total = torch.stack(list(per_module.values())).sum(0)
                        tokens = [t[:, cols] for t in result.tokens] if result.tokens is not None else None
                        out[(m, d)] = MethodScores(m, d, total, per_module, tokens)
                if hidden_here:
                    if candidate_hidden is None:
                        raise RuntimeError("the candidates were scored without their hidden states")  # never
                    scores = baselines.repsim_scores(torch.cat(query_hidden), candidate_hidden)
                    out[("repsim", None)] = MethodScores("repsim", None, scores)
        return [_reordered(out[key], inverse) for key in settings]

    def _query_weights(self, grads: dict, method: str, damping: float, relative: bool
                       ) -> dict[str, torch.Tensor] | LowRankQueries:
        """``W_q`` of ``method``: plain EK-FAC, or refined by ``refine_steps`` CG steps on the exact GGN
        of each stage's curvature sample (docs/design.md, "Refined queries")."""
        if not self.refine_steps or method == "gdp":
            finetuned = damping if self.damping_finetuned is None else self.damping_finetuned
            pretrained = damping if self.damping_pretrained is None else self.damping_pretrained
            return precondition_queries(grads, method, self.factors["finetuned"], self.factors["pretrained"],
                                        finetuned, relative, rank=self.query_rank, damping_pretrained=pretrained)
        products = {}
        for stage in ("finetuned",) + (("pretrained",) if method == "ms-if" else ()):
            if stage not in self._curvature:
                self._curvature[stage] = curvature_sequences(self.factors[stage], self.tokenizer,
                                                             self.curvature_data.get(stage), self.curvature_size)
            products[stage] = GGNProduct(self.models[stage], self.specs, self._curvature[stage], self.pad_id)
        return refine_queries(grads, method, self.factors["finetuned"], self.factors["pretrained"], damping,
                              relative, self.refine_steps, products)

    def score(self, queries: Sequence[tuple[str, str]], documents: Sequence[str], method: str = "ms-if",
              damping: float = DEFAULT_DAMPING, relative: bool = True, batch_size: int = 8,
              show_progress: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Scores ``[C, Q]`` of ``documents`` for (prompt, answer) ``queries`` under one method, and for
        gradient methods the per-module scores ``{name: [C, Q]}``."""
        (scores,) = self.score_methods(queries, documents, [method], [damping], relative, batch_size,
                                       show_progress=show_progress)
        return scores.total, scores.per_module

    def compare(self, prompt: str, answer: str | None = None, documents: Sequence[dict] | None = None,
                index=None, candidates: int = 100, top: int = 10, methods: Sequence[str] = METHODS,
                dampings: Sequence[float] = (DEFAULT_DAMPING,), relative: bool = True, token_shares: bool = False,
                show_progress: bool = False, gradindex=None, candidates_from: str | None = None) -> list[Attribution]:
        """Ranks the same candidate documents for one prompt under several methods and dampings.

        The answer is generated greedily when None or blank. Candidates are ``documents`` (dicts
        with ``id`` and ``text``) or the ``candidates`` nearest documents of ``index`` (default:
        this attributor's), of ``gradindex`` (default: this attributor's) or both, as
        ``candidates_from`` says (``stage_one``; by default the gradient index when there is one; its
        query vector takes the first of ``dampings``). Returns one ``Attribution`` per method and,
        for MS-IF and SS-IF, per damping, in that order, each with its ``top`` rows and how its
        candidates were found (``stage_one``). ``token_shares`` adds each top row's per-token shares
        (gradient methods).
        """
        started = time.perf_counter()
        methods, dampings = check_methods(methods), check_dampings(dampings)
        check_prompt(prompt)
        gradindex = self._check_sources(documents, candidates, index, gradindex, candidates_from)
        check_top(top)
        answer, generated = self._answered(prompt, answer)  # before any retrieval work
        stage = None
        if documents is None:
            documents, stage = self.stage_one(prompt, answer, candidates, index, gradindex, candidates_from,
                                              dampings[0], relative)
        if not documents:
            raise MsifValueError("no candidate documents to score (zero candidates)")
        texts = [d["text"] for d in documents]
        scored = self.score_methods([(prompt, answer)], texts, methods, dampings, relative,
                                    token_shares=token_shares, show_progress=show_progress)
        (logprob,) = self.answer_logprobs([(prompt, answer)])
        results = [self._rank(s, prompt, answer, generated, relative, documents, top) for s in scored]
        for result in results:
            result.answer_logprob = logprob
            result.stage_one = stage.to_json() if stage is not None else None
            result.seconds = time.perf_counter() - started
        return results

    def _check_sources(self, documents, candidates, index, gradindex, candidates_from):
        """Before any work: given documents take no index; otherwise the candidate count and the
        indexes that ``candidates_from`` needs (docs/design.md, "Gradient index"). Returns the
        gradient index given (loaded when given by its location, and checked), or None."""
        if documents is not None:
            if gradindex is not None or candidates_from is not None:
                raise MsifValueError("given candidate documents are scored as they are: no gradindex or "
                                     "candidates_from with them")
            return None
        check_candidates(candidates)
        loaded = self._gradient_index(gradindex) if gradindex is not None else None
        choose_source(candidates_from, index if index is not None else self.index, loaded or self._gradient_index())
        return loaded

    def attribute(self, prompt: str, answer: str | None = None, documents: Sequence[dict] | None = None,
                  index=None, candidates: int = 100, top: int = 10, method: str = "ms-if",
                  damping: float = DEFAULT_DAMPING, relative: bool = True, token_shares: bool = False,
                  show_progress: bool = False, gradindex=None, candidates_from: str | None = None) -> Attribution:
        """Ranks candidate documents for one prompt (and answer; generated greedily when None)
        under one method: ``compare`` with one method and damping."""
        (result,) = self.compare(prompt, answer, documents, index, candidates, top, [method], [damping], relative,
                                 token_shares, show_progress, gradindex, candidates_from)
        return result

    def attribute_many(self, queries: Sequence[tuple[str, str | None]], documents: Sequence[dict] | None = None,
                       index=None, candidates: int = 100, top: int = 10, method: str = "ms-if",
                       damping: float = DEFAULT_DAMPING, relative: bool = True, token_shares: bool = False,
                       show_progress: bool = False, gradindex=None,
                       candidates_from: str | None = None) -> list[Attribution]:
        """``attribute`` for many (prompt, answer) queries in one pass (docs/design.md, "Many queries").

        The same results as one ``attribute`` call per query, for less: answers left None or blank
        are generated, each query's candidates are found as ``attribute`` finds them (``stage_one``;
        or are ``documents`` for every query), and queries go through ``score_methods`` together, chunk by chunk
        (``query_chunk``), each chunk against the union of its queries' candidates: one gradient
        pass over the chunk's queries and one over each candidate per model, however many of the
        chunk's queries share it. Each query is then ranked among its own candidates only.
        """
        check_methods([method])
        check_dampings([damping])
        if not queries:
            raise MsifValueError("no queries")
        gradindex = self._check_sources(documents, candidates, index, gradindex, candidates_from)
        check_top(top)
        if documents is not None and not documents:
            raise MsifValueError("no candidate documents to score (zero candidates)")
        for prompt, _ in queries:
            check_prompt(prompt)
        from tqdm.auto import tqdm

        answered, generated, seconds = [], [], []
        for number, (prompt, answer) in enumerate(tqdm(queries, desc="generating answers", leave=False, disable=(
                not show_progress or all(a and a.strip() for _, a in queries))), start=1):
            started = time.perf_counter()
            try:
                answer, blank = self._answered(prompt, answer)  # before any scoring work
            except MsifValueError as err:
                raise MsifValueError(f"query {number} of {len(queries)}: {err}") from err
            answered.append((prompt, answer))
            generated.append(blank)
            seconds.append(time.perf_counter() - started)
        stages: list[StageOne | None] = [None] * len(answered)
        if documents is not None:
            pools = [list(range(len(documents)))] * len(answered)
            pool_docs = list(documents)
        else:  # each query's stage one, as `attribute` runs it; the pools share rows by document id
            pools, pool_docs, row_of = [], [], {}
            for q, (prompt, answer) in enumerate(answered):
                found, stage = self.stage_one(prompt, answer, candidates, index, gradindex, candidates_from, damping,
                                              relative)
                stages[q] = stage
                seconds[q] += stage.seconds
                pool = []
                for doc in found:
                    if doc["id"] not in row_of:
                        row_of[doc["id"]] = len(pool_docs)
                        pool_docs.append(doc)
                    pool.append(row_of[doc["id"]])
                pools.append(pool)
        chunk = self.query_chunk(max(len(pool) for pool in pools), len(pool_docs))
        results: list[Attribution] = []
        for start in range(0, len(answered), chunk):
            started = time.perf_counter()
            part = range(start, min(start + chunk, len(answered)))
            union = sorted({i for q in part for i in pools[q]})
            where = {doc: row for row, doc in enumerate(union)}
            # One query per gradient pass: padded next to longer queries, a query's float32 gradient
            # moves by about 1e-6 (relative), enough to reorder near-ties against one `attribute` call.
            (scores,) = self.score_methods([answered[q] for q in part], [pool_docs[i]["text"] for i in union],
                                           [method], [damping], relative, token_shares=token_shares,
                                           show_progress=show_progress, query_batch_size=1)
            for column, q in enumerate(part):
                rows = torch.tensor([where[i] for i in pools[q]], dtype=torch.long)
                mine = MethodScores(
                    scores.method, scores.damping, scores.total[rows, column:column + 1],
                    {n: v[rows, column:column + 1] for n, v in scores.per_module.items()}
                    if scores.per_module is not None else None,
                    [scores.tokens[r][:, column:column + 1] for r in rows.tolist()] if scores.tokens is not None else None)
                prompt, answer = answered[q]
                results.append(self._rank(mine, prompt, answer, generated[q], relative,
                                          [pool_docs[i] for i in pools[q]], top))
            for q in part:  # each query's share of its chunk's scoring
                seconds[q] += (time.perf_counter() - started) / len(part)
        for how, result, logprob in zip(stages, results, self.answer_logprobs(answered), strict=True):
            result.answer_logprob = logprob
            result.stage_one = how.to_json() if how is not None else None
        for result, spent in zip(results, seconds, strict=True):
            result.seconds = spent
        return results

    @torch.no_grad()
    def answer_logprobs(self, queries: Sequence[tuple[str, str]], batch_size: int = 8) -> list[float]:
        """``sum_t log p(answer_t | prompt, answer_<t)`` under the fine-tuned model for each (prompt,
        answer): minus the query's loss, from no-grad forwards of the query sequences (right-padded
        batches of ``batch_size``) on the model's device; log-softmax in at least float32."""
        model = self.models["finetuned"]
        device = next(model.parameters()).device
        sequences = [self.query_sequence(p, a) for p, a in queries]
        out: list[float] = []
        for start in range(0, len(sequences), batch_size):
            chunk = sequences[start:start + batch_size]
            batch = collate(chunk, range(start, start + len(chunk)), self.pad_id, device)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            targets, valid = shifted_targets(batch)
            logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
            picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            out.extend(torch.where(valid, picked, 0.0).double().sum(dim=1).tolist())
        return out

    query_memory_bytes = 2 << 30  # what ``attribute_many`` may hold for one chunk of queries

    def query_chunk(self, candidates: int = 100, documents: int | None = None) -> int:
        """How many queries ``attribute_many`` scores together within ``query_memory_bytes``: per query,
        its gradient and preconditioned weights (measured: 3.6-3.8 float32 copies of the tracked weights
        on the fact world, so 4 are counted), and the float64 scores ``[C, Q]`` of every module and
        their total, over the union C of the chunk's candidates (at most ``candidates`` per query, at
        most ``documents`` in all), which grows with the chunk too."""
        weights = 4 * 4 * sum(spec.d_out * spec.d_in for spec in self.specs)
        per_score = 8 * (len(self.specs) + 1)

        def needed(q: int) -> int:
            union = q * candidates if documents is None else min(q * candidates, documents)
            return q * weights + union * q * per_score

        low, high = 1, 1
        while needed(high * 2) <= self.query_memory_bytes and high < 1 << 20:
            high *= 2
        high *= 2
        while low + 1 < high:  # the largest chunk that fits (at least 1)
            middle = (low + high) // 2
            low, high = (middle, high) if needed(middle) <= self.query_memory_bytes else (low, middle)
        return low

    def _rank(self, scores: MethodScores, prompt: str, answer: str, generated: bool, relative: bool,
              documents: Sequence[dict], top: int) -> Attribution:
        total = scores.total[:, 0]
        damping = f" at damping {scores.damping:g}" if scores.damping is not None else ""
        if not bool(torch.isfinite(total).all()):  # never rank NaN or infinity
            raise MsifValueError(f"{scores.method}{damping} gave non-finite scores for {int((~torch.isfinite(total)).sum())} "
                                 f"of {len(total)} candidates; try a larger damping")
        if scores.method in GRADIENT_METHODS and not bool(total.any()):  # all zero: no ranking either
            raise MsifValueError(f"{scores.method}{damping} gave a score of exactly 0 to every candidate"
                                 f"{' (the damping drowns every curvature term; use a smaller one)' if damping else ''}")
        order = torch.argsort(total, descending=True).tolist()
        scale = float(total.abs().max()) or 1.0
        roles = self.roles

        def row(rank: int, i: int):
            by_module = ({name: float(v[i, 0]) for name, v in scores.per_module.items()}
                         if scores.per_module is not None else None)
            tokens = None
            if scores.tokens is not None:
                ids = self.document_sequence(documents[i]["text"])["input_ids"]
                pieces = self.tokenizer.convert_ids_to_tokens(ids)
                tokens = [TokenShare(str(p), float(s)) for p, s in zip(pieces, scores.tokens[i][:, 0].tolist())]
            return make_row(rank, documents[i], float(total[i]), scale, by_module, roles, tokens)

        rows = [row(rank, i) for rank, i in enumerate(order[:top], start=1)]
        # Opponents: the most negative first, each with its rank among all candidates from the top.
        bottom = [(len(order) - k, i) for k, i in enumerate(reversed(order)) if float(total[i]) < 0][:top]
        opponents = [row(rank, i) for rank, i in bottom]
        return Attribution(prompt, answer, generated, scores.method, self.modules, scores.damping,
                           relative, len(documents), scale, rows, opponents)


def _scoring_order(documents: Sequence[str]) -> tuple[list[int], torch.Tensor]:
    """The order candidates are scored in (by text length, then text) and its inverse. Batches then
    hold documents of similar length (less padding), and the same documents, in whatever order
    they are given, meet in the same batches, so their float32 scores agree exactly (a document's
    score moves by about 1e-6 of the scale with its batch's shape)."""
    order = sorted(range(len(documents)), key=lambda i: (len(documents[i]), documents[i]))
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return order, inverse


def _reordered(scores: MethodScores, inverse: torch.Tensor) -> MethodScores:
    """``scores`` of candidates scored in ``_scoring_order``, back in the order they were given."""
    per_module = {n: v[inverse] for n, v in scores.per_module.items()} if scores.per_module is not None else None
    tokens = [scores.tokens[i] for i in inverse.tolist()] if scores.tokens is not None else None
    return MethodScores(scores.method, scores.damping, scores.total[inverse], per_module, tokens)


def _check_recorded(stage: str, location: str, recorded: dict, ref, allow_revision_mismatch: bool) -> None:
    """Before anything loads: the model attributed must be the one the stage's factors were fitted
    for (the same revision: a Hub commit, or the sha256 of a local folder's weights)."""
    fitted = recorded.get("revision")
    if fitted is None or fitted == ref.revision:
        return
    message = (f"the {stage} factors ({location}) were fitted for {recorded.get('id')}@{fitted} but the {stage} "
               f"model is {ref.id}@{ref.revision}" + (f" (folder {ref.folder})" if ref.folder else ""))
    if not allow_revision_mismatch:
        raise FactorError(message + "; give the model they were fitted for, or factors of this one (hub-msif "
                          "find-factors --model), or --allow-revision-mismatch (allow_revision_mismatch=True) to "
                          "use them anyway")
    logger.warning(message)


def _base_model(recorded: dict, given: str | None, base_model: str | None,
                model_paths: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """The base model (and pinned revision) for a stage's model: ``base_model`` when given; else,
    for the recorded model of a PEFT adapter, the recorded base at its recorded commit (a local
    base found like a local model: ``recorded_model``)."""
    if base_model is not None:
        return base_model, None
    base = recorded.get("base") if given is None else None
    if not isinstance(base, dict) or not base.get("id"):
        return None, None
    return recorded_model(base, "base model", model_paths)


def _check_base(stage: str, recorded: dict, ref, allow_revision_mismatch: bool) -> None:
    """A PEFT adapter merged on another base revision than the factors were fitted with is another
    model: refused like a revision mismatch of the model itself."""
    fitted = (recorded.get("base") or {}).get("revision")
    loaded = ref.base.revision if ref.base is not None else None
    if fitted and loaded and fitted != loaded:
        message = (f"{stage} factors were fitted on the adapter merged into base revision {fitted} "
                   f"({recorded['base'].get('id')}) but the loaded base ({ref.base.id}) has revision {loaded}")
        if not allow_revision_mismatch:
            raise FactorError(message + "; pass --allow-revision-mismatch (allow_revision_mismatch=True) to use "
                              "them anyway")
        logger.warning(message)
