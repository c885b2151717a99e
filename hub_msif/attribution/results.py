"""Typed results of an attribution, ready to present (docs/design.md, "Scores and their sign").

``Attribution`` is one query's ranking by one method (and damping); its ``rows`` are the top
documents (the strongest proponents) and its ``opponents`` the most negative ones. Everything a table or chart shows is computed here once: raw and relative scores, the
per-module / per-layer / per-role breakdowns (raw, and relative to the largest ``|score|`` among
all candidates), and optional per-token shares. Presenters (CLI, Space, benchmarks) only format.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

ROLE_GROUPS = ("mlp", "attention")


def layer_of(name: str) -> int | None:
    """The decoder layer index in a module name (``gpt_neox.layers.3.mlp...`` -> 3), if any."""
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def role_group(role: str) -> str:
    """``mlp`` for MLP modules, ``attention`` for the attention projections (q/k/v and output)."""
    return "mlp" if role == "mlp" else "attention"


@dataclass
class TokenShare:
    """One candidate token and its share of the candidate's score (the shares sum to the score)."""

    token: str
    share: float


@dataclass
class ResultRow:
    """One ranked document.

    ``score`` is the raw score (positive: the document supports the answer); ``relative_score``
    is it divided by the largest ``|score|`` among all candidates, in [-1, 1]. Gradient methods
    (MS-IF, SS-IF, GDP) also give ``by_module``, ``by_layer`` (keys: layer index as a string, or
    ``other``) and ``by_role`` (``mlp`` / ``attention``), each summing to ``score``;
    ``relative_by_layer_role[layer][role]`` is the same split on the relative scale (summing to
    ``relative_score``). ``tokens`` holds per-token shares when they were asked for.
    """

    rank: int
    id: str
    text: str
    score: float
    relative_score: float
    by_module: dict[str, float] | None = None
    by_layer: dict[str, float] | None = None
    by_role: dict[str, float] | None = None
    relative_by_role: dict[str, float] | None = None
    relative_by_layer_role: dict[str, dict[str, float]] | None = None
    tokens: list[TokenShare] | None = None

    def to_json(self) -> dict:
        """A JSON-ready dict; breakdowns a method does not have are left out."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Attribution:
    """One query's ranked candidates under one method and damping.

    ``damping`` is None for methods without one (RepSim, BM25); ``scale`` is the largest
    ``|score|`` among the ``num_candidates`` candidates (what ``relative_score`` divides by).
    ``rows``: the top candidates, highest score first (the strongest proponents). ``opponents``:
    the candidates with a score below 0, most negative first, at most as many as ``rows`` asked
    for; each keeps its ``rank`` among all candidates from the top (the most negative of C
    candidates has rank C), so a document has the same rank in both lists. ``answer_logprob``:
    ``sum_t log p(answer_t | prompt, answer_<t)`` under the fine-tuned model (natural log; None
    when not computed). ``stage_one``: how the candidates were found when an index was searched
    (``StageOne.to_json()``: ``source``, ``candidates``, ``searched``, ``seconds``, and the gradient
    index's recorded ``check`` recall; None for given documents). ``seconds``: wall time of this
    query's attribution, stage one included (with many queries, its share of its chunk's scoring).
    """

    prompt: str
    answer: str
    answer_generated: bool
    method: str
    modules: str
    damping: float | None
    relative_damping: bool
    num_candidates: int
    scale: float = 1.0
    rows: list[ResultRow] = field(default_factory=list)
    opponents: list[ResultRow] = field(default_factory=list)
    answer_logprob: float | None = None
    stage_one: dict | None = None
    seconds: float | None = None

    def to_json(self, timing: bool = False) -> dict:
        """A JSON-ready dict; wall times (``seconds``, ``stage_one.seconds``) only with ``timing``, so
        that the same attribution gives the same JSON."""
        out = {k: v for k, v in asdict(self).items() if k not in ("rows", "opponents")}
        if not timing:
            out.pop("seconds")
            if out.get("stage_one"):
                out["stage_one"] = {k: v for k, v in out["stage_one"].items() if k != "seconds"}
        out["rows"] = [row.to_json() for row in self.rows]
        out["opponents"] = [row.to_json() for row in self.opponents]
        return out


def breakdown(by_module: Mapping[str, float], roles: Mapping[str, str]) -> tuple[dict, dict, dict]:
    """Per-layer, per-role and per-(layer, role) sums of per-module scores.

    ``roles`` maps module names to their role (``mlp``, ``attn_qkv``, ``attn_out``).
    """
    by_layer: dict[str, float] = {}
    by_role = dict.fromkeys(ROLE_GROUPS, 0.0)
    by_layer_role: dict[str, dict[str, float]] = {}
    for name, value in by_module.items():
        layer = layer_of(name)
        key = str(layer) if layer is not None else "other"
        group = role_group(roles[name])
        by_layer[key] = by_layer.get(key, 0.0) + value
        by_role[group] += value
        cell = by_layer_role.setdefault(key, dict.fromkeys(ROLE_GROUPS, 0.0))
        cell[group] += value
    return by_layer, by_role, by_layer_role


def make_row(rank: int, document: Mapping, score: float, scale: float, by_module: Mapping[str, float] | None,
             roles: Mapping[str, str], tokens: Sequence[TokenShare] | None = None) -> ResultRow:
    """A ``ResultRow`` with every breakdown filled in from the per-module scores."""
    row = ResultRow(rank, str(document["id"]), document["text"], score, score / scale,
                    tokens=list(tokens) if tokens is not None else None)
    if by_module is not None:
        row.by_module = dict(by_module)
        row.by_layer, row.by_role, by_layer_role = breakdown(by_module, roles)
        row.relative_by_role = {k: v / scale for k, v in row.by_role.items()}
        row.relative_by_layer_role = {layer: {k: v / scale for k, v in cell.items()}
                                      for layer, cell in by_layer_role.items()}
    return row
