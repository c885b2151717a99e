"""Issue 19's levers: per-stage damping and contrastive (subject-neutralised) queries.

Per-stage damping: ``precondition_queries`` with ``damping_pretrained`` is exactly
``P_pt(P_ft(G))`` with each stage damped on its own (float64 dense reference, dense and low-rank
paths), and the Attributor's and CLI's per-stage dampings equal the single damping when both are
the same. Contrastive queries: a contrastive score equals the plain score of the query minus the
plain score of the neutralised prompt, computed separately (docs/design.md, "Per-stage damping",
"Contrastive queries").
"""

import json

import pytest
import torch
from conftest import fit_tiny_pair, save_tiny_pair

from hub_msif.attribution.attributor import Attributor
from hub_msif.attribution.contrast import find_subject, neutral_token, replace_subject, subject_spans
from hub_msif.attribution.scoring import per_example_gradients, precondition_queries
from hub_msif.errors import MsifValueError
from hub_msif.toy.examples import example_texts

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT, ANSWER = "what does the cat see ?", "the river"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("levers")
    made = save_tiny_pair(root)
    factors = root / "factors"
    fit_tiny_pair(made, factors, max_length=32, max_sequences=16)
    documents = example_texts(12, seed=3)
    return {"factors": factors, "root": root, "documents": documents}


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> None:
    scale = float(b.abs().max())
    assert scale > 0
    assert float((a - b).abs().max()) <= tol * scale, (float((a - b).abs().max()), scale)


def test_per_stage_damping_is_the_two_stage_preconditioner(pair):
    att = Attributor(pair["factors"])
    grads = per_example_gradients(att.models["finetuned"].double(), att.specs,
                                  [att.query_sequence(PROMPT, ANSWER), att.query_sequence("who likes a dog ?", "the cat")],
                                  att.pad_id)
    att.models["finetuned"].float()
    ft, pt = att.factors["finetuned"], att.factors["pretrained"]
    ft64 = {n: m.to(torch.float64) for n, m in ft.modules.items()}
    pt64 = {n: m.to(torch.float64) for n, m in pt.modules.items()}
    for relative in (True, False):
        got = precondition_queries(grads, "ms-if", ft, pt, 0.03, relative, damping_pretrained=0.7)
        for name, g in grads.items():
            want = pt64[name].precondition(ft64[name].precondition(g, 0.03, relative), 0.7, relative)
            _close(got[name], want, 1e-10)
        # the low-rank path at full rank keeps the same per-stage dampings
        full = max(min(g.shape[-2:]) for g in grads.values())
        low = precondition_queries(grads, "ms-if", ft, pt, 0.03, relative, rank=full, damping_pretrained=0.7).dense()
        for name in grads:
            _close(low[name], got[name], 1e-8)
    # equal per-stage dampings are the single damping; SS-IF ignores the pre-trained one
    single = precondition_queries(grads, "ms-if", ft, pt, 0.2)
    same = precondition_queries(grads, "ms-if", ft, pt, 0.2, damping_pretrained=0.2)
    ss = precondition_queries(grads, "ss-if", ft, pt, 0.2, damping_pretrained=5.0)
    for name in grads:
        assert torch.equal(single[name], same[name])
        _close(ss[name], ft64[name].precondition(grads[name], 0.2, True), 1e-10)


def test_attributor_per_stage_damping(pair):
    queries, docs = [(PROMPT, ANSWER), ("who likes a dog ?", "the cat")], pair["documents"]
    f64 = {"dtype": torch.float64}
    plain = Attributor(pair["factors"], **f64)
    staged = Attributor(pair["factors"], damping_pretrained=0.3, damping_finetuned=0.3, **f64)
    for method in ("ms-if", "ss-if"):
        want, _ = plain.score(queries, docs, method, damping=0.3)
        got, _ = staged.score(queries, docs, method, damping=0.01)  # replaced on both stages
        _close(got, want, 1e-6)
    # different dampings: the scores of the two-stage weights, and not those of either single damping
    split = Attributor(pair["factors"], damping_pretrained=1.0, damping_finetuned=0.01, **f64)
    got, _ = split.score(queries, docs, "ms-if")
    for single in (1.0, 0.01):
        other, _ = plain.score(queries, docs, "ms-if", damping=single)
        assert float((got - other).abs().max()) > 1e-3 * float(other.abs().max())
    only_ft = Attributor(pair["factors"], damping_finetuned=0.01, **f64)
    got, _ = only_ft.score(queries, docs, "ss-if", damping=5.0)
    want, _ = plain.score(queries, docs, "ss-if", damping=0.01)
    _close(got, want, 1e-6)
    with pytest.raises(MsifValueError, match="per-stage dampings"):
        Attributor(pair["factors"], damping_pretrained=0.1, refine_steps=2)
    with pytest.raises(MsifValueError, match="damping"):
        Attributor(pair["factors"], damping_finetuned=-1.0)


def test_contrastive_query_is_the_difference_of_two_queries(pair):
    docs = pair["documents"]
    f64 = {"dtype": torch.float64}  # float64 models: the two sides differ only by rounding
    plain = Attributor(pair["factors"], **f64)
    neutral = neutral_token(plain.tokenizer)
    assert neutral == "[UNK]"
    contrast = Attributor(pair["factors"], contrast="subject", subject="the cat", **f64)
    for method in ("ms-if", "ss-if", "gdp"):
        got, per_module = contrast.score([(PROMPT, ANSWER)], docs, method)
        full, _ = plain.score([(PROMPT, ANSWER)], docs, method)
        base, _ = plain.score([(f"what does {neutral} see ?", ANSWER)], docs, method)
        _close(got, full - base, 1e-6)
        assert per_module is not None and set(per_module) == {s.name for s in plain.specs}
    # a mapping prompt -> subject, and a found subject: the span whose neutralisation lowers the answer most
    mapped = Attributor(pair["factors"], contrast="subject", subject={PROMPT: "cat"})
    assert mapped.contrast_prompt(PROMPT, ANSWER) == f"what does the {neutral} see ?"
    found = Attributor(pair["factors"], contrast="subject", **f64)
    spans = subject_spans(PROMPT, neutral)
    logprobs = plain.answer_logprobs([(variant, ANSWER) for _, variant in spans])
    best = min(range(len(spans)), key=lambda i: (logprobs[i], i))
    assert found.contrast_prompt(PROMPT, ANSWER) == spans[best][1]
    got, _ = found.score([(PROMPT, ANSWER)], docs, "ms-if")
    base, _ = plain.score([(spans[best][1], ANSWER)], docs, "ms-if")
    _close(got, plain.score([(PROMPT, ANSWER)], docs, "ms-if")[0] - base, 1e-6)
    with pytest.raises(MsifValueError, match="does not occur"):
        Attributor(pair["factors"], contrast="subject", subject="a horse").score([(PROMPT, ANSWER)], docs, "ms-if")
    with pytest.raises(MsifValueError, match="no contrast"):
        Attributor(pair["factors"], subject="the cat")
    with pytest.raises(MsifValueError, match="contrast must be"):
        Attributor(pair["factors"], contrast="object")


def test_subject_spans_and_search():
    spans = subject_spans("where was ab cd born ?", "[UNK]", max_words=2)
    assert spans[:3] == [("where", "[UNK] was ab cd born ?"), ("where was", "[UNK] ab cd born ?"),
                         ("was", "where [UNK] ab cd born ?")]
    assert len(spans) == 6 + 5  # 6 one-word and 5 two-word runs
    # the search picks the span whose neutralisation gives the lowest log-probability (first on ties)
    drop = {"where was [UNK] born ?": -9.0, "where was [UNK] cd born ?": -9.0, "where was ab [UNK] born ?": -4.0}
    seen = []

    def logprobs(pairs):
        seen.extend(pairs)
        return [drop.get(p, -1.0) for p, _ in pairs]

    assert find_subject("where was ab cd born ?", "oslo", "[UNK]", logprobs, max_words=2) == "ab"
    assert all(a == "oslo" for _, a in seen) and len(seen) == 11
    assert replace_subject("where was ab cd born ?", "ab cd", "[UNK]") == "where was [UNK] born ?"
    with pytest.raises(MsifValueError, match="empty"):
        replace_subject("where ?", " ", "[UNK]")


def test_cli_per_stage_damping_and_contrast(pair, capsys):
    from hub_msif.apps.cli import main

    docs = pair["root"] / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(pair["documents"])))
    base = ["attribute", "--factors", str(pair["factors"]), "--documents", str(docs), "--prompt", PROMPT,
            "--answer", ANSWER, "--top", str(len(pair["documents"])), "--json"]
    for extra, kwargs in ((["--damping-pretrained", "0.5", "--damping-finetuned", "0.05"],
                           {"damping_pretrained": 0.5, "damping_finetuned": 0.05}),
                          (["--contrast", "subject", "--subject", "the cat"], {"contrast": "subject", "subject": "the cat"})):
        assert main(base + extra) == 0
        rows = {r["id"]: r["score"] for r in json.loads(capsys.readouterr().out)["rows"]}
        want = Attributor(pair["factors"], **kwargs).attribute(
            PROMPT, ANSWER, documents=[{"id": f"d{i}", "text": t} for i, t in enumerate(pair["documents"])],
            top=len(pair["documents"]))
        assert len(rows) == len(want.rows)
        for row in want.rows:
            assert rows[row.id] == pytest.approx(row.score, rel=1e-6, abs=1e-12)
    assert main(base + ["--subject", "the cat"]) != 0
    assert "--subject goes with --contrast subject" in capsys.readouterr().err
