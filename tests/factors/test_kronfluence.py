"""Agreement with kronfluence 1.0.1 (an independent EK-FAC implementation) on a tiny GPT-NeoX.

Both libraries fit their own factors from the same data, with the same settings:

- modules: every linear layer of the decoder blocks (query_key_value, dense, dense_h_to_4h,
  dense_4h_to_h), bias as the last input column, no per-head split in hub_msif;
- labels: the empirical Fisher (true labels; hub_msif ``label_mode="empirical"``, kronfluence
  ``use_empirical_fisher=True``), loss = sum over tokens of next-token cross-entropy, padding and
  ``-100`` labels masked (kronfluence gets the padding mask from ``Task.get_attention_mask``);
- the eigenvalue correction from per-sequence gradients, divided by the number of sequences;
- the same absolute damping (kronfluence adds ``damping_factor`` to its normalised Lambda);
- everything in float64, so precision is not what is being compared.

Scores: ``score(q, c) = sum_l <P_l(G_q,l), G_c,l>`` with hub_msif's ``StageFactors.precondition``
on per-sequence weight gradients, against kronfluence's pairwise scores with the same
measurement (summed loss over the query's answer tokens) and the training loss of candidates.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import random_sequences

from hub_msif.data import collate
from hub_msif.factors.architectures import find_modules
from hub_msif.factors.fit import FitConfig, fit_factors
from hub_msif.toy.examples import tiny_model

pytest.importorskip("kronfluence")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.utils.dataset import DataLoaderKwargs  # noqa: E402

from bench.kronfluence_task import LanguageModelTask, collator  # noqa: E402  (the benchmarks' adapter)

VOCAB = 32
PAD_ID = 0
DAMPING = 1e-3
MODULE_LEAVES = ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")


def _summed_lm_loss(model, batch) -> torch.Tensor:
    """Sum over sequences and positions of next-token cross-entropy; -100 and padding carry none."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=-100, reduction="sum")


def _collate(items):
    return collate(items, list(range(len(items))), PAD_ID)


def _per_sequence_gradients(model, tracked, sequence) -> dict[str, torch.Tensor]:
    """Each tracked module's ``[d_out, d_in]`` gradient of one sequence's summed loss."""
    model.zero_grad(set_to_none=True)
    _summed_lm_loss(model, _collate([sequence])).backward()
    return {t.name: t.weight_gradient(model.get_submodule(t.name)).detach().clone() for t in tracked}


def test_scores_match_kronfluence(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("gpt_neox", vocab_size=VOCAB, hidden=16, layers=2, heads=2, ffn=32, seed=3,
                       dtype=torch.float64)
    fit_data = random_sequences(48, VOCAB, min_len=6, max_len=14, seed=1)
    candidates = random_sequences(10, VOCAB, min_len=4, max_len=12, seed=2)
    queries = random_sequences(3, VOCAB, min_len=7, max_len=11, seed=3, prompt_len=4)

    # --- hub_msif: fit, then precondition per-sequence gradients. --------------------------------
    config = FitConfig(batch_size=5, modules="all", split_heads=False, label_mode="empirical",
                       storage_dtype="float64", checkpoint_every=0)
    factors = fit_factors(copy.deepcopy(model), fit_data, tmp_path / "hub_msif", config, pad_id=PAD_ID,
                          info={}, show_progress=False)
    assert factors.info["fit"]["num_sequences"] == len(fit_data)
    grad_model = copy.deepcopy(model).train(False)
    for p in grad_model.parameters():
        p.requires_grad_(True)
    tracked = find_modules(grad_model, "all", split_heads=False)
    names = [t.name for t in tracked]
    assert sorted({n.split(".", 3)[-1] for n in names}) == sorted(MODULE_LEAVES)
    assert len(names) == 4 * 2

    query_grads = [_per_sequence_gradients(grad_model, tracked, q) for q in queries]
    preconditioned = [factors.precondition(g, DAMPING) for g in query_grads]
    candidate_grads = [_per_sequence_gradients(grad_model, tracked, c) for c in candidates]
    ours = torch.tensor([[sum(float((pq[n] * gc[n]).sum()) for n in names) for gc in candidate_grads]
                         for pq in preconditioned], dtype=torch.float64)

    # --- kronfluence: its own factors from the same data, then pairwise scores. ------------------
    task = LanguageModelTask(names, lambda model, batch, sample: _summed_lm_loss(model, batch), empirical_only=True)
    kf_model = prepare_model(copy.deepcopy(model), task)
    f64 = torch.float64
    factor_args = FactorArguments(
        strategy="ekfac", use_empirical_fisher=True, covariance_max_examples=None, lambda_max_examples=None,
        activation_covariance_dtype=f64, gradient_covariance_dtype=f64, eigendecomposition_dtype=f64,
        per_sample_gradient_dtype=f64, lambda_dtype=f64,
    )
    score_args = ScoreArguments(damping_factor=DAMPING, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                                score_dtype=f64)
    loader_kwargs = DataLoaderKwargs(num_workers=0, collate_fn=collator(PAD_ID))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analyzer = Analyzer("agreement", kf_model, task, cpu=True, disable_tqdm=True, disable_model_save=True,
                            output_dir=str(tmp_path / "kronfluence"), log_level=logging.WARNING)
        analyzer.fit_all_factors("ekfac", fit_data, per_device_batch_size=5, dataloader_kwargs=loader_kwargs,
                                 factor_args=factor_args)
        analyzer.compute_pairwise_scores("scores", "ekfac", queries, candidates, per_device_query_batch_size=2,
                                         per_device_train_batch_size=4, dataloader_kwargs=loader_kwargs,
                                         score_args=score_args)
    theirs = analyzer.load_pairwise_scores("scores")["all_modules"].to(f64)

    # kronfluence really fitted its own factors, with per-sequence (not per-batch) Lambda counts.
    lambdas = analyzer.load_lambda_matrices("ekfac")
    assert set(lambdas["lambda_matrix"]) == set(names)
    assert all(int(c) == len(fit_data) for c in lambdas["num_lambda_processed"].values())
    for name in names:
        ours_lam = factors.modules[name].lam[0]
        theirs_lam = lambdas["lambda_matrix"][name].to(f64) / len(fit_data)
        assert torch.allclose(ours_lam, theirs_lam, rtol=1e-6, atol=1e-10 * float(theirs_lam.abs().max())), name

    assert theirs.shape == ours.shape == (len(queries), len(candidates))
    scale = float(theirs.abs().max())
    assert scale > 0
    relative_error = float((ours - theirs).abs().max()) / scale
    correlation = float(torch.corrcoef(torch.stack([ours.flatten(), theirs.flatten()]))[0, 1])
    print(f"relative error {relative_error:.3e}, correlation {correlation:.12f}")
    assert relative_error <= 1e-4, f"max |hub_msif - kronfluence| / max |kronfluence| = {relative_error:.3e}"
    assert correlation > 1 - 1e-8, f"correlation {correlation}"
    # Non-trivial: the preconditioner matters (scores differ from plain gradient dot products).
    plain = torch.tensor([[sum(float((gq[n] * gc[n]).sum()) for n in names) for gc in candidate_grads]
                          for gq in query_grads], dtype=torch.float64)
    plain_corr = float(torch.corrcoef(torch.stack([plain.flatten(), theirs.flatten()]))[0, 1])
    assert plain_corr < 0.999
