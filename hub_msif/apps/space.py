"""The Gradio Space: attribute a fine-tuned model's answer to pre-training documents in a browser.

``build_app(factors, index, examples)`` returns a ``gr.Blocks`` page (prompt, editable answer,
method / damping / candidates / MLP-only controls, a ranked table, a chart of influence by layer
and role, and a side-by-side comparison of all five methods) with the API endpoints
``generate``, ``attribute`` and ``compare``. Factors, index and models are loaded on first use
(with progress in the page), from a local folder or, through ``hub_msif.hub``, a Hub repo
``REPO[@REV]``. ``main()`` is the Space entry point (configured by ``MSIF_*`` environment
variables, see ``SpaceSettings``); ``serve_demo(cache)`` serves the toy fact world locally.

Bad input (empty or over-long prompt, zero or too many candidates, a repo that cannot be pulled)
ends the request with ``gr.Error``: a one-line message in the page and in ``gradio_client``,
never a traceback, and the app keeps serving.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import gradio as gr
import pandas as pd

from hub_msif.attribution.attributor import DEFAULT_DAMPING, METHODS, Attributor
from hub_msif.attribution.results import Attribution, ResultRow
from hub_msif.attribution.retrieval import DocumentIndex
from hub_msif.attribution.scoring import GRADIENT_METHODS
from hub_msif.errors import MsifError, SpaceError

logger = logging.getLogger(__name__)

METHOD_CHOICES = [("MS-IF", "ms-if"), ("SS-IF", "ss-if"), ("GDP", "gdp"), ("RepSim", "repsim"), ("BM25", "bm25")]
METHOD_LABELS = dict((value, label) for label, value in METHOD_CHOICES)
RESULT_COLUMNS = ["rank", "score", "relative score", "MLP", "attention", "document", "text"]
RESULT_TYPES = ["number", "str", "number", "number", "number", "markdown", "markdown"]
MAX_CHART_DOCUMENTS = 10
MAX_CHART_BANDS = 6  # layers are grouped into at most this many bands per role, so colours stay readable
PROPONENT_MARK = "★"
STOPWORDS = frozenset(
    "a an the of in on at to for and or not is are was were be been being by with as from that this these those it its "
    "what which who whom whose where when why how does do did has have had can could will would should may might "
    "there their they them he she his her you your we our i me my".split()
)
_WORD = re.compile(r"[^\W_]+")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$&])")



@dataclass
class SpaceSettings:
    """Limits and defaults of the Space; ``from_env`` reads them from ``MSIF_*`` variables."""

    max_prompt_tokens: int = 256  # MSIF_MAX_PROMPT_TOKENS: longest prompt (and answer), in tokens
    max_candidates: int = 200  # MSIF_MAX_CANDIDATES: most candidate documents scored per request
    concurrency: int = 1  # MSIF_CONCURRENCY: requests processed at once (the rest wait in the queue)
    queue_size: int = 32  # MSIF_QUEUE_SIZE: waiting requests beyond which new ones are turned away
    default_candidates: int = 100  # MSIF_DEFAULT_CANDIDATES: the candidates slider's initial value
    top: int = 10  # MSIF_TOP: rows shown per method
    max_new_tokens: int = 32  # MSIF_MAX_NEW_TOKENS: longest generated answer

    ENV = {"max_prompt_tokens": "MSIF_MAX_PROMPT_TOKENS", "max_candidates": "MSIF_MAX_CANDIDATES",
           "concurrency": "MSIF_CONCURRENCY", "queue_size": "MSIF_QUEUE_SIZE",
           "default_candidates": "MSIF_DEFAULT_CANDIDATES", "top": "MSIF_TOP", "max_new_tokens": "MSIF_MAX_NEW_TOKENS"}

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SpaceError(f"{self.ENV[f.name]} ({f.name}) must be a whole number of at least 1, got {value!r}")
        self.default_candidates = min(self.default_candidates, self.max_candidates)

    @classmethod
    def from_env(cls, environ: dict | None = None) -> SpaceSettings:
        environ = os.environ if environ is None else environ
        values = {}
        for name, var in cls.ENV.items():
            raw = environ.get(var, "").strip()
            if raw:
                try:
                    values[name] = int(raw)
                except ValueError:
                    raise SpaceError(f"{var} must be a whole number, got {raw!r}") from None
        return cls(**values)


class Backend:
    """The attributor and index behind the page, loaded on first use and shared by requests.

    ``factors``: a location (``REPO[@REV]`` or folder) or a ready ``Attributor``; ``index``: a
    location or a ready ``DocumentIndex``. Locations are resolved by the attributor and the index
    themselves (``hub_msif.hub.pull``). A failed load is not remembered: the next request tries
    again. Model computations run one at a time (gradient capture hooks the models).
    """

    def __init__(self, factors, index):
        self.factors_location, self.index_location = factors, index
        self._attributor = factors if isinstance(factors, Attributor) else None
        self._index = index if isinstance(index, DocumentIndex) else None
        self._load_lock = threading.Lock()
        self.compute_lock = threading.Lock()

    def attributor(self, modules: str = "all", progress: Callable | None = None) -> Attributor:
        """The attributor over ``all`` modules, or its MLP-only view (``restrict("mlp")``)."""
        with self._load_lock:
            if self._attributor is None:
                _report(progress, 0.05, f"Getting factors from {self.factors_location} and loading the model pair")
                try:
                    self._attributor = Attributor(self.factors_location)
                except (MsifError, OSError, ValueError) as err:
                    raise SpaceError(f"cannot load the factors from {str(self.factors_location)!r}: "
                                     f"{one_line(err)}") from err
            if modules == self._attributor.modules:
                return self._attributor
            if modules != "mlp":
                raise SpaceError("this Space was given factors of MLP modules only: tick 'MLP modules only'")
            try:
                return self._attributor.restrict("mlp")
            except MsifError as err:
                raise SpaceError(f"{err}; untick 'MLP modules only'") from err

    def index(self, progress: Callable | None = None) -> DocumentIndex:
        with self._load_lock:
            if self._index is None:
                if self.index_location is None:
                    raise SpaceError("this Space has no document index configured (MSIF_INDEX)")
                _report(progress, 0.3, f"Getting the document index from {self.index_location}")
                try:
                    self._index = DocumentIndex.load(self.index_location)
                except (MsifError, OSError, ValueError) as err:
                    raise SpaceError(f"cannot load the index from {str(self.index_location)!r}: {one_line(err)}") from err
            return self._index


def _report(progress: Callable | None, fraction: float, desc: str) -> None:
    logger.info(desc)
    if progress is not None:
        progress(fraction, desc=desc)


def one_line(err: BaseException, limit: int = 400) -> str:
    """The first line of an exception's message (its type when the message is empty)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------------------------
# Presentation: highlighted snippets, the ranked table, the chart
# ---------------------------------------------------------------------------------------------


def query_terms(*texts: str | None) -> set[str]:
    """Lower-cased words of the query (prompt and answer) worth highlighting: no stopwords."""
    return {w.lower() for t in texts for w in _WORD.findall(t or "") if len(w) > 1 and w.lower() not in STOPWORDS}


def escape_markdown(text: str) -> str:
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def highlight(text: str, terms: set[str], limit: int = 240) -> str:
    """Markdown of ``text`` (cut to about ``limit`` characters) with the query's words in **bold**."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " …"
    out, pos = [], 0
    for match in _WORD.finditer(text):
        out.append(escape_markdown(text[pos:match.start()]))
        word = escape_markdown(match.group(0))
        out.append(f"**{word}**" if match.group(0).lower() in terms else word)
        pos = match.end()
    out.append(escape_markdown(text[pos:]))
    return "".join(out)


def _round(value: float | None, digits: int = 4) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(f"{value:.{digits}g}")


def results_table(result: Attribution, terms: set[str], proponents: set[str] = frozenset()) -> pd.DataFrame:
    """The ranked table: rank, score, relative score, MLP and attention parts, document id, snippet."""
    rows = []
    for row in result.rows:
        parts = row.relative_by_role or {}
        mark = f" {PROPONENT_MARK}" if row.id in proponents else ""
        rows.append([row.rank, f"{row.score:.4g}", _round(row.relative_score, 3), _round(parts.get("mlp"), 3),
                     _round(parts.get("attention"), 3), f"{escape_markdown(row.id)}{mark}", highlight(row.text, terms)])
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def _bands(layers: Sequence[int]) -> dict[int, str]:
    """Layer -> label, grouping consecutive layers into at most ``MAX_CHART_BANDS`` bands."""
    layers = sorted(set(layers))
    if len(layers) <= MAX_CHART_BANDS:
        return {layer: f"layer {layer}" for layer in layers}
    size = math.ceil(len(layers) / MAX_CHART_BANDS)
    labels = {}
    for start in range(0, len(layers), size):
        group = layers[start:start + size]
        for layer in group:
            labels[layer] = f"layers {group[0]}-{group[-1]}"
    return labels


def chart_frame(result: Attribution, limit: int = MAX_CHART_DOCUMENTS) -> pd.DataFrame:
    """Long-form data for the chart: per top document, its relative influence split by layer and role.

    Consecutive layers are grouped into at most ``MAX_CHART_BANDS`` bands. Methods without a
    per-module breakdown (RepSim, BM25) give one ``total`` part per document.
    """
    rows: list[ResultRow] = result.rows[:limit]
    layer_labels = _bands([int(layer) for row in rows for layer in (row.relative_by_layer_role or {})
                           if layer.isdigit()])
    records = []
    for row in rows:
        label = f"{row.rank}. {row.id}"
        if row.relative_by_layer_role is None:
            records.append({"document": label, "part": "total", "influence": row.relative_score})
            continue
        parts: dict[str, float] = {}
        for layer, cell in row.relative_by_layer_role.items():
            where = layer_labels.get(int(layer), "other layers") if layer.isdigit() else "other layers"
            for role, value in cell.items():
                key = f"{where} · {'MLP' if role == 'mlp' else 'attention'}"
                parts[key] = parts.get(key, 0.0) + value
        records.extend({"document": label, "part": k, "influence": v} for k, v in sorted(parts.items()))
    return pd.DataFrame(records, columns=["document", "part", "influence"])


_BLUES = ["#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b"]
_ORANGES = ["#fdae6b", "#fd8d3c", "#f16913", "#d94801", "#a63603", "#7f2704"]


def chart_colors(parts: Iterable[str]) -> dict[str, str]:
    """Attention parts in blues and MLP parts in oranges, darker for deeper layers."""
    parts = list(dict.fromkeys(parts))
    colors = {"total": "#7c3aed"}
    for role, palette in (("attention", _BLUES), ("MLP", _ORANGES)):
        mine = [p for p in parts if p.endswith(role)]
        for i, part in enumerate(mine):
            colors[part] = palette[min(len(palette) - 1, round(i * (len(palette) - 1) / max(1, len(mine) - 1)))]
    return {p: colors.get(p, "#999999") for p in parts}


def chart_update(result: Attribution) -> gr.BarPlot:
    frame = chart_frame(result)
    order = list(dict.fromkeys(frame["document"]))
    return gr.BarPlot(value=frame, sort=order, color_map=chart_colors(frame["part"]))


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------


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


INTRO = """# Which pre-training documents made the fine-tuned model say that?
Ask a question. The **fine-tuned** model answers it (greedily; you can edit the answer), and
**multi-stage influence functions (MS-IF)** rank candidate documents from the **pre-training**
corpus by how much training on each one supports that answer. Candidates are the documents nearest
to the question and answer in an embedding index. A positive score means the document supports the
answer; *relative score* is the score over the largest absolute score among the candidates.
"""


def build_app(factors, index, examples=None, settings: SpaceSettings | None = None,
              title: str = "MS-IF attribution") -> gr.Blocks:
    """The Space's page and API, ready to ``launch()``.

    ``factors``: ``REPO[@REV]``, a local factor folder or an ``Attributor``; ``index``:
    ``REPO[@REV]``, an index folder or a ``DocumentIndex``. Both are loaded on first use.
    ``examples``: questions shown under the prompt (strings, or ``factworld.Query`` objects whose
    proponents are then marked with a star in the results). The queue admits
    ``settings.concurrency`` requests at a time and ``settings.queue_size`` waiting ones.
    """
    settings = settings or SpaceSettings()
    backend = Backend(factors, index)
    example_prompts, known_proponents = _examples(examples)

    def check_prompt(prompt: str) -> str:
        if not prompt or not prompt.strip():
            raise SpaceError("The prompt is empty: type a question first.")
        return prompt.strip()

    def check_length(attributor: Attributor, text: str, what: str) -> None:
        n = len(attributor.tokenizer(text, add_special_tokens=False)["input_ids"])
        if n > settings.max_prompt_tokens:
            raise SpaceError(f"The {what} is {n} tokens long; this Space accepts at most {settings.max_prompt_tokens} "
                             f"tokens (MSIF_MAX_PROMPT_TOKENS). Shorten it.")

    def check_candidates(candidates) -> int:
        try:
            value = float(candidates)
        except (TypeError, ValueError):
            raise SpaceError(f"The number of candidates must be a whole number, got {candidates!r}.") from None
        if not math.isfinite(value) or value != int(value):
            raise SpaceError(f"The number of candidates must be a whole number, got {candidates!r}.")
        if value < 1:
            raise SpaceError(f"The number of candidates must be at least 1, got {int(value)}: "
                             "zero candidates leave nothing to rank.")
        if value > settings.max_candidates:
            raise SpaceError(f"The number of candidates is {int(value)}; this Space scores at most "
                             f"{settings.max_candidates} per request (MSIF_MAX_CANDIDATES).")
        return int(value)

    def check_damping(damping) -> float:
        try:
            value = float(damping)
        except (TypeError, ValueError):
            raise SpaceError(f"Damping must be a positive number, got {damping!r}.") from None
        if not math.isfinite(value) or value <= 0:
            raise SpaceError(f"Damping must be a positive number (relative to the mean eigenvalue), got {damping!r}.")
        return value

    def check_method(method: str) -> str:
        if method not in METHOD_LABELS:
            raise SpaceError(f"Unknown method {method!r}; use one of {', '.join(METHOD_LABELS)}.")
        return method

    def answer_for(attributor: Attributor, prompt: str, answer: str | None, progress) -> tuple[str, bool]:
        check_length(attributor, prompt, "prompt")
        if answer and answer.strip():
            check_length(attributor, answer, "answer")
            return answer.strip(), False
        _report(progress, 0.45, "Generating the fine-tuned model's answer")
        generated = attributor.generate(prompt, settings.max_new_tokens)
        if not generated.strip():
            raise SpaceError("The fine-tuned model generated an empty answer; type one in the answer box.")
        return generated, True

    last_errors: dict[str, str] = {}  # session -> message of its last failed request, for the status line

    def run_guarded(request: gr.Request | None, fn, *args, progress=None):
        """Runs a handler; every failure becomes a one-line ``gr.Error`` (the log keeps tracebacks
        of unexpected ones), so the visitor sees a message and the app keeps serving."""
        try:
            return fn(*args, progress=progress)
        except SpaceError as err:
            message = str(err)
        except (ValueError, OSError) as err:
            message = one_line(err)
        except Exception as err:
            logger.exception("request failed")
            message = f"Internal error ({type(err).__name__}): {one_line(err)}"
        logger.warning("request refused: %s", message)
        if request is not None:
            last_errors[request.session_hash] = message
            while len(last_errors) > 1000:  # API clients never run the failure handler that pops them
                last_errors.pop(next(iter(last_errors)))
        raise gr.Error(message, duration=None, print_exception=False)


    def show_error(request: gr.Request):
        message = last_errors.pop(request.session_hash, "the request failed") if request else "the request failed"
        return f"⚠️ **Error:** {escape_markdown(message)}"

    def generate(prompt: str, progress=None):
        """The fine-tuned model's greedy answer to the prompt."""
        prompt = check_prompt(prompt)
        attributor = backend.attributor("all", progress)
        check_length(attributor, prompt, "prompt")
        with backend.compute_lock:
            _report(progress, 0.5, "Generating the fine-tuned model's answer")
            answer = attributor.generate(prompt, settings.max_new_tokens)
        return answer, f"Answer generated greedily by the fine-tuned model ({attributor.refs['finetuned'].id})."

    def attribute(prompt: str, answer: str, method: str, damping: float, candidates: int, mlp: bool, progress=None):
        """Ranks candidate pre-training documents for the prompt and answer with one method."""
        prompt, method = check_prompt(prompt), check_method(method)
        candidates, damping = check_candidates(candidates), check_damping(damping)
        started = time.perf_counter()
        attributor = backend.attributor("mlp" if mlp else "all", progress)
        index = backend.index(progress)
        _report(progress, 0.4, "Waiting for the model")
        with backend.compute_lock:
            answer, generated = answer_for(attributor, prompt, answer, progress)
            _report(progress, 0.6, f"Retrieving {candidates} candidates and scoring them with {METHOD_LABELS[method]}")
            result = attributor.attribute(prompt, answer, index=index, candidates=candidates, top=settings.top,
                                          method=method, damping=damping)
        proponents = known_proponents.get(prompt, set())
        table = results_table(result, query_terms(prompt, answer), proponents)
        status = (f"**{METHOD_LABELS[method]}** ranked {result.num_candidates} candidates for the answer "
                  f"“{escape_markdown(answer)}”{' (generated by the fine-tuned model)' if generated else ''} "
                  f"in {time.perf_counter() - started:.1f} s{', MLP modules only' if mlp else ''}.")
        if proponents:
            found = sum(row.id in proponents for row in result.rows)
            status += f" {PROPONENT_MARK} marks the {found} true proponent(s) of this fact in the top {len(result.rows)}."
        if method not in GRADIENT_METHODS:
            status += f" {METHOD_LABELS[method]} has no per-layer breakdown: the chart shows its relative scores."
        payload = result.to_json()
        payload["answer_generated"] = generated  # generated here (under the length limit), not by attribute()
        return answer, table, chart_update(result), status, payload

    def compare(prompt: str, answer: str, damping: float, candidates: int, mlp: bool, progress=None):
        """Ranks the same candidates with all five methods; returns the top documents side by side."""
        prompt = check_prompt(prompt)
        candidates, damping = check_candidates(candidates), check_damping(damping)
        started = time.perf_counter()
        attributor = backend.attributor("mlp" if mlp else "all", progress)
        index = backend.index(progress)
        with backend.compute_lock:
            answer, generated = answer_for(attributor, prompt, answer, progress)
            _report(progress, 0.5, f"Retrieving {candidates} candidates and scoring them with all five methods")
            results = {r.method: r for r in attributor.compare(prompt, answer, index=index, candidates=candidates,
                                                               top=settings.top, methods=METHODS,
                                                               dampings=[damping])}
        num_candidates = results["ms-if"].num_candidates
        terms = query_terms(prompt, answer)
        proponents = known_proponents.get(prompt, set())
        depth = max(len(r.rows) for r in results.values())
        table = []
        for rank in range(depth):
            line = [rank + 1]
            for method in METHOD_LABELS:
                rows = results[method].rows
                if rank < len(rows):
                    row = rows[rank]
                    mark = f" {PROPONENT_MARK}" if row.id in proponents else ""
                    line.append(f"{escape_markdown(row.id)}{mark}: {highlight(row.text, terms, 80)}")
                else:
                    line.append("")
            table.append(line)
        frame = pd.DataFrame(table, columns=["rank", *METHOD_LABELS.values()])
        top_ids = {m: [row.id for row in r.rows] for m, r in results.items()}
        reference = set(top_ids["ms-if"])
        overlaps = ", ".join(f"{METHOD_LABELS[m]} {len(reference & set(ids))}/{len(ids)}"
                             for m, ids in top_ids.items() if m != "ms-if")
        status = (f"Compared all five methods on the same {num_candidates} candidates for the answer "
                  f"“{escape_markdown(answer)}”{' (generated)' if generated else ''} in "
                  f"{time.perf_counter() - started:.1f} s. Top-{settings.top} overlap with MS-IF: {overlaps}.")
        if proponents:
            found = ", ".join(f"{METHOD_LABELS[m]} {sum(i in proponents for i in ids)}" for m, ids in top_ids.items())
            status += f" True proponents ({PROPONENT_MARK}) in the top {settings.top}: {found}."
        return answer, frame, status, {"candidates": num_candidates, "answer": answer, "top_ids": top_ids}

    with gr.Blocks(analytics_enabled=False, title=title) as app:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                prompt_box = gr.Textbox(label="Prompt (a question for the fine-tuned model)", lines=2,
                                        elem_id="prompt", placeholder="Type a question …")
                answer_box = gr.Textbox(label="Answer (generated by the fine-tuned model; you can edit it)", lines=2,
                                        elem_id="answer", placeholder="Leave empty to use the model's greedy answer")
                with gr.Row():
                    generate_button = gr.Button("Generate answer", elem_id="generate")
                    attribute_button = gr.Button("Attribute", variant="primary", elem_id="attribute")
                if example_prompts:
                    gr.Examples(examples=[[p] for p in example_prompts], inputs=[prompt_box],
                                label="Example questions" + (" (★ marks the true proponents in the results)"
                                                             if known_proponents else ""))
            with gr.Column(scale=2):
                method_box = gr.Dropdown(METHOD_CHOICES, value="ms-if", label="Method", elem_id="method",
                                         info="MS-IF: multi-stage influence; SS-IF: single-stage (fine-tuned model "
                                              "only); GDP: gradient dot product; RepSim: hidden-state similarity; "
                                              "BM25: word overlap")
                damping_box = gr.Number(value=DEFAULT_DAMPING, label="Damping (relative: × mean eigenvalue per module)",
                                        elem_id="damping")  # no bounds: check_damping explains
                # A Number without bounds: out-of-range values reach check_candidates, whose messages
                # name the limit (gradio's own bounds check would answer "Value 0 is less than ...").
                candidates_box = gr.Number(value=settings.default_candidates, precision=0, elem_id="candidates",
                                           label=f"Number of candidates (1 to {settings.max_candidates}, "
                                                 "retrieved from the index)")
                mlp_box = gr.Checkbox(value=False, label="MLP modules only", elem_id="mlp-only")
        status_box = gr.Markdown("", elem_id="status")
        with gr.Tabs():
            with gr.Tab("Ranked documents"):
                results_box = gr.Dataframe(headers=RESULT_COLUMNS, datatype=RESULT_TYPES, interactive=False,
                                           wrap=True, elem_id="results", label="Top documents",
                                           column_widths=["6%", "10%", "9%", "8%", "9%", "12%", "46%"])
                gr.Markdown("**Influence of the top documents by layer and role.** Each bar is a document's "
                            "relative score split into its parts (MLP in oranges, attention in blues; they sum "
                            "to the relative score).")
                # No label: with one, gradio's fixed-height block clips the legend under the plot.
                chart_box = gr.BarPlot(x="document", y="influence", color="part", elem_id="chart", show_label=False,
                                       x_title="document", y_title="relative influence", color_title="part",
                                       height=420)
                with gr.Accordion("Full result (JSON)", open=False):
                    json_box = gr.JSON(elem_id="result-json")
            with gr.Tab("Compare methods"):
                gr.Markdown("Ranks the **same candidates** with all five methods; each column lists one method's "
                            "top documents.")
                compare_button = gr.Button("Compare methods", variant="primary", elem_id="compare")
                compare_box = gr.Dataframe(headers=["rank", *METHOD_LABELS.values()],
                                           datatype=["number"] + ["markdown"] * len(METHOD_LABELS),
                                           interactive=False, wrap=True, elem_id="compare-results",
                                           label="Top documents per method",
                                           column_widths=["6%"] + ["18.8%"] * len(METHOD_LABELS), max_height=900)
                compare_json = gr.JSON(visible=False)

        def on_generate(prompt: str, request: gr.Request, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            return run_guarded(request, generate, prompt, progress=progress)

        def on_attribute(prompt: str, answer: str, method: str, damping: float, candidates: int, mlp_only: bool,
                         request: gr.Request, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            return run_guarded(request, attribute, prompt, answer, method, damping, candidates, mlp_only,
                               progress=progress)

        def on_compare(prompt: str, answer: str, damping: float, candidates: int, mlp_only: bool,
                       request: gr.Request, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            return run_guarded(request, compare, prompt, answer, damping, candidates, mlp_only, progress=progress)

        # A new question makes the old answer stale.
        prompt_box.change(lambda: "", None, answer_box, api_visibility="private", queue=False)
        # Progress (and gradio's "Error" badge) show on the main output only, never over the answer
        # box the visitor may want to edit; the message itself goes to a toast and the status line.
        events = [
            generate_button.click(on_generate, [prompt_box], [answer_box, status_box], api_name="generate",
                                  show_progress_on=[answer_box]),
            attribute_button.click(on_attribute, [prompt_box, answer_box, method_box, damping_box, candidates_box,
                                                  mlp_box],
                                   [answer_box, results_box, chart_box, status_box, json_box], api_name="attribute",
                                   show_progress_on=[results_box]),
            compare_button.click(on_compare, [prompt_box, answer_box, damping_box, candidates_box, mlp_box],
                                 [answer_box, compare_box, status_box, compare_json], api_name="compare",
                                 show_progress_on=[compare_box]),
        ]
        for event in events:
            event.failure(show_error, None, status_box, api_visibility="private")
    app.queue(default_concurrency_limit=settings.concurrency, max_size=settings.queue_size)
    app.msif_backend = backend  # for tests and callers that want to preload
    return app


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------


def default_cache() -> Path:
    """``HUB_MSIF_CACHE``, else ``/data/hub_msif`` (a Space's persistent storage), else ``~/.cache/hub_msif``."""
    if os.environ.get("HUB_MSIF_CACHE"):
        return Path(os.environ["HUB_MSIF_CACHE"])
    if Path("/data").is_dir() and os.access("/data", os.W_OK):
        return Path("/data/hub_msif")
    return Path.home() / ".cache" / "hub_msif"


def demo_app(cache: str | Path, settings: SpaceSettings | None = None) -> gr.Blocks:
    """The app over the toy fact world (built or reused in ``cache``), with its example questions."""
    from hub_msif.toy.demo import example_queries, prepare

    artifacts = prepare(cache)
    return build_app(artifacts["factors"], artifacts["index"], example_queries(artifacts["world"]), settings,
                     title="MS-IF attribution: toy fact world")


def serve_demo(cache: str | Path, port: int | None = None, settings: SpaceSettings | None = None) -> tuple[gr.Blocks, str]:
    """Builds the fact-world app and serves it on 127.0.0.1 without blocking; returns (app, URL).

    ``port`` None takes ``GRADIO_SERVER_PORT`` or the first free port from 7860. Call
    ``app.block_thread()`` to keep serving until interrupted, ``app.close()`` to stop.
    """
    app = demo_app(cache, settings)
    app.launch(server_name="127.0.0.1", server_port=port, share=False, prevent_thread_lock=True, quiet=True)
    return app, app.local_url


def main(environ: dict | None = None) -> None:
    """The Space entry point: ``MSIF_FACTORS`` and ``MSIF_INDEX`` (``REPO[@REV]`` or folders), limits
    from ``MSIF_*`` (see ``SpaceSettings``). Without them it serves the toy fact world demo."""
    environ = os.environ if environ is None else environ
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = SpaceSettings.from_env(environ)
    factors, index = environ.get("MSIF_FACTORS", "").strip(), environ.get("MSIF_INDEX", "").strip()
    if bool(factors) != bool(index):
        raise SystemExit("set both MSIF_FACTORS and MSIF_INDEX (REPO[@REV] or a folder), or neither for the demo")
    if factors:
        app = build_app(factors, index, settings=settings)
    else:
        logger.info("MSIF_FACTORS and MSIF_INDEX are not set: serving the toy fact world demo")
        app = demo_app(default_cache() / "demo", settings)
    on_hub = bool(environ.get("SPACE_ID"))
    host = environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_hub else "127.0.0.1")
    port = int(environ.get("GRADIO_SERVER_PORT") or 7860)
    app.launch(server_name=host, server_port=port, share=False)


__all__ = ["Backend", "SpaceError", "SpaceSettings", "build_app", "demo_app", "main", "serve_demo"]

