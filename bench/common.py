"""What several benchmarks share: random token data and batches, a plain forward/backward pass,
clocks, score correlations, verdicts, and what they record about the machine they ran on.

torch is imported inside the functions that need it, so that ``bench.report`` (and any script that
must set environment variables before torch loads) can import this module first.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

PAD_ID = 0
ROOT = Path(__file__).resolve().parents[1]  # the repository: the cwd of ``python -m bench.NAME`` subprocesses


# --- machine -------------------------------------------------------------------------------------

def machine_info() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "kronfluence"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001
            versions[name] = None
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), **versions}


# --- data ----------------------------------------------------------------------------------------

def make_sequences(n: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """``n`` random token sequences whose own tokens are the labels (candidates, fitting data)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (n, length), generator=generator)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def batches(sequences: list[dict], batch_size: int, pad_id: int = PAD_ID):
    """Collated batches of ``batch_size`` sequences in order, each with its sequences' global indices."""
    from hub_msif.data import collate

    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        yield collate(chunk, range(start, start + len(chunk)), pad_id)


# --- measurements --------------------------------------------------------------------------------

class Clock:
    """Wall-clock seconds and this process's CPU seconds (all threads) since creation."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict:
        return {"seconds": time.perf_counter() - self.wall, "cpu_seconds": time.process_time() - self.cpu}


def plain_pass(model, sequences: list[dict], batch_size: int) -> None:
    """The floor: forward, summed loss (same as scoring's), backward with parameter gradients."""
    from hub_msif.factors.objectives import lm_loss

    for p in model.parameters():
        p.requires_grad_(True)
    for batch in batches(sequences, batch_size):
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        lm_loss(logits, batch, "empirical").backward()
    model.zero_grad(set_to_none=True)


# --- correlations --------------------------------------------------------------------------------

def pooled_correlations(ours, theirs) -> dict:
    """Pearson over all (query, candidate) pairs and mean per-query Spearman; both ``[Q, C]``
    (continuous scores: ranks by argsort, no ties to speak of)."""
    import torch

    ours, theirs = ours.double(), theirs.double()
    pearson = float(torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1])

    def ranks(x):  # [Q, C] -> ranks along C
        return x.argsort(dim=1).argsort(dim=1).double()

    spearman = [float(torch.corrcoef(torch.stack([a, b]))[0, 1]) for a, b in zip(ranks(ours), ranks(theirs), strict=True)]
    scale = float(theirs.abs().max()) or 1.0
    return {"pearson": pearson, "spearman_mean": statistics.fmean(spearman),
            "max_abs_difference_over_max_abs": float((ours - theirs).abs().max()) / scale}


def _ranks(x):
    import torch
    from scipy.stats import rankdata

    return torch.as_tensor(rankdata(x.numpy()), dtype=torch.float64)


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def per_query_correlations(scores, truth) -> dict:
    """Per-query Spearman (ties ranked by their mean rank) and Pearson of ``scores`` against
    ``truth`` (both ``[Q, C]``): means, standard deviations and the per-query values."""
    import torch

    sp = [_pearson(_ranks(s), _ranks(t)) for s, t in zip(scores, truth)]
    pe = [_pearson(s, t) for s, t in zip(scores, truth)]
    sp_t, pe_t = torch.tensor(sp), torch.tensor(pe)
    return {"spearman_mean": float(sp_t.mean()), "spearman_std": float(sp_t.std()),
            "pearson_mean": float(pe_t.mean()), "pearson_std": float(pe_t.std()),
            "spearman_per_query": sp, "pearson_per_query": pe}


# --- verdicts ------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    """A target's verdict in a benchmark's JSON."""
    return "pass" if ok else "MISS"


def target_verdict(value: float | None, target: float, higher_is_better: bool = False, digits: int = 2) -> str:
    """A target's verdict in docs/benchmarks.md: met, or missed with the measured value."""
    if value is None:
        return "not measured"
    met = value >= target if higher_is_better else value <= target
    sign = ">=" if higher_is_better else "<="
    return f"{sign} {target:g}: met" if met else f"{sign} {target:g}: **missed** ({value:.{digits}f})"
