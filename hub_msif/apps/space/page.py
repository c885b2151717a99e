"""The Gradio Space: attribute a fine-tuned model's answer to pre-training documents in a browser.

``build_app(factors, index, examples)`` builds the ``SpaceRequests`` (requests.py: the checks and the
handlers, testable without a page) and hands them to ``layout(requests)``, which returns a ``gr.Blocks`` page (prompt, editable answer,
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

import gradio as gr

from hub_msif.apps.space.backend import Backend
from hub_msif.apps.space.gpu import gpu_task
from hub_msif.apps.space.render import (
    COMPARE_COLUMNS,
    LOGPROB_INFO,
    LOGPROB_LABEL,
    METHOD_CHOICES,
    METHOD_LABELS,
    RESULT_COLUMNS,
    RESULT_TYPES,
    SCORE_LEGEND,
    SERVED_PENDING,
    SOURCE_CHOICES,
    ColumnType,
    empty_chart,
    empty_compare_table,
    empty_results_table,
    escape_markdown,
)
from hub_msif.apps.space.requests import EXAMPLE_BUTTONS, SpaceRequests, refusal
from hub_msif.apps.space.settings import SpaceSettings
from hub_msif.attribution.attributor import DEFAULT_DAMPING

logger = logging.getLogger(__name__)

INTRO = """# Which pre-training documents made the fine-tuned model say that?
Ask a question. The **fine-tuned** model answers it (greedily; you can edit the answer), and
**multi-stage influence functions (MS-IF)** rank candidate documents from the **pre-training**
corpus by how much training on each one supports that answer. Candidates are the documents nearest
to the question and answer in an embedding index or, when the Space has a gradient index, those
with the highest compressed MS-IF over the whole corpus. A positive score means the document supports the
answer; *relative score* is the score over the largest absolute score among the candidates.
"""


def build_app(factors, index, examples=None, settings: SpaceSettings | None = None,
              title: str = "MS-IF attribution", gradindex=None) -> gr.Blocks:
    """The Space's page and API, ready to ``launch()``.

    ``factors``: ``REPO[@REV]``, a local factor folder or an ``Attributor``; ``index``:
    ``REPO[@REV]``, an index folder or a ``DocumentIndex``. Both are loaded on first use.
    ``gradindex`` (optional): ``REPO[@REV]``, a gradient index folder or a ``GradientIndex`` of the
    pre-trained stage; the page then offers where the candidates come from (docs/design.md,
    "Gradient index").
    ``examples``: questions shown under the prompt (strings, or ``factworld.Query`` objects whose
    proponents are then marked with a star in the results). The queue admits
    ``settings.concurrency`` requests at a time and ``settings.queue_size`` waiting ones.
    """
    settings = settings or SpaceSettings()
    return layout(SpaceRequests(Backend(factors, index, device=settings.device, gradindex=gradindex), settings,
                                examples), title=title)


def layout(requests: SpaceRequests, title: str = "MS-IF attribution") -> gr.Blocks:
    """The page: its components, and its events wired to ``requests``' handlers (API ``describe``,
    ``generate``, ``attribute``, ``compare``). A failed request ends in a one-line ``gr.Error``
    (a toast, and the status line of the visitor's session) and clears what the previous one
    showed; the app keeps serving."""
    last_errors: dict[str | None, str] = {}  # session -> message of its last failed request, for the status line

    def run_guarded(request: gr.Request | None, fn, *args, progress=None):
        """Runs a handler; every failure becomes a one-line ``gr.Error`` (the log keeps tracebacks
        of unexpected ones), so the visitor sees a message and the app keeps serving."""
        try:
            return fn(*args, progress=progress)
        except Exception as err:
            message = refusal(err)
        logger.warning("request refused: %s", message)
        if request is not None:
            last_errors[request.session_hash] = message
            while len(last_errors) > 1000:  # API clients never run the failure handler that pops them
                last_errors.pop(next(iter(last_errors)))
        raise gr.Error(message, duration=None, print_exception=False)

    def on_describe(progress):
        try:
            markdown, served, questions = run_guarded(None, requests.describe, progress=progress)
        except gr.Error as err:
            return f"⚠️ **Cannot load what this Space serves:** {escape_markdown(err.message)}", None, *[gr.update()] * EXAMPLE_BUTTONS
        buttons = [gr.update(value=q, visible=True) for q in questions]
        return markdown, served, *buttons, *[gr.update()] * (EXAMPLE_BUTTONS - len(questions))

    def show_error(request: gr.Request):
        message = last_errors.pop(request.session_hash, "the request failed") if request else "the request failed"
        return f"⚠️ **Error:** {escape_markdown(message)}"

    with gr.Blocks(analytics_enabled=False, title=title) as app:
        gr.Markdown(INTRO)
        with gr.Accordion("What this Space serves", open=True, elem_id="served-panel"):
            served_box = gr.Markdown(SERVED_PENDING, elem_id="served", label="What this Space serves")
            served_json = gr.JSON(visible=False, label="What this Space serves (JSON)")
        with gr.Row():
            with gr.Column(scale=3):
                prompt_box = gr.Textbox(label="Prompt (a question for the fine-tuned model)", lines=2,
                                        elem_id="prompt", placeholder="Type a question …")
                with gr.Row():
                    answer_box = gr.Textbox(label="Answer", info="generated by the fine-tuned model; you can edit it",
                                            lines=2, elem_id="answer", scale=3,
                                            placeholder="Leave empty to use the model's greedy answer")
                    logprob_box = gr.Number(label=LOGPROB_LABEL, info=LOGPROB_INFO, interactive=False,
                                            elem_id="answer-logprob", scale=1)
                with gr.Row():
                    generate_button = gr.Button("Generate answer", elem_id="generate")
                    attribute_button = gr.Button("Attribute", variant="primary", elem_id="attribute")
                with gr.Row():  # filled at page load from the index's example questions when none are given
                    example_buttons = [gr.Button("", visible=False, size="sm", elem_id=f"example-{i}")
                                       for i in range(EXAMPLE_BUTTONS)]
                if requests.example_prompts:
                    gr.Examples(examples=[[p] for p in requests.example_prompts], inputs=[prompt_box],
                                label="Example questions" + (" (★ marks the true proponents in the results)"
                                                             if requests.known_proponents else ""))
            with gr.Column(scale=2):
                method_box = gr.Dropdown(METHOD_CHOICES, value="ms-if", label="Method", elem_id="method",
                                         info="MS-IF: multi-stage influence; SS-IF: single-stage (fine-tuned model "
                                              "only); GDP: gradient dot product; RepSim: hidden-state similarity; "
                                              "BM25: word overlap")
                damping_box = gr.Number(value=DEFAULT_DAMPING, label="Damping (relative: × mean eigenvalue per module)",
                                        elem_id="damping")  # no bounds: check_damping explains
                # A Number without bounds: out-of-range values reach check_candidates, whose messages
                # name the limit (gradio's own bounds check would answer "Value 0 is less than ...").
                candidates_box = gr.Number(value=requests.settings.default_candidates, precision=0, elem_id="candidates",
                                           label=f"Number of candidates (1 to {requests.settings.max_candidates}, "
                                                 "retrieved from the index)")
                mlp_box = gr.Checkbox(value=False, label="MLP modules only", elem_id="mlp-only")
                # Shown only when a gradient index is configured; the API's default (None) is the Space's.
                source_box = gr.Radio(SOURCE_CHOICES, value=requests.check_source(None), label="Candidates from",
                                      elem_id="candidates-from", visible=requests.backend.has_gradindex,
                                      info="the gradient index searches the whole corpus by compressed MS-IF; the "
                                           "embedding index finds the documents nearest to the question's words")
        status_box = gr.Markdown("", elem_id="status", label="Status")
        markdown: ColumnType = "markdown"
        compare_types: list[ColumnType] = ["number", *[markdown] * len(METHOD_LABELS)]
        compare_widths: list[str | int] = ["6%", *["18.8%"] * len(METHOD_LABELS)]
        with gr.Tabs():
            with gr.Tab("Ranked documents"):
                results_box = gr.Dataframe(headers=RESULT_COLUMNS, datatype=RESULT_TYPES, interactive=False,
                                           wrap=True, elem_id="results", label="Proponents (the top documents)",
                                           column_widths=["6%", "10%", "9%", "8%", "9%", "12%", "46%"])
                opponents_box = gr.Dataframe(headers=RESULT_COLUMNS, datatype=RESULT_TYPES, interactive=False,
                                             wrap=True, elem_id="opponents", label="Opponents (the most negative scores)",
                                             column_widths=["6%", "10%", "9%", "8%", "9%", "12%", "46%"])
                gr.Markdown(SCORE_LEGEND, elem_id="score-legend")
                gr.Markdown("**Where each top document's score sits.** Its tokens shaded by their share of its "
                            "score: green supports the answer, red opposes it, darker is a larger share.")
                tokens_box = gr.HTML("", elem_id="token-shares", label="Token shares of the top documents")
                gr.Markdown("**Influence of the top documents by layer and role.** Each bar is a document's "
                            "relative score split into its parts (MLP in oranges, attention in blues; they sum "
                            "to the relative score).")
                # No label: with one, gradio's fixed-height block clips the legend under the plot.
                chart_box = gr.BarPlot(x="document", y="influence", color="part", elem_id="chart", show_label=False,
                                       label="Influence by layer and role",
                                       x_title="document", y_title="relative influence", color_title="part",
                                       height=420)
                with gr.Accordion("Full result (JSON)", open=False):
                    json_box = gr.JSON(elem_id="result-json", label="Result (JSON)")
            with gr.Tab("Compare methods"):
                gr.Markdown("Ranks the **same candidates** with all five methods; each column lists one method's "
                            "top documents.")
                compare_button = gr.Button("Compare methods", variant="primary", elem_id="compare")
                compare_box = gr.Dataframe(headers=COMPARE_COLUMNS,
                                           datatype=compare_types,
                                           interactive=False, wrap=True, elem_id="compare-results",
                                           label="Top documents per method",
                                           column_widths=compare_widths, max_height=900)
                compare_json = gr.JSON(visible=False, label="Comparison summary (JSON)")

        # The model-bound handlers: on ZeroGPU hardware each runs inside spaces.GPU (gpu.py).
        @gpu_task
        def on_generate(prompt: str, request: gr.Request, progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            return run_guarded(request, requests.generate, prompt, progress=progress)

        @gpu_task
        def on_attribute(prompt: str, answer: str, method: str, damping: float, candidates: int, mlp_only: bool,
                         request: gr.Request, candidates_from: str | None = None,
                         progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            return run_guarded(request, requests.attribute, prompt, answer, method, damping, candidates, mlp_only,
                               candidates_from, progress=progress)

        @gpu_task
        def on_compare(prompt: str, answer: str, damping: float, candidates: int, mlp_only: bool,
                       request: gr.Request, candidates_from: str | None = None,
                       progress=gr.Progress(track_tqdm=True)):  # noqa: B008
            return run_guarded(request, requests.compare, prompt, answer, damping, candidates, mlp_only,
                               candidates_from, progress=progress)

        # A new question makes the old answer stale, and a new answer its log-probability.
        prompt_box.change(lambda: ("", None), None, [answer_box, logprob_box], api_visibility="private", queue=False)
        answer_box.input(lambda: None, None, logprob_box, api_visibility="private", queue=False)
        for button in example_buttons:
            button.click(lambda question: question, button, prompt_box, api_visibility="private", queue=False)
        app.load(lambda progress=gr.Progress(): on_describe(progress), None,  # noqa: B008
                 [served_box, served_json, *example_buttons], api_name="describe")
        # Progress (and gradio's "Error" badge) show on the main output only, never over the answer
        # box the visitor may want to edit; the message itself goes to a toast and the status line.
        events = [
            generate_button.click(on_generate, [prompt_box], [answer_box, status_box], api_name="generate",
                                  show_progress_on=[answer_box]),
            attribute_button.click(on_attribute, [prompt_box, answer_box, method_box, damping_box, candidates_box,
                                                  mlp_box, source_box],
                                   [answer_box, logprob_box, results_box, opponents_box, chart_box, status_box,
                                    tokens_box, json_box],
                                   api_name="attribute",
                                   show_progress_on=[results_box]),
            compare_button.click(on_compare, [prompt_box, answer_box, damping_box, candidates_box, mlp_box, source_box],
                                 [answer_box, compare_box, status_box, compare_json], api_name="compare",
                                 show_progress_on=[compare_box]),
        ]
        # A failed request also clears what the previous one showed, so no stale table or chart
        # stands under an error message.
        generate_event, attribute_event, compare_event = events
        def on_attribute_failure(request: gr.Request):
            return show_error(request), None, empty_results_table(), empty_results_table(), empty_chart(), "", None

        def on_compare_failure(request: gr.Request):
            return show_error(request), empty_compare_table(), None

        generate_event.failure(show_error, None, status_box, api_visibility="private")
        attribute_event.failure(on_attribute_failure, None, [status_box, logprob_box, results_box, opponents_box,
                                                             chart_box, tokens_box, json_box], api_visibility="private")
        compare_event.failure(on_compare_failure, None, [status_box, compare_box, compare_json],
                              api_visibility="private")
    app.queue(default_concurrency_limit=requests.settings.concurrency, max_size=requests.settings.queue_size)
    app.msif_backend = requests.backend  # for tests and callers that want to preload
    app.msif_requests = requests
    return app
