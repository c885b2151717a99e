"""Losses and label sampling: the one-token shift, masking, and per-sequence sampling."""

import torch
from conftest import random_sequences

from hub_msif.data import collate
from hub_msif.factors.objectives import lm_loss, sample_targets
from hub_msif.toy.examples import tiny_model


def test_empirical_loss_equals_transformers_loss_summed():
    """transformers shifts labels inside the model; lm_loss shifts exactly once as well."""
    model = tiny_model("gpt_neox", dtype=torch.float64)
    sequences = random_sequences(5, 64, seed=1, prompt_len=2)
    batch = collate(sequences, range(5), pad_id=0)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = lm_loss(logits, batch, "empirical")
    total = 0.0
    for seq in sequences:  # each sequence alone, transformers' mean loss times its number of targets
        ids = torch.tensor([seq["input_ids"]])
        labels = torch.tensor([seq["labels"]])
        n_targets = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=labels).loss) * n_targets
    # transformers computes its loss in float32, hence 1e-6 and not float64 precision.
    assert abs(float(ours) - total) < 1e-6 * abs(total)
    # The bug of shifting twice (labels pre-shifted and shifted again) is far outside that tolerance
    # (about 3e-3 relative even on this random-init model, whose predictions are nearly uniform).
    twice = dict(batch, labels=torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100))
    assert abs(float(lm_loss(logits, twice, "empirical")) - total) > 1e-3 * abs(total)


def test_sampled_labels_follow_the_model_distribution():
    probs = torch.tensor([0.05, 0.2, 0.55, 0.02, 0.18])
    logits = probs.log().expand(1, 40000, 5).clone()
    valid = torch.ones(1, 40000, dtype=torch.bool)
    samples = sample_targets(logits, valid, torch.tensor([7]), seed=0, pass_index=0)
    frequencies = torch.bincount(samples[0], minlength=5).double() / 40000
    # 40k draws: the standard error of each frequency is below 0.0025; 0.01 is four of them.
    assert torch.allclose(frequencies, probs.double(), atol=0.01), frequencies


def test_samples_depend_on_sequence_index_not_on_batching():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 0]], dtype=torch.bool)
    together = sample_targets(logits, valid, torch.tensor([10, 11, 12]), seed=3, pass_index=1)
    alone = torch.cat([sample_targets(logits[i : i + 1], valid[i : i + 1], torch.tensor([10 + i]), 3, 1)
                       for i in range(3)])
    assert torch.equal(together, alone)
    assert (together[~valid] == -100).all() and (together[valid] >= 0).all()
    other_pass = sample_targets(logits, valid, torch.tensor([10, 11, 12]), seed=3, pass_index=0)
    assert not torch.equal(together, other_pass)
