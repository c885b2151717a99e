"""How results look in the page: highlighted snippets, the ranked table, the chart by layer and role.

Everything shown comes from the typed rows of ``hub_msif.attribution.results``; nothing here
recomputes a score, a scale or a sum beyond grouping layers into bands.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Literal

import gradio as gr
import pandas as pd

from hub_msif.attribution.results import Attribution, ResultRow

logger = logging.getLogger(__name__)


METHOD_CHOICES = [("MS-IF", "ms-if"), ("SS-IF", "ss-if"), ("GDP", "gdp"), ("RepSim", "repsim"), ("BM25", "bm25")]
METHOD_LABELS = dict((value, label) for label, value in METHOD_CHOICES)
SOURCE_CHOICES = [("Gradient index (whole corpus)", "gradient"), ("Embedding index", "embedding"),
                  ("Both (union)", "both")]
SOURCE_TEXT = {"embedding": "nearest by sentence embedding", "gradient": "from the whole corpus by the gradient index",
               "both": "the union of the embedding and gradient indexes' tops"}
RESULT_COLUMNS = ["rank", "score", "relative score", "MLP", "attention", "document", "text"]
COMPARE_COLUMNS = ["rank", *METHOD_LABELS.values()]
ColumnType = Literal["str", "number", "bool", "date", "markdown", "html"]  # a gr.Dataframe datatype
RESULT_TYPES: list[ColumnType] = ["number", "str", "number", "number", "number", "markdown", "markdown"]
MAX_CHART_DOCUMENTS = 10
MAX_CHART_BANDS = 6  # layers are grouped into at most this many bands per role, so colours stay readable
PROPONENT_MARK = "★"
SCORE_LEGEND = ("**score**: the raw influence, how much the answer's loss (in nats) falls per unit of a "
                "(preconditioned) training step on the document; positive supports the answer, negative opposes it. "
                "**relative score**: the score over the largest |score| among all candidates, in [-1, 1]. "
                "**Opponents**: the candidates with the most negative scores, most negative first; their rank is "
                "among all candidates from the top.")
LOGPROB_LABEL = "Answer log-probability"
LOGPROB_INFO = "log p(answer | prompt) under the fine-tuned model, summed over the answer's tokens (natural log)"
SERVED_PENDING = "*Loading the factors, the model pair and the document index …*"
_SUPPORT_RGB, _OPPOSE_RGB = "22, 163, 74", "220, 38, 38"  # green for positive shares, red for negative ones
_WORD_START = ("Ġ", "▁")  # how byte-level BPE and SentencePiece pieces mark a space before a word
STOPWORDS = frozenset(
    "a an the of in on at to for and or not is are was were be been being by with as from that this these those it its "
    "what which who whom whose where when why how does do did has have had can could will would should may might "
    "there their they them he she his her you your we our i me my".split()
)
_WORD = re.compile(r"[^\W_]+")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$&])")




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


def results_table(result: Attribution, terms: set[str], proponents: AbstractSet[str] = frozenset(),
                  opponents: bool = False) -> pd.DataFrame:
    """The ranked table: rank, score, relative score, MLP and attention parts, document id, snippet;
    of the top documents, or with ``opponents`` of the most negative ones (most negative first)."""
    rows = []
    for row in (result.opponents if opponents else result.rows):
        parts = row.relative_by_role or {}
        mark = f" {PROPONENT_MARK}" if row.id in proponents else ""
        rows.append([row.rank, f"{row.score:.4g}", _round(row.relative_score, 3), _round(parts.get("mlp"), 3),
                     _round(parts.get("attention"), 3), f"{escape_markdown(row.id)}{mark}", highlight(row.text, terms)])
    return pd.DataFrame(rows, columns=RESULT_COLUMNS)


def compare_table(results: dict[str, Attribution], terms: set[str], proponents: set[str]) -> pd.DataFrame:
    """All methods' top documents side by side: one row per rank, one column per method."""
    table = []
    for rank in range(max(len(r.rows) for r in results.values())):
        line: list[int | str] = [rank + 1]
        for method in METHOD_LABELS:
            rows = results[method].rows
            if rank < len(rows):
                row = rows[rank]
                mark = f" {PROPONENT_MARK}" if row.id in proponents else ""
                line.append(f"{escape_markdown(row.id)}{mark}: {highlight(row.text, terms, 80)}")
            else:
                line.append("")
        table.append(line)
    return pd.DataFrame(table, columns=COMPARE_COLUMNS)


def served_markdown(served: dict) -> str:
    """The "what this Space serves" panel from ``Backend.describe()``: both models (id@revision),
    each stage's factor location, the index's location and its corpus size, and the gradient index
    when there is one (its location, size, projection and recorded check)."""
    def code(text) -> str:
        return f"`{str(text).replace('`', chr(39))}`"

    lines = ["| | what this Space serves |", "|---|---|"]
    for stage, name in (("pretrained", "pre-trained"), ("finetuned", "fine-tuned")):
        lines.append(f"| {name} model | {code(served['models'][stage])} |")
    for stage, name in (("pretrained", "pre-trained"), ("finetuned", "fine-tuned")):
        lines.append(f"| {name} stage's factors | {code(served['factors'][stage])} |")
    lines.append(f"| document index | {code(served['index'])}: {served['documents']} documents of "
                 f"{code(served['corpus'])} |")
    gradindex = served.get("gradindex")
    if gradindex:
        check = gradindex.get("check") or {}
        recall = (f"; its last check: recall@10 {check['recall_at_10']:.3f} of exact MS-IF's top 10 in its top 100"
                  if isinstance(check.get("recall_at_10"), (int, float)) else "")
        lines.append(f"| gradient index | {code(gradindex['location'])}: {gradindex['documents']} documents, "
                     f"{gradindex['dims']} numbers each (projection {escape_markdown(str(gradindex['projection']))})"
                     f"{recall} |")
    lines.append(f"| modules | {escape_markdown(str(served.get('modules', 'all')))} |")
    return "\n".join(lines)


def answer_logprob_value(result: Attribution) -> float | None:
    """The answer's log-probability as the page's number box shows it (6 significant digits)."""
    return _round(result.answer_logprob, 6)


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


def empty_results_table() -> pd.DataFrame:
    return pd.DataFrame([], columns=RESULT_COLUMNS)


def empty_compare_table() -> pd.DataFrame:
    return pd.DataFrame([], columns=COMPARE_COLUMNS)


def empty_chart() -> gr.BarPlot:
    # No value at all: an empty frame would keep the last run's colour map and legend.
    return gr.BarPlot(value=None)


def _piece_texts(tokens: list[str]) -> list[str]:
    """Display text of each token piece: byte-level BPE and SentencePiece markers become spaces;
    pieces of a tokenizer without such markers (word-level) are separated by spaces."""
    marked = any(t.startswith(_WORD_START) for t in tokens)
    if not marked:
        return [("" if i == 0 else " ") + t for i, t in enumerate(tokens)]
    return [(" " + t[1:] if t.startswith(_WORD_START) else t).replace("Ċ", "\n") for t in tokens]


def token_shading(row: ResultRow) -> str:
    """HTML of a document's tokens, each shaded by its share of the document's score: green for
    positive shares (supporting the answer), red for negative ones, opacity by ``|share|`` over the
    largest ``|share|`` of the document; each token's share is in its title. Empty without shares."""
    if not row.tokens:
        return ""
    largest = max((abs(t.share) for t in row.tokens if math.isfinite(t.share)), default=0.0) or 1.0
    spans = []
    for piece, token in zip(_piece_texts([t.token for t in row.tokens]), row.tokens):
        strength = min(1.0, abs(token.share) / largest) if math.isfinite(token.share) else 0.0
        rgb = _SUPPORT_RGB if token.share >= 0 else _OPPOSE_RGB
        spans.append(f'<span class="msif-token" data-share="{token.share:.6g}" title="share {token.share:.4g}" '
                     f'style="background-color: rgba({rgb}, {strength * 0.85:.3f})">{html.escape(piece)}</span>')
    return "".join(spans)


def token_shading_html(result: Attribution, limit: int = MAX_CHART_DOCUMENTS) -> str:
    """The top documents' tokens shaded by their shares of the score (``token_shading``), one
    paragraph per document; a note when the method gives no token shares."""
    rows = [row for row in result.rows[:limit] if row.tokens]
    if not rows:
        return '<p class="msif-no-tokens">This method gives no per-token shares.</p>'
    parts = ['<div class="msif-token-shares" style="line-height: 1.9">']
    for row in rows:
        parts.append(f'<p class="msif-document" data-id="{html.escape(row.id)}"><b>{row.rank}. {html.escape(row.id)}</b> '
                     f'(score {row.score:.4g}): {token_shading(row)}</p>')
    parts.append("</div>")
    return "".join(parts)
