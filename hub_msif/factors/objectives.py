"""Losses: the per-sequence language-modelling loss with sampled or true labels.

Batches follow the transformers convention: ``labels`` is aligned with ``input_ids`` (the label
of position t is the token at t, predicted from positions < t), ``-100`` marks tokens that carry
no loss, and ``attention_mask`` is 0 on padding. The shift by one happens here, exactly once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hub_msif.errors import MsifValueError
from hub_msif.factors.config import LABEL_MODES


def sequence_seed(seed: int, pass_index: int, sequence_index: int) -> int:
    """A seed for one sequence's label sample that depends neither on batching nor on processes."""
    return (seed * 1_000_003 + pass_index * 999_983 + sequence_index) % (2**63 - 1)


def shifted_targets(batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets for ``logits[:, :-1]`` (``[B, T-1]``) and the mask of positions that carry loss."""
    targets = batch["labels"][:, 1:]
    valid = (targets != -100) & batch["attention_mask"][:, 1:].bool()
    return targets, valid


@torch.no_grad()
def sample_targets(
    logits: torch.Tensor, valid: torch.Tensor, sequence_index: torch.Tensor, seed: int, pass_index: int
) -> torch.Tensor:
    """One label per valid position, drawn from the model's predictive distribution.

    ``logits`` is ``[B, T-1, V]`` (already aligned with the targets). Each sequence uses its own
    generator seeded by its global index, so the sample is the same under any batch size, any
    number of processes and after a resume.
    """
    targets = torch.full(valid.shape, -100, dtype=torch.long, device=logits.device)
    for row in range(logits.shape[0]):
        positions = valid[row].nonzero(as_tuple=True)[0]
        if positions.numel() == 0:
            continue
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(sequence_seed(seed, pass_index, int(sequence_index[row])))
        # Inverse-CDF sampling: one uniform draw per position (multinomial draws one per
        # vocabulary entry and was the largest single-threaded cost of a fit). float64, because a
        # float32 running sum near 1 drops tail probabilities below ~6e-8, and rare labels are
        # exactly the ones with large gradients.
        cdf = torch.softmax(logits[row, positions].double(), dim=-1).cumsum(-1)  # [P, V]
        uniform = torch.rand(cdf.shape[0], 1, generator=generator, device=logits.device, dtype=torch.float64)
        uniform = uniform * cdf[:, -1:]
        targets[row, positions] = torch.searchsorted(cdf, uniform).squeeze(1).clamp_(max=cdf.shape[1] - 1)
    return targets


def lm_loss(
    logits: torch.Tensor,
    batch: dict,
    label_mode: str = "empirical",
    seed: int = 0,
    pass_index: int = 0,
) -> torch.Tensor:
    """Summed (over sequences and positions) next-token loss of a batch.

    ``label_mode="empirical"`` uses the true labels; ``"sampled"`` draws labels from the model
    (the true Fisher, equal to the Gauss-Newton matrix for cross-entropy). Summing, not
    averaging, makes each sequence's gradient the gradient of its own summed loss.
    """
    if label_mode not in LABEL_MODES:
        raise MsifValueError(f"unknown label mode {label_mode!r}; use one of {', '.join(LABEL_MODES)}")
    targets, valid = shifted_targets(batch)
    logits = logits[:, :-1]
    if label_mode == "sampled":
        targets = sample_targets(logits, valid, batch["sequence_index"], seed, pass_index)
    if not valid.any():
        return logits.sum() * 0.0
    picked = logits[valid]
    if picked.dtype in (torch.float16, torch.bfloat16):
        picked = picked.float()
    return F.cross_entropy(picked, targets[valid], reduction="sum")
