"""Refined query iHVPs against a dense float64 Gauss-Newton matrix (docs/design.md, "Refined queries").

The reference never uses the implementation's double-backward trick: each curvature sequence runs
alone (batch of one, no padding), and every row of its logit Jacobian ``J_n`` (one per position
and vocabulary entry) comes from its own backward pass, read from ``.grad`` with
``TrackedModule.weight_gradient`` (Conv1D transposed, bias as the last column). Then
``G = (1/M) sum_n J_n^T H_n J_n`` with ``H_n`` block-diagonal over the positions that carry loss,
``diag(p) - p p^T``, and the damped inverse is a dense float64 solve.
"""

import dataclasses

import pytest
import torch
from conftest import QA_TEMPLATE, random_sequences, save_tiny_pair

from hub_msif.apps.cli import main
from hub_msif.attribution.attributor import Attributor
from hub_msif.attribution.refine import GGNProduct, curvature_sequences, refine, refine_queries
from hub_msif.attribution.scoring import per_example_gradients, precondition_queries, score_candidates
from hub_msif.data import CorpusSpec, load_rows, tokenize_corpus
from hub_msif.errors import MsifValueError
from hub_msif.factors.fit import FitConfig, fit_factors, fit_stage
from hub_msif.factors.storage import load_stage
from hub_msif.toy.examples import tiny_model

VOCAB = 20
PAD = 0
DAMPING = 0.1  # relative, the package default
# Enough CG steps to reach the exact solve (measured: relative error 1e-6 to 1e-13 after 100 to 150
# steps, from 0.87-0.97 for plain EK-FAC): the damped sample GGN is ill-conditioned (1e5 to 1e8 at
# the default damping), and EK-FAC fitted on other sequences is a loose preconditioner for it.
STEPS = 150
ARCHS = ["gpt_neox", "gpt2", "llama"]  # per-head qkv blocks, Conv1D with biases, GQA without biases

# Llama's eager attention takes its softmax in float32 even in a float64 model, so its products carry
# float32 rounding (measured 3e-8); the others are float64 throughout.
PRODUCT_TOLERANCE = {"gpt_neox": 1e-10, "gpt2": 1e-10, "llama": 1e-6}

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(arch, seed):
    return tiny_model(arch, vocab_size=VOCAB, hidden=4, layers=1, heads=2, kv_heads=1, ffn=8, seed=seed,
                      dtype=torch.float64)


def _flat(vectors, specs):
    return torch.cat([vectors[s.name].reshape(vectors[s.name].shape[0], -1) for s in specs], 1)


def _unflat(flat, specs):
    out, start = {}, 0
    for s in specs:
        size = s.d_out * s.d_in
        out[s.name] = flat[:, start : start + size].reshape(-1, s.d_out, s.d_in)
        start += size
    return out


def _dense_ggn(model, specs, sequences) -> torch.Tensor:
    """``(1/M) sum_n J_n^T H_n J_n`` by one backward pass per logit entry."""
    dim = sum(s.d_out * s.d_in for s in specs)
    ggn = torch.zeros(dim, dim, dtype=torch.float64)
    for seq in sequences:
        ids = torch.tensor([seq["input_ids"]])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0]
        keep = [t for t in range(len(seq["input_ids"]) - 1) if seq["labels"][t + 1] != -100]
        for t in keep:
            rows = []
            for v in range(logits.shape[1]):
                model.zero_grad(set_to_none=True)
                logits[t, v].backward(retain_graph=True)
                rows.append(torch.cat([s.weight_gradient(model.get_submodule(s.name)).reshape(-1) for s in specs]))
            jac = torch.stack(rows)  # [V, P]
            p = torch.softmax(logits[t].detach(), -1)
            hess = torch.diag(p) - torch.outer(p, p)
            ggn += jac.T @ hess @ jac
    model.zero_grad(set_to_none=True)
    return ggn / len(sequences)


def _damping_diagonal(stage, specs, damping, relative=True) -> torch.Tensor:
    return torch.cat([torch.full((s.d_out * s.d_in,), stage.modules[s.name].damping_value(damping, relative),
                                 dtype=torch.float64) for s in specs])


@dataclasses.dataclass
class Stage:
    model: torch.nn.Module
    factors: object
    curvature: list
    ggn: torch.Tensor


def _stage(arch, seed, folder, name, fit_seqs, curvature):
    model = _model(arch, seed)
    config = FitConfig(stage=name, batch_size=4, checkpoint_every=0, storage_dtype="float64", label_mode="sampled")
    fit_factors(model, fit_seqs, folder, config, pad_id=PAD, info={"model": {"id": f"{arch}-{name}"}},
                show_progress=False)
    factors = load_stage(folder, name)
    for p in model.parameters():
        p.requires_grad_(True)
    return Stage(model, factors, curvature, _dense_ggn(model, factors.specs, curvature))


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    arch = request.param
    folder = tmp_path_factory.mktemp(f"refine-{arch}")
    pt_fit = random_sequences(12, VOCAB, min_len=3, max_len=8, seed=1)
    ft_fit = random_sequences(12, VOCAB, min_len=5, max_len=8, seed=2, prompt_len=3)
    # Curvature samples: part of each stage's fitting data (the fine-tuned one masks its prompts).
    pt = _stage(arch, 0, folder, "pretrained", pt_fit, pt_fit[:5])
    ft = _stage(arch, 1, folder, "finetuned", ft_fit, ft_fit[:5])
    queries = random_sequences(3, VOCAB, min_len=5, max_len=8, seed=3, prompt_len=3)
    grads = per_example_gradients(ft.model, ft.factors.specs, queries, PAD)
    return {"arch": arch, "pretrained": pt, "finetuned": ft, "grads": grads}


def _product(stage: Stage, batch_size=5):
    return GGNProduct(stage.model, stage.factors.specs, stage.curvature, PAD, batch_size=batch_size)


def _rel(x, ref):
    return float((x - ref).norm() / ref.norm())


# -- the GGN-vector product ---------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 2])
def test_ggn_product_matches_dense_ggn(pair, batch_size):
    """Batches with padding (lengths differ) and masked prompts give exactly the dense product."""
    for stage in (pair["pretrained"], pair["finetuned"]):
        specs = stage.factors.specs
        v = torch.randn(4, stage.ggn.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        got = _flat(_product(stage, batch_size)(_unflat(v, specs)), specs)
        want = v @ stage.ggn  # G is symmetric
        assert _rel(got, want) < PRODUCT_TOLERANCE[pair["arch"]]
        assert torch.allclose(stage.ggn, stage.ggn.T, atol=1e-12 * float(stage.ggn.abs().max()))


def test_ggn_product_restores_requires_grad(pair):
    stage = pair["pretrained"]
    stage.model.get_input_embeddings().weight.requires_grad_(False)  # a mix of frozen and trainable
    before = [p.requires_grad for p in stage.model.parameters()]
    _product(stage)(_unflat(torch.ones(1, stage.ggn.shape[0], dtype=torch.float64), stage.factors.specs))
    assert [p.requires_grad for p in stage.model.parameters()] == before
    stage.model.get_input_embeddings().weight.requires_grad_(True)


# -- refinement -----------------------------------------------------------------------------------
def test_zero_steps_is_plain_ekfac_exactly(pair):
    ft = pair["finetuned"]
    got = refine(ft.factors, _product(ft), pair["grads"], DAMPING, steps=0)
    want = ft.factors.precondition(pair["grads"], DAMPING, True)
    assert all(torch.equal(got[n], want[n]) for n in want)
    for method in ("ms-if", "ss-if", "gdp"):
        products = {"finetuned": _product(ft), "pretrained": _product(pair["pretrained"])}
        got = refine_queries(pair["grads"], method, ft.factors, pair["pretrained"].factors, DAMPING, True, 0, products)
        want = precondition_queries(pair["grads"], method, ft.factors, pair["pretrained"].factors, DAMPING, True)
        assert all(torch.equal(got[n], want[n]) for n in want)


@pytest.mark.parametrize("relative", [True, False])
def test_refined_ihvp_converges_to_exact_damped_ggn_inverse(pair, relative):
    """Energy-norm error falls at every step (CG's optimality) and reaches the dense solve."""
    ft = pair["finetuned"]
    specs = ft.factors.specs
    damping = DAMPING if relative else 1e-3
    b = _flat(pair["grads"], specs)
    system = ft.ggn + torch.diag(_damping_diagonal(ft.factors, specs, damping, relative))
    exact = torch.linalg.solve(system, b.T).T
    errors, iterates = [], {}

    def on_step(i, x):
        e = _flat(x, specs) - exact
        errors.append(float(((e @ system) * e).sum()))
        iterates[i] = _flat(x, specs)

    refine(ft.factors, _product(ft), pair["grads"], damping, relative, steps=STEPS, on_step=on_step)
    assert len(errors) == STEPS + 1
    # Monotone up to rounding once converged (the floor is far below the first error).
    assert all(later <= earlier * (1 + 1e-6) + 1e-12 * errors[0] for earlier, later in zip(errors, errors[1:]))
    plain = _rel(iterates[0], exact)
    assert plain > 1e-2  # EK-FAC alone is not the exact inverse here, so convergence is measured
    assert _rel(iterates[2], exact) < plain
    assert _rel(iterates[STEPS], exact) < 1e-6


def test_refined_ms_if_converges_to_both_exact_inverses(pair):
    ft, pt = pair["finetuned"], pair["pretrained"]
    specs = ft.factors.specs
    b = _flat(pair["grads"], specs)
    inner = torch.linalg.solve(ft.ggn + torch.diag(_damping_diagonal(ft.factors, specs, DAMPING)), b.T)
    exact = torch.linalg.solve(pt.ggn + torch.diag(_damping_diagonal(pt.factors, specs, DAMPING)), inner).T
    products = {"finetuned": _product(ft), "pretrained": _product(pt)}
    plain = _flat(precondition_queries(pair["grads"], "ms-if", ft.factors, pt.factors, DAMPING), specs)
    two = _flat(refine_queries(pair["grads"], "ms-if", ft.factors, pt.factors, DAMPING, True, 2, products), specs)
    many = _flat(refine_queries(pair["grads"], "ms-if", ft.factors, pt.factors, DAMPING, True, STEPS, products), specs)
    assert _rel(two, exact) < _rel(plain, exact)
    assert _rel(many, exact) < 1e-6
    ss = _flat(refine_queries(pair["grads"], "ss-if", ft.factors, pt.factors, DAMPING, True, STEPS, products), specs)
    assert _rel(ss, inner.T) < 1e-6


def test_bad_input(pair):
    ft = pair["finetuned"]
    with pytest.raises(MsifValueError, match="non-negative integer"):
        refine(ft.factors, _product(ft), pair["grads"], DAMPING, steps=-1)
    with pytest.raises(MsifValueError, match="curvature sample of the pretrained"):
        refine_queries(pair["grads"], "ms-if", ft.factors, pair["pretrained"].factors, DAMPING, True, 2,
                       {"finetuned": _product(ft)})
    with pytest.raises(MsifValueError, match="curvature sample is empty"):
        GGNProduct(ft.model, ft.factors.specs, [], PAD)


# -- the Attributor ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pair_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("refine-pair")
    pair = save_tiny_pair(root)
    for stage, data, corpus in (("pretrained", pair["pretrain"], {}),
                                ("finetuned", pair["finetune"], {"prompt_column": "prompt", "response_column": "response",
                                                                 "template": QA_TEMPLATE})):
        fit_stage(str(pair[stage]), str(data), root / "factors", FitConfig(stage=stage, batch_size=8, checkpoint_every=0),
                  corpus=CorpusSpec(data=str(data), max_length=64, **corpus), show_progress=False)
    return {"root": root, **pair}


QUERIES = [("what does the cat see ?", "the river"), ("what does the dog hear ?", "a bird")]
DOCS = ["the cat sees the river", "the dog hears a bird", "a bird sees the dog", "the river hears the cat"]


def test_attributor_refines_with_the_recorded_fitting_data(pair_folder):
    """Default curvature samples: the files the manifest records, tokenized as the fit did (prompts
    of the fine-tuning rows carry no loss); the scores are those of ``refine_queries`` by hand."""
    plain = Attributor(pair_folder["root"] / "factors")
    refined = Attributor(pair_folder["root"] / "factors", refine_steps=3)
    spec = CorpusSpec(data=str(pair_folder["finetune"]), prompt_column="prompt", response_column="response",
                      template=QA_TEMPLATE, max_length=64)
    recorded, _ = tokenize_corpus(load_rows(spec), refined.tokenizer, spec)
    sample = curvature_sequences(refined.factors["finetuned"], refined.tokenizer)
    assert sample == recorded  # 16 rows, fewer than the default sample size: all of them, in order
    assert any(label == -100 for seq in sample for label in seq["labels"])

    grads = per_example_gradients(refined.models["finetuned"], refined.specs,
                                  [refined.query_sequence(p, a) for p, a in QUERIES], refined.pad_id)
    products = {stage: GGNProduct(refined.models[stage], refined.specs,
                                  curvature_sequences(refined.factors[stage], refined.tokenizer), refined.pad_id)
                for stage in ("pretrained", "finetuned")}
    candidates = [refined.document_sequence(t) for t in DOCS]
    for method, model in (("ms-if", "pretrained"), ("ss-if", "finetuned")):
        weights = refine_queries(grads, method, refined.factors["finetuned"], refined.factors["pretrained"], DAMPING,
                                 True, 3, products)
        want = score_candidates(refined.models[model], refined.specs, weights, candidates, refined.pad_id).total
        got, _ = refined.score(QUERIES, DOCS, method)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
        before, _ = plain.score(QUERIES, DOCS, method)
        assert not torch.allclose(got, before, rtol=1e-3)  # refinement changes the scores
    gdp = [a.score(QUERIES, DOCS, "gdp")[0] for a in (plain, refined)]
    assert torch.equal(*gdp)


def test_attributor_takes_given_curvature_sequences_and_checks_them(pair_folder, tmp_path):
    folder = pair_folder["root"] / "factors"
    given = random_sequences(4, 10, min_len=3, max_len=6, seed=9)
    attributor = Attributor(folder, refine_steps=1, curvature_data={"finetuned": given, "pretrained": given})
    attributor.score(QUERIES[:1], DOCS, "ss-if")
    assert attributor._curvature["finetuned"] == given
    with pytest.raises(MsifValueError, match="unknown stage 'base'"):
        Attributor(folder, refine_steps=1, curvature_data={"base": given})
    with pytest.raises(MsifValueError, match="non-negative integer"):
        Attributor(folder, refine_steps=-2)
    missing = Attributor(folder, refine_steps=1, curvature_data={"finetuned": str(tmp_path / "gone.jsonl")})
    with pytest.raises(MsifValueError, match="--refine-data finetuned=FILE"):
        missing.score(QUERIES[:1], DOCS, "ss-if")


def test_cli_refine_data_must_name_a_stage_and_a_file(tmp_path, capsys):
    for value in ("corpus.jsonl", f"base={tmp_path}", f"finetuned={tmp_path / 'gone.jsonl'}"):
        with pytest.raises(SystemExit) as exit_info:
            main(["attribute", "--factors", str(tmp_path), "--index", str(tmp_path), "--prompt", "p",
                  "--refine-data", value])
        assert exit_info.value.code == 2
        assert "--refine-data" in capsys.readouterr().err
