"""What the Space does for a request, apart from the page: ``SpaceRequests`` (docs/design.md, "Space").

The checks of a visitor's input (the shared ones of ``hub_msif.attribution.checks``, worded for the
page, and the Space's own limits) and the four handlers behind the API endpoints, ``generate``,
``attribute``, ``compare`` and ``describe``, each returning exactly the outputs its endpoint shows.
They raise ``SpaceError`` (or whatever the library raises); ``refusal`` turns any failure into the
one line the page shows. No page, no event, no browser: tests call them directly (``page.layout``
builds the page and wires its events to them).
"""

from __future__ import annotations

import logging
import time

from hub_msif.apps.space.backend import Backend, one_line, report_progress
from hub_msif.apps.space.render import (
    METHOD_LABELS,
    PROPONENT_MARK,
    SOURCE_TEXT,
    answer_logprob_value,
    chart_update,
    compare_table,
    escape_markdown,
    query_terms,
    results_table,
    served_markdown,
    token_shading_html,
)
from hub_msif.apps.space.settings import SpaceSettings
from hub_msif.attribution import checks
from hub_msif.attribution.attributor import METHODS, Attributor
from hub_msif.attribution.scoring import GRADIENT_METHODS
from hub_msif.errors import SpaceError

logger = logging.getLogger(__name__)

EXAMPLE_BUTTONS = 3  # example questions taken from the index (when build_app is given none)


def _examples(examples) -> tuple[list[str], dict[str, set[str]]]:
    """Example prompts, and the known proponents of each (toy fact world) where given.

    Accepts strings, ``factworld.Query`` objects, or dicts with ``prompt`` (and ``proponents``).
    """
    prompts, proponents = [], {}
    for item in examples or []:
        if isinstance(item, str):
            prompt, known = item, None
        elif isinstance(item, dict):
            prompt, known = item["prompt"], item.get("proponents")
        else:
            prompt, known = item.prompt, getattr(item, "proponents", None)
        prompts.append(prompt)
        if known:
            proponents[prompt.strip()] = set(known)
    return prompts, proponents


def refusal(err: BaseException) -> str:
    """The one line a visitor sees for a failed request (the log keeps tracebacks of unexpected ones)."""
    if isinstance(err, SpaceError):
        return str(err)
    if isinstance(err, (ValueError, OSError)):
        return one_line(err)
    logger.exception("request failed", exc_info=err)
    return f"Internal error ({type(err).__name__}): {one_line(err)}"


class SpaceRequests:
    """The Space's checks and handlers over one ``Backend`` (the attributor and index, loaded on
    first use) and its ``SpaceSettings``. ``examples``: questions shown under the prompt (strings,
    dicts with ``prompt`` and ``proponents``, or ``factworld.Query`` objects, whose proponents are
    then marked in the results). ``progress``: gradio's progress callback, or None."""

    def __init__(self, backend: Backend, settings: SpaceSettings | None = None, examples=None):
        self.backend, self.settings = backend, settings or SpaceSettings()
        self.example_prompts, self.known_proponents = _examples(examples)

    # -- checks: the shared ones (hub_msif.attribution.checks) worded for visitors ---------------
    @staticmethod
    def check_prompt(prompt: str) -> str:
        try:
            return checks.check_prompt(prompt).strip()
        except checks.ArgumentError:
            raise SpaceError("The prompt is empty: type a question first.") from None

    def check_candidates(self, candidates) -> int:
        try:
            value = checks.check_candidates(candidates)
        except checks.ArgumentError as err:
            if err.problem == "too_small":
                raise SpaceError(f"The number of candidates must be at least 1, got {err.value}: "
                                 "zero candidates leave nothing to rank.") from None
            raise SpaceError(f"The number of candidates must be a whole number, got {candidates!r}.") from None
        if value > self.settings.max_candidates:
            raise SpaceError(f"The number of candidates is {value}; this Space scores at most "
                             f"{self.settings.max_candidates} per request (MSIF_MAX_CANDIDATES).")
        return value

    @staticmethod
    def check_damping(damping) -> float:
        try:
            return checks.check_damping(damping)
        except checks.ArgumentError as err:
            if err.problem == "not_number":
                raise SpaceError(f"Damping must be a positive number, got {damping!r}.") from None
            raise SpaceError("Damping must be a positive number (relative to the mean eigenvalue), "
                             f"got {damping!r}.") from None

    @staticmethod
    def check_method(method: str) -> str:
        try:
            return checks.check_method(method)
        except checks.ArgumentError:
            raise SpaceError(f"Unknown method {method!r}; use one of {', '.join(METHOD_LABELS)}.") from None

    def check_source(self, candidates_from: str | None) -> str:
        """Where the candidates come from: ``embedding``, ``gradient`` or ``both``; blank or None is
        the Space's default (the gradient index when one is configured, else the document index)."""
        if not candidates_from:
            return "gradient" if self.backend.has_gradindex else "embedding"
        if candidates_from not in SOURCE_TEXT:
            raise SpaceError(f"Unknown candidate source {candidates_from!r}; use one of {', '.join(SOURCE_TEXT)}.")
        if candidates_from != "embedding" and not self.backend.has_gradindex:
            raise SpaceError("This Space has no gradient index (MSIF_GRADINDEX): its candidates come from the "
                             "document index only.")
        return candidates_from

    def check_length(self, attributor: Attributor, text: str, what: str) -> None:
        """At most ``settings.max_prompt_tokens`` tokens (``MSIF_MAX_PROMPT_TOKENS``)."""
        n = len(attributor.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > self.settings.max_prompt_tokens:
            raise SpaceError(f"The {what} is {n} tokens long; this Space accepts at most "
                             f"{self.settings.max_prompt_tokens} tokens (MSIF_MAX_PROMPT_TOKENS). Shorten it.")

    def answer_for(self, attributor: Attributor, prompt: str, answer: str | None, progress=None) -> tuple[str, bool]:
        """``(answer, generated)``: the visitor's answer, or the fine-tuned model's greedy one when blank."""
        self.check_length(attributor, prompt, "prompt")
        if answer and answer.strip():
            self.check_length(attributor, answer, "answer")
            return answer.strip(), False
        report_progress(progress, 0.45, "Generating the fine-tuned model's answer")
        generated = attributor.generate(prompt, self.settings.max_new_tokens)
        if not generated.strip():
            raise SpaceError("The fine-tuned model generated an empty answer; type one in the answer box.")
        return generated, True

    # -- the handlers behind the API endpoints ----------------------------------------------------
    def generate(self, prompt: str, progress=None) -> tuple[str, str]:
        """The fine-tuned model's greedy answer to the prompt, and the status line."""
        prompt = self.check_prompt(prompt)
        attributor = self.backend.attributor("all", progress)
        self.check_length(attributor, prompt, "prompt")
        with self.backend.compute_lock:
            report_progress(progress, 0.5, "Generating the fine-tuned model's answer")
            answer = attributor.generate(prompt, self.settings.max_new_tokens)
        return answer, f"Answer generated greedily by the fine-tuned model ({attributor.refs['finetuned'].id})."

    def attribute(self, prompt: str, answer: str, method: str, damping: float, candidates: int, mlp: bool,
                  candidates_from: str | None = None, progress=None) -> tuple:
        """Ranks candidate pre-training documents for the prompt and answer with one method, the
        candidates from ``candidates_from`` (``check_source``): ``(answer, log p(answer), proponents
        table, opponents table, chart, status, token shading html, result JSON)``."""
        settings = self.settings
        prompt, method = self.check_prompt(prompt), self.check_method(method)
        candidates, damping = self.check_candidates(candidates), self.check_damping(damping)
        source = self.check_source(candidates_from)
        started = time.perf_counter()
        attributor = self.backend.attributor("mlp" if mlp else "all", progress)
        index = self.backend.index(progress)
        gradindex = self.backend.gradindex(progress) if source != "embedding" else None
        report_progress(progress, 0.4, "Waiting for the model")
        with self.backend.compute_lock:
            answer, generated = self.answer_for(attributor, prompt, answer, progress)
            report_progress(progress, 0.6, f"Retrieving {candidates} candidates and scoring them with "
                                           f"{METHOD_LABELS[method]}")
            result = attributor.attribute(prompt, answer, index=index, candidates=candidates, top=settings.top,
                                          method=method, damping=damping, token_shares=method in GRADIENT_METHODS,
                                          gradindex=gradindex, candidates_from=source)
        proponents, terms = self.known_proponents.get(prompt, set()), query_terms(prompt, answer)
        table, opposing = results_table(result, terms, proponents), results_table(result, terms, proponents, True)
        status = (f"**{METHOD_LABELS[method]}** ranked {result.num_candidates} candidates "
                  f"({SOURCE_TEXT[source]}) for the answer "
                  f"“{escape_markdown(answer)}”{' (generated by the fine-tuned model)' if generated else ''} "
                  f"in {time.perf_counter() - started:.1f} s{', MLP modules only' if mlp else ''}.")
        stage = result.stage_one or {}
        if "gradient" in stage.get("searched", {}):
            check = stage.get("check") or {}
            status += (f" The gradient index searched {stage['searched']['gradient']} documents in "
                       f"{stage['seconds']:.2f} s" + (f" (its recall@10 of exact MS-IF: {check['recall_at_10']:.2f})"
                                                      if "recall_at_10" in check else "") + ".")
        if proponents:
            found = sum(row.id in proponents for row in result.rows)
            status += f" {PROPONENT_MARK} marks the {found} true proponent(s) of this fact in the top {len(result.rows)}."
        if method not in GRADIENT_METHODS:
            status += f" {METHOD_LABELS[method]} has no per-layer breakdown: the chart shows its relative scores."
        payload = result.to_json()
        payload["answer_generated"] = generated  # generated here (under the length limit), not by attribute()
        return (answer, answer_logprob_value(result), table, opposing, chart_update(result), status,
                token_shading_html(result, settings.top), payload)

    def compare(self, prompt: str, answer: str, damping: float, candidates: int, mlp: bool,
                candidates_from: str | None = None, progress=None) -> tuple:
        """Ranks the same candidates (from ``candidates_from``) with all five methods: ``(answer, the
        top documents side by side, status, {candidates, answer, top_ids})``."""
        settings = self.settings
        prompt = self.check_prompt(prompt)
        candidates, damping = self.check_candidates(candidates), self.check_damping(damping)
        source = self.check_source(candidates_from)
        started = time.perf_counter()
        attributor = self.backend.attributor("mlp" if mlp else "all", progress)
        index = self.backend.index(progress)
        gradindex = self.backend.gradindex(progress) if source != "embedding" else None
        with self.backend.compute_lock:
            answer, generated = self.answer_for(attributor, prompt, answer, progress)
            report_progress(progress, 0.5, f"Retrieving {candidates} candidates and scoring them with all five methods")
            results = {r.method: r for r in attributor.compare(prompt, answer, index=index, candidates=candidates,
                                                               top=settings.top, methods=METHODS,
                                                               dampings=[damping], gradindex=gradindex,
                                                               candidates_from=source)}
        num_candidates = results["ms-if"].num_candidates
        terms = query_terms(prompt, answer)
        proponents = self.known_proponents.get(prompt, set())
        frame = compare_table(results, terms, proponents)
        top_ids = {m: [row.id for row in r.rows] for m, r in results.items()}
        reference = set(top_ids["ms-if"])
        overlaps = ", ".join(f"{METHOD_LABELS[m]} {len(reference & set(ids))}/{len(ids)}"
                             for m, ids in top_ids.items() if m != "ms-if")
        status = (f"Compared all five methods on the same {num_candidates} candidates ({SOURCE_TEXT[source]}) for the answer "
                  f"“{escape_markdown(answer)}”{' (generated)' if generated else ''} in "
                  f"{time.perf_counter() - started:.1f} s. Top-{settings.top} overlap with MS-IF: {overlaps}.")
        if proponents:
            found = ", ".join(f"{METHOD_LABELS[m]} {sum(i in proponents for i in ids)}" for m, ids in top_ids.items())
            status += f" True proponents ({PROPONENT_MARK}) in the top {settings.top}: {found}."
        return answer, frame, status, {"candidates": num_candidates, "answer": answer, "top_ids": top_ids}

    def describe(self, progress=None) -> tuple[str, dict, list[str]]:
        """What this Space serves (``Backend.describe``) as markdown and as JSON, and the example
        questions for the page's buttons: the index's (at most ``EXAMPLE_BUTTONS``) when the Space
        was given no examples of its own, else none."""
        served = self.backend.describe(progress)
        questions = [] if self.example_prompts else served.get("example_questions", [])[:EXAMPLE_BUTTONS]
        return served_markdown(served), served, questions
