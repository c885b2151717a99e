"""MS-IF, SS-IF and GDP scores against slow references (docs/design.md, "Preconditioning and damping", "Scores and their sign").

Two different float64 tiny models of one architecture (seeds 0 and 1) play the pre-trained and
the fine-tuned model; each stage's EK-FAC factors are fitted with ``fit_factors`` on its own data
into one folder and loaded back with ``load_stage``.

The references never use the fast path's hooks: every query and candidate runs through the model
alone (batch of one, no padding), its summed loss is written out here with ``cross_entropy``,
``backward`` fills the parameters' ``.grad`` and ``TrackedModule.weight_gradient`` reads the
``d_out x d_in`` gradient (Conv1D transposed, bias as the last column). Each side is then
preconditioned with its own stage's factors and the inner product is summed over modules.
"""

import copy
import dataclasses
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from conftest import random_sequences
from scipy.stats import spearmanr

from hub_msif.artifacts.manifest import check_stage_pair, read_manifest
from hub_msif.attribution.scoring import LowRankQueries, per_example_gradients, precondition_queries, score_candidates
from hub_msif.factors.architectures import TrackedModule, find_modules
from hub_msif.factors.capture import compute_dtype
from hub_msif.factors.fit import FitConfig, fit_factors
from hub_msif.factors.storage import StageFactors, load_stage
from hub_msif.toy.examples import tiny_model

VOCAB = 64
PAD = 0
DAMPING = 0.1  # relative, the package default
ARCHS = ["gpt_neox", "gpt2", "llama"]  # merged per-head qkv (split heads), Conv1D with biases, GQA without biases


pytestmark = pytest.mark.usefixtures("one_thread")


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


@dataclass
class Pair:
    arch: str
    pretrained: torch.nn.Module
    finetuned: torch.nn.Module
    pt: StageFactors
    ft: StageFactors
    queries: list[dict]
    candidates: list[dict]
    cache: dict = field(default_factory=dict)  # slow-path gradients, computed once per pair

    @property
    def specs(self) -> list[TrackedModule]:
        return self.pt.specs


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory) -> Pair:
    arch = request.param
    folder = tmp_path_factory.mktemp(f"factors-{arch}")
    pretrained = tiny_model(arch, vocab_size=VOCAB, seed=0, dtype=torch.float64)
    finetuned = tiny_model(arch, vocab_size=VOCAB, seed=1, dtype=torch.float64)
    config = FitConfig(stage="pretrained", batch_size=8, checkpoint_every=0, storage_dtype="float64")
    fit_factors(pretrained, random_sequences(16, VOCAB, seed=1), folder, config, pad_id=PAD,
                info={"model": {"id": f"{arch}-pt"}}, show_progress=False)
    fit_factors(finetuned, random_sequences(16, VOCAB, min_len=5, seed=2, prompt_len=3), folder,
                dataclasses.replace(config, stage="finetuned"), pad_id=PAD, info={"model": {"id": f"{arch}-ft"}},
                show_progress=False)
    check_stage_pair(read_manifest(folder))
    pt, ft = load_stage(folder, "pretrained"), load_stage(folder, "finetuned")
    assert [s.name for s in pt.specs] == [s.name for s in ft.specs]
    if arch != "llama":
        assert max(s.num_blocks for s in pt.specs) == 3 * 4  # split heads: one block per head and q/k/v
    # Queries: the first 3 tokens are the prompt (no loss); lengths vary, so batches carry padding.
    queries = random_sequences(3, VOCAB, min_len=5, max_len=12, seed=3, prompt_len=3)
    candidates = random_sequences(40, VOCAB, min_len=2, max_len=12, seed=4)
    return Pair(arch, pretrained, finetuned, pt, ft, queries, candidates)


# -- slow references ----------------------------------------------------------------------------
def _loss_alone(model, seq: dict) -> torch.Tensor:
    """The sequence's summed next-token loss on its own (true labels; -100 carries no loss)."""
    ids = torch.tensor([seq["input_ids"]])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0, :-1]
    targets = torch.tensor(seq["labels"][1:])
    keep = targets != -100
    return F.cross_entropy(logits[keep], targets[keep], reduction="sum")


def _grads_alone(model, specs, seq: dict) -> dict[str, torch.Tensor]:
    """The sequence's parameter gradient per tracked module, from ``.grad``."""
    model.zero_grad(set_to_none=True)
    _loss_alone(model, seq).backward()
    out = {s.name: s.weight_gradient(model.get_submodule(s.name)).detach().clone() for s in specs}
    model.zero_grad(set_to_none=True)
    return out


def _cached_grads(pair: Pair, stage: str, kind: str) -> list[dict[str, torch.Tensor]]:
    key = (stage, kind)
    if key not in pair.cache:
        model = pair.finetuned if stage == "finetuned" else pair.pretrained
        seqs = pair.queries if kind == "queries" else pair.candidates
        pair.cache[key] = [_grads_alone(model, pair.specs, s) for s in seqs]
    return pair.cache[key]


def _slow_scores(pair: Pair, method: str, n_candidates: int, damping: float, relative: bool):
    """Per-module scores ``{name: [C, Q]}`` with every gradient materialised."""
    gq = _cached_grads(pair, "finetuned", "queries")
    gc = _cached_grads(pair, "finetuned" if method == "ss-if" else "pretrained", "candidates")[:n_candidates]
    if method == "gdp":
        left, right = gq, gc
    elif method == "ss-if":
        left, right = [pair.ft.precondition(g, damping, relative) for g in gq], gc
    else:
        left = [pair.ft.precondition(g, damping, relative) for g in gq]
        right = [pair.pt.precondition(g, damping, relative) for g in gc]
    return {
        s.name: torch.tensor([[float((r[s.name] * q[s.name]).sum()) for q in left] for r in right],
                             dtype=torch.float64)
        for s in pair.specs
    }


def _fast(pair: Pair, method: str, candidates, damping=DAMPING, relative=True, batch_size=8, token_shares=False):
    grads = per_example_gradients(pair.finetuned, pair.specs, pair.queries, PAD)
    weights = precondition_queries(grads, method, pair.ft, pair.pt, damping, relative)
    model = pair.finetuned if method == "ss-if" else pair.pretrained
    return score_candidates(model, pair.specs, weights, candidates, PAD, batch_size, token_shares=token_shares)


# -- 1. fast path == slow path ------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 8])
@pytest.mark.parametrize("method", ["ms-if", "ss-if", "gdp"])
def test_fast_path_matches_materialised_gradients(pair, method, batch_size):
    n = 10  # with batch size 8: one full batch and one partial, both padded
    fast = _fast(pair, method, pair.candidates[:n], batch_size=batch_size)
    slow = _slow_scores(pair, method, n, DAMPING, True)
    assert set(fast.per_module) == set(slow)
    for name, ref in slow.items():
        assert fast.per_module[name].shape == (n, len(pair.queries))
        assert _rel_err(fast.per_module[name], ref) < 1e-6, name
    total = sum(slow.values())
    assert _rel_err(fast.total, total) < 1e-6
    # float64 throughout: agreement is at rounding level, far inside the tolerance
    assert _rel_err(fast.total, total) < 1e-9


def test_fast_path_absolute_damping(pair):
    fast = _fast(pair, "ms-if", pair.candidates[:6], damping=1e-3, relative=False)
    slow = sum(_slow_scores(pair, "ms-if", 6, 1e-3, False).values())
    assert _rel_err(fast.total, slow) < 1e-9


def test_query_gradients_match_autograd(pair):
    fast = per_example_gradients(pair.finetuned, pair.specs, pair.queries, PAD, batch_size=2)
    for i, ref in enumerate(_cached_grads(pair, "finetuned", "queries")):
        for name, g in ref.items():
            assert _rel_err(fast[name][i], g) < 1e-10, name


# -- 2. huge damping: MS-IF ranks like GDP ------------------------------------------------------
def test_huge_damping_ranks_like_gdp(pair):
    cands = pair.candidates
    gdp = _fast(pair, "gdp", cands).total
    big = 1e8  # absolute; the largest Lambda of these models is O(10)
    huge = _fast(pair, "ms-if", cands, damping=big, relative=False).total
    # P_pt(P_ft(G)) -> G / damping**2 as damping -> infinity
    assert _rel_err(huge * big**2, gdp) < 1e-5
    rhos = [spearmanr(huge[:, q], gdp[:, q])[0] for q in range(gdp.shape[1])]
    assert min(rhos) > 0.999, rhos
    # A huge *relative* damping is a per-module one (factor x mean(Lambda) of each module and
    # stage), so it tends to GDP re-weighted module by module, not to GDP itself.
    gdp_modules = _fast(pair, "gdp", cands[:8]).per_module
    relative = _fast(pair, "ms-if", cands[:8], damping=big, relative=True).per_module
    for name, scores in relative.items():
        scale = (big * pair.ft.modules[name].lam.mean()) * (big * pair.pt.modules[name].lam.mean())
        assert _rel_err(scores * scale, gdp_modules[name]) < 1e-5, name
    # The default (small) damping does not simply reproduce GDP's ranking, so the check above
    # is not vacuous.
    small = _fast(pair, "ms-if", cands).total
    small_rhos = [spearmanr(small[:, q], gdp[:, q])[0] for q in range(gdp.shape[1])]
    assert max(small_rhos) < 0.99, small_rhos


# -- 3. sign: a positive score means the candidate lowers the query's loss ----------------------
def _shift(model, specs, direction: dict[str, torch.Tensor], step: float) -> None:
    """``theta += step * direction`` on the tracked modules only (Conv1D transposed, bias column)."""
    with torch.no_grad():
        for spec in specs:
            module = model.get_submodule(spec.name)
            d = direction[spec.name]
            w = d[:, :-1] if spec.has_bias else d
            module.weight += step * (w.t() if spec.transposed else w)
            if spec.has_bias:
                module.bias += step * d[:, -1]


def _float64_throughout(monkeypatch) -> None:
    """Makes a float64 model compute in float64 everywhere.

    transformers takes the eager attention softmax (GPT-NeoX, Llama) and Llama's RMSNorm in
    float32 even in a float64 model; that rounding (~1e-8 on the loss) would swamp a finite
    difference. Only this test patches them, and only while it runs.
    """
    from transformers.models.llama import modeling_llama

    softmax = torch.nn.functional.softmax

    def softmax64(input, dim=None, _stacklevel=3, dtype=None):
        return softmax(input, dim=dim)

    def rms_norm64(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax64)
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm64)


def test_sign_by_finite_differences(pair, monkeypatch):
    """SS-IF on one model: theta' = theta - eps * P(grad L_c) changes L_q by -eps * score.

    Only the tracked modules' weights (and biases) move. A positive score therefore means that
    a (preconditioned) training step on the candidate lowers the query's answer loss.
    """
    _float64_throughout(monkeypatch)
    model = copy.deepcopy(pair.finetuned)
    specs = pair.specs
    candidates = pair.candidates[:4]
    grads = per_example_gradients(model, specs, pair.queries, PAD)
    weights = precondition_queries(grads, "ss-if", pair.ft, None, DAMPING, True)
    scores = score_candidates(model, specs, weights, candidates, PAD).total  # [C, Q]
    assert (scores > 0).any() and (scores < 0).any()  # both signs occur, so the sign is really tested
    original = {k: v.clone() for k, v in model.state_dict().items()}
    slopes = torch.zeros_like(scores)
    for c, cand in enumerate(candidates):
        direction = pair.ft.precondition(_grads_alone(model, specs, cand), DAMPING, True)
        norm = torch.sqrt(sum((d**2).sum() for d in direction.values()))
        eps = 1e-4 / float(norm)  # a step 1e-4 long in parameter space (eps ~ 1e-7 to 1e-9 here)
        losses = {}
        for sign in (+1, -1):  # theta - eps * P(G_c) and theta + eps * P(G_c)
            _shift(model, specs, direction, -sign * eps)
            with torch.no_grad():
                losses[sign] = torch.tensor([float(_loss_alone(model, q)) for q in pair.queries], dtype=torch.float64)
            model.load_state_dict(original)
        slopes[c] = (losses[+1] - losses[-1]) / (2 * eps)  # d L_q / d eps along -P(G_c), central difference
    assert torch.equal(torch.sign(slopes), -torch.sign(scores))
    errors = (slopes + scores).abs() / scores.abs()
    assert errors.max() < 1e-3, errors


# -- 4. breakdowns ------------------------------------------------------------------------------
def test_per_module_and_token_shares_sum_to_total(pair):
    cands = pair.candidates[:9]
    result = _fast(pair, "ms-if", cands, token_shares=True)
    assert list(result.per_module) == [s.name for s in pair.specs]
    stacked = torch.stack([result.per_module[s.name] for s in pair.specs])
    assert torch.allclose(stacked.sum(0), result.total, rtol=1e-12, atol=0)
    plain = _fast(pair, "ms-if", cands)
    assert _rel_err(result.total, plain.total) < 1e-12  # asking for shares changes nothing else
    assert len(result.tokens) == len(cands)
    scale = result.total.abs().max()
    for c, seq in enumerate(cands):
        shares = result.tokens[c]
        assert shares.shape == (len(seq["input_ids"]), len(pair.queries))  # real tokens only, no padding
        assert torch.allclose(shares.sum(0), result.total[c], rtol=1e-10, atol=1e-12 * scale)
    # Padding does not leak into the shares: batches of one give the same per-token values.
    alone = _fast(pair, "ms-if", cands, batch_size=1, token_shares=True)
    for c in range(len(cands)):
        assert torch.allclose(alone.tokens[c], result.tokens[c], rtol=1e-9, atol=1e-12 * scale)


def test_token_shares_match_output_gradients(pair):
    """Share of token t = sum over modules of g_t^T W_q a_t, from autograd on the candidate alone."""
    cand = pair.candidates[5]
    grads = per_example_gradients(pair.finetuned, pair.specs, pair.queries, PAD)
    weights = precondition_queries(grads, "ms-if", pair.ft, pair.pt, DAMPING, True)
    result = score_candidates(pair.pretrained, pair.specs, weights, [cand], PAD, token_shares=True)
    model = pair.pretrained
    inputs, outputs, handles = {}, {}, []
    for spec in pair.specs:
        def hook(module, args, output, name=spec.name):
            inputs[name], outputs[name] = args[0], output
        handles.append(model.get_submodule(spec.name).register_forward_hook(hook))
    try:
        loss = _loss_alone(model, cand)
    finally:
        for h in handles:
            h.remove()
    out_grads = torch.autograd.grad(loss, [outputs[s.name] for s in pair.specs])
    expected = 0
    for spec, g in zip(pair.specs, out_grads, strict=True):
        a = inputs[spec.name][0].detach()
        if spec.has_bias:
            a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
        expected = expected + torch.einsum("to,qoi,ti->tq", g[0], weights[spec.name], a)
    assert _rel_err(result.tokens[0], expected) < 1e-9


# -- 5. batches: many queries and candidates together score as one at a time ------------------------
@pytest.fixture(scope="module")
def float32_world():
    """A float32 model wide enough (d_out * d_in up to 590k) that one float32 product over a module's
    whole gradient moves with the batch's shape by more than 1e-6 of the scores; 32 GDP queries."""
    model = tiny_model("gpt_neox", vocab_size=VOCAB, hidden=384, ffn=1536, layers=1, seed=0)
    specs = find_modules(model, "all")
    queries = random_sequences(32, VOCAB, min_len=5, max_len=16, seed=3, prompt_len=3)
    candidates = random_sequences(9, VOCAB, min_len=4, max_len=16, seed=4)
    return model, specs, per_example_gradients(model, specs, queries, PAD), candidates


def _worst_batch_difference(model, specs, weights, candidates, single) -> float:
    """The largest difference, over modules, candidates and the first and last query, between
    scoring all queries with candidate batches of 8 and one query with batches of 1, over that
    module's largest |score| for the query."""
    together = score_candidates(model, specs, weights, candidates, PAD, batch_size=8).per_module
    worst = 0.0
    for q in (0, 31):  # of the 32 queries
        alone = score_candidates(model, specs, single(q), candidates, PAD, batch_size=1).per_module
        for name, scores in alone.items():
            scale = float(together[name][:, q].abs().max())
            worst = max(worst, float((scores[:, 0] - together[name][:, q]).abs().max()) / scale)
    return worst


def test_float32_batch_scores_equal_single_query_scores(float32_world, monkeypatch):
    """Q=32 with candidate batches of 8 against Q=1 with batches of 1, float32 model: within 1e-6 of
    the largest score (docs/design.md, "Fast path"). One float32 product over the whole
    ``d_out * d_in`` axis (a block larger than any module) misses that here; fixed blocks do not."""
    from hub_msif.attribution import scoring

    model, specs, grads, candidates = float32_world
    assert compute_dtype(model) == torch.float32

    def single(q):
        return {name: g[q : q + 1] for name, g in grads.items()}

    assert _worst_batch_difference(model, specs, grads, candidates, single) < 1e-6
    monkeypatch.setattr(scoring, "_BLOCK", 1 << 40)
    assert _worst_batch_difference(model, specs, grads, candidates, single) > 1e-6


@pytest.mark.parametrize("path", ["factors", "gradient"])
def test_float32_low_rank_batch_scores_equal_single_query_scores(float32_world, path, monkeypatch):
    from hub_msif.attribution import scoring

    model, specs, grads, candidates = float32_world
    weights = precondition_queries(grads, "gdp", None, None, DAMPING, rank=8)
    monkeypatch.setattr(scoring, "_PATH", path)

    def single(q):
        return LowRankQueries({n: u[q : q + 1] for n, u in weights.u.items()},
                              {n: v[q : q + 1] for n, v in weights.v.items()})

    assert _worst_batch_difference(model, specs, weights, candidates, single) < 1e-6


# -- argument errors ----------------------------------------------------------------------------
def test_scoring_argument_errors(pair):
    grads = per_example_gradients(pair.finetuned, pair.specs, pair.queries[:1], PAD)
    with pytest.raises(ValueError, match="unknown gradient method 'tracin'"):
        precondition_queries(grads, "tracin", pair.ft, pair.pt, DAMPING)
    with pytest.raises(ValueError, match="fine-tuned stage"):
        precondition_queries(grads, "ss-if", None, pair.pt, DAMPING)
    with pytest.raises(ValueError, match="pre-trained stage"):
        precondition_queries(grads, "ms-if", pair.ft, None, DAMPING)
    with pytest.raises(ValueError, match="no candidates"):
        score_candidates(pair.pretrained, pair.specs, grads, [], PAD)
    missing = dict(grads)
    name = pair.specs[0].name
    del missing[name]
    with pytest.raises(ValueError, match=f"no query weights for module.*{name}"):
        score_candidates(pair.pretrained, pair.specs, missing, pair.candidates[:1], PAD)


# -- unit-normalised scores ---------------------------------------------------------------------
@pytest.mark.parametrize("rank", [None, 2])
@pytest.mark.parametrize("method", ["ms-if", "ss-if", "gdp"])
def test_normalised_scores_are_cosines(pair, method, rank):
    """``normalize=True`` gives ``<W_q, G_c> / (||W_q|| ||G_c||)`` over all modules, against
    per-example gradients from autograd one sequence at a time (float64); W_q is the query's
    preconditioned gradient written out here, or at rank 2 the dense form of its factors; the
    per-module scores still sum to the total and the token shares to each candidate's."""

    n = 10
    gq = _cached_grads(pair, "finetuned", "queries")
    gc = _cached_grads(pair, "finetuned" if method == "ss-if" else "pretrained", "candidates")[:n]
    if method == "gdp":
        left = gq
    elif method == "ss-if":
        left = [pair.ft.precondition(g, DAMPING, True) for g in gq]
    else:
        left = [pair.pt.precondition(pair.ft.precondition(g, DAMPING, True), DAMPING, True) for g in gq]
    grads = per_example_gradients(pair.finetuned, pair.specs, pair.queries, PAD)
    weights = precondition_queries(grads, method, pair.ft, pair.pt, DAMPING, True, rank=rank)
    if rank is not None:
        assert isinstance(weights, LowRankQueries)
        dense = weights.dense()
        left = [{name: dense[name][q] for name in dense} for q in range(len(gq))]
    names = [s.name for s in pair.specs]

    def flat(g):
        return torch.cat([g[name].reshape(-1) for name in names])

    expected = torch.tensor([[float(flat(c) @ flat(q) / (flat(c).norm() * flat(q).norm())) for q in left]
                             for c in gc], dtype=torch.float64)
    model = pair.finetuned if method == "ss-if" else pair.pretrained
    if rank is not None:  # both low-rank paths: norms from T x T Gram matrices, and from G_c itself
        from hub_msif.attribution import scoring

        for path in ("factors", "gradient"):
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(scoring, "_PATH", path)
                cosines = score_candidates(model, pair.specs, weights, pair.candidates[:n], PAD, batch_size=4,
                                           normalize=True)
            assert _rel_err(cosines.total, expected) < 1e-9, path
    got = score_candidates(model, pair.specs, weights, pair.candidates[:n], PAD, batch_size=4, normalize=True,
                           token_shares=True)
    assert _rel_err(got.total, expected) < 1e-9
    assert float(got.total.abs().max()) <= 1.0
    assert _rel_err(got.candidate_norms, torch.stack([flat(c).norm() for c in gc])) < 1e-9
    shares = torch.stack([t.sum(0) for t in got.tokens])
    assert _rel_err(shares, got.total) < 1e-9
    plain = score_candidates(model, pair.specs, weights, pair.candidates[:n], PAD, batch_size=4)
    assert _rel_err(plain.total / (got.candidate_norms[:, None] * got.query_norms[None, :]), got.total) < 1e-12
