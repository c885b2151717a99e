"""Baseline scores that need no factors: RepSim and BM25 (docs/design.md, "Scores and their sign")."""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from hub_msif.data import collate
from hub_msif.errors import MsifValueError

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (not characters)."""
    return _WORD.findall(text.lower())


def bm25_scores(query: str, documents: Sequence[str]) -> list[float]:
    """BM25Plus scores of ``documents`` for ``query`` over word tokens (statistics from ``documents``)."""
    from rank_bm25 import BM25Plus

    if not documents:
        raise MsifValueError("no documents to score")
    tokenized = [words(d) or [""] for d in documents]
    return [float(s) for s in BM25Plus(tokenized).get_scores(words(query))]


@torch.no_grad()
def mean_hidden_states(model, sequences: Sequence[dict], pad_id: int, batch_size: int = 16) -> torch.Tensor:
    """Mean over real tokens of the last decoder layer's hidden states, ``[N, hidden]`` (float32)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        batch = collate(chunk, range(len(chunk)), pad_id, device)
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True, use_cache=False)
        out.append(mean_last_hidden(outputs, batch["attention_mask"]))
    return torch.cat(out)


def mean_last_hidden(outputs, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, hidden]`` float32 on the CPU: the last hidden states of a forward pass run with
    ``output_hidden_states=True``, averaged over real tokens. Scoring passes call it too, so RepSim
    needs no forward pass of its own."""
    hidden = outputs.hidden_states[-1].detach().float()
    mask = attention_mask.unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)).cpu()


def repsim_scores(query_vectors: torch.Tensor, candidate_vectors: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[C, Q]`` between candidate and query representations."""
    q = torch.nn.functional.normalize(query_vectors.double(), dim=-1)
    c = torch.nn.functional.normalize(candidate_vectors.double(), dim=-1)
    return c @ q.t()
