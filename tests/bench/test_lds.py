"""The counterfactual statistics (bench.lds): LDS, Spearman, bootstrap, removal summary."""

import numpy as np
import pytest
from scipy import stats

from bench import lds
from hub_msif.errors import MsifValueError


def _setup(seed=0, docs=60, queries=40, subsets=32):
    rng = np.random.default_rng(seed)
    effects = rng.normal(size=(docs, queries))  # each document's true additive effect per query
    masks = np.zeros((subsets, docs), dtype=np.int8)
    for m in range(subsets):
        masks[m, rng.choice(docs, docs // 2, replace=False)] = 1
    return rng, effects, masks


def test_spearman_matches_scipy_with_and_without_ties():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=25), rng.normal(size=25)
    assert lds.spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    xt, yt = np.round(x), np.round(y * 2)  # many ties: average ranks
    assert lds.spearman(xt, yt) == pytest.approx(stats.spearmanr(xt, yt).statistic, abs=1e-12)
    assert np.isnan(lds.spearman(np.ones(5), np.arange(5.0)))  # constant: undefined, not 0
    with pytest.raises(MsifValueError, match="same length"):
        lds.spearman([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(MsifValueError, match="non-finite"):
        lds.spearman([1.0, np.nan], [1.0, 2.0])


def test_predicted_effect_is_the_sum_over_kept_documents():
    rng, effects, masks = _setup(docs=7, queries=3, subsets=4)
    predicted = lds.predicted_effects(effects, masks)
    for m in range(4):
        for q in range(3):
            assert predicted[m, q] == pytest.approx(sum(effects[d, q] for d in range(7) if masks[m, d]))
    with pytest.raises(MsifValueError, match="do not match"):
        lds.predicted_effects(effects, masks[:, :5])


def test_oracle_score_has_lds_one_and_its_negative_minus_one():
    _, effects, masks = _setup()
    measured = masks @ effects + 3.0  # the measured log-prob is the true additive effect (plus a constant)
    assert np.allclose(lds.lds_per_query(effects, masks, measured), 1.0)
    assert np.allclose(lds.lds_per_query(-effects, masks, measured), -1.0)
    # A monotone transform of the measured effect does not change a rank correlation.
    assert np.allclose(lds.lds_per_query(effects, masks, np.exp(measured / 10)), 1.0)


def test_noisy_oracle_is_positive_but_below_one():
    rng, effects, masks = _setup()
    measured = masks @ effects + rng.normal(scale=3.0, size=(masks.shape[0], effects.shape[1]))
    per_query = lds.lds_per_query(effects, masks, measured)
    assert 0.3 < per_query.mean() < 0.95


def test_random_score_has_lds_about_zero():
    """Under the null (score independent of the outcome), each query's Spearman over M = 32 subsets
    has mean 0 and standard deviation 1/sqrt(M - 1); the mean over Q = 400 queries has standard
    deviation 1/sqrt((M - 1) Q) = 0.009. Bound: 4 of those."""
    rng, effects, masks = _setup(seed=3, docs=80, queries=400)
    measured = masks @ effects
    random_scores = rng.normal(size=effects.shape)
    per_query = lds.lds_per_query(random_scores, masks, measured)
    bound = 4 / np.sqrt((masks.shape[0] - 1) * per_query.size)
    assert abs(per_query.mean()) < bound
    assert 0.7 / np.sqrt(31) < per_query.std() < 1.3 / np.sqrt(31)  # the null's spread, not a degenerate 0


def test_bootstrap_ci_covers_the_mean_and_the_truth_about_95_percent():
    rng = np.random.default_rng(5)
    values = rng.normal(loc=0.4, size=50)
    lo, hi = lds.bootstrap_ci(values, seed=1)
    assert lo < values.mean() < hi
    # Coverage of the true mean over 200 independent samples: binomial(200, 0.95) has sd 3.1%;
    # the percentile bootstrap undercovers slightly at n = 30.
    covered = 0
    for rep in range(200):
        sample = rng.normal(loc=1.0, scale=2.0, size=30)
        lo, hi = lds.bootstrap_ci(sample, samples=1000, seed=rep)
        covered += lo <= 1.0 <= hi
    assert 0.87 <= covered / 200 <= 0.99
    with pytest.raises(MsifValueError, match="finite"):
        lds.bootstrap_ci([1.0, np.inf])


def test_summarize_drops_undefined_queries_and_reports_them():
    summary = lds.summarize_lds([0.5, np.nan, 0.1, 0.3])
    assert summary["mean"] == pytest.approx(0.3) and summary["queries"] == 3 and summary["dropped"] == 1
    assert summary["ci"][0] <= 0.3 <= summary["ci"][1]
    with pytest.raises(MsifValueError, match="no query"):
        lds.summarize_lds([np.nan, np.nan])


def test_top_k_and_removal_summary():
    assert lds.top_k([0.1, 5.0, -2.0, 5.0, 3.0], 3) == [1, 3, 4]
    summary = lds.removal_summary([1.0, 2.0, 0.5, 0.2], [3.0, 2.5, 0.5, 0.1],
                                  [True, True, False, True], [False, True, False, False])
    assert summary["loss_increase"] == pytest.approx((2.0 + 0.5 + 0.0 - 0.1) / 4)
    assert summary["flip_rate"] == pytest.approx(2 / 3) and summary["right_before"] == 3
    assert lds.removal_summary([1.0], [2.0], [False], [False])["flip_rate"] is None  # nothing right to flip


def test_reciprocal_rank_of_the_best_ranked_relevant_document():
    scores = [0.1, 0.9, 0.5, 0.9, -1.0]
    assert lds.reciprocal_rank(scores, {2}) == pytest.approx(1 / 3)  # order 1, 3, 2, 0, 4
    assert lds.reciprocal_rank(scores, {3, 4}) == pytest.approx(1 / 2)  # tie 0.9: index 1 first
    assert lds.reciprocal_rank(scores, {4, 0}) == pytest.approx(1 / 4)
    assert lds.reciprocal_rank(scores, set()) == 0.0
    with pytest.raises(MsifValueError):
        lds.reciprocal_rank([0.0, float("nan")], {0})
