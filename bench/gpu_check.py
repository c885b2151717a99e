"""One GPU check (issue 13): fit and score a random-init model of Pythia-410m's shape in bfloat16 compute
with float32 accumulators, next to the memory plan, and compare a small model's bf16/float32 fit with a
CPU float64 fit.

Prints, and writes to ``bench/out/gpu_check.json``:

- ``plan``: ``hub_msif.factors.memory_plan.plan_fit`` for the same fit (config only, meta device);
- ``fit``: wall time of each stage's fit and the peak GPU memory (``torch.cuda.max_memory_allocated``)
  next to the plan's ``per_process_peak_bytes``;
- ``scoring``: MS-IF with the fast path for Q queries over C candidates: preconditioning time, scoring
  time, their ratio to one plain forward+backward over the candidates, and the peak GPU memory;
- ``precision``: a small GPT-NeoX (hidden 64, 2 layers) fitted on the device in bf16 compute with float32
  sums and on the CPU in float64 throughout; the relative error of the device fit's preconditioned
  gradients against the CPU float64 ones (damping 0.1, relative), and the Spearman of MS-IF scores;
- ``attribution``: ``Attributor(..., device=...)`` on the device (float32, then bfloat16 models) against
  ``device="cpu"`` on a small saved pair with fitted factors: the scores' largest difference relative to
  the largest |score|, top-1 agreement, the seconds of each, and the device's peak memory next to
  ``hub_msif.attribution.plan`` (``attribute --plan``). Never run on a GPU yet: untested there.

Run on a CUDA machine: ``python -m bench.gpu_check`` (defaults: 64 fitting sequences of 512 tokens,
batch 8, 8 queries, 64 candidates). ``--device cpu --shape tiny`` runs the same code on a CPU as a
smoke check (the numbers then say nothing about GPUs). Weights are random: nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from hub_msif.attribution.scoring import per_example_gradients, precondition_queries, score_candidates  # noqa: E402
from hub_msif.data import collate  # noqa: E402
from hub_msif.factors.fit import FitConfig, fit_factors  # noqa: E402
from hub_msif.factors.memory_plan import format_bytes, plan_fit  # noqa: E402
from hub_msif.factors.objectives import lm_loss  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "gpu_check.json"
PAD_ID = 0
# Pythia-410m's published configuration (GPT-NeoX): the shape only, weights random.
SHAPES = {
    "pythia-410m": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=512,
                 rotary_pct=0.25, max_position_embeddings=512),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke check")
    p.add_argument("--shape", default="pythia-410m", choices=sorted(SHAPES))
    p.add_argument("--sequences", type=int, default=64, help="fitting sequences per stage")
    p.add_argument("--length", type=int, default=512, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--candidates", type=int, default=64)
    p.add_argument("--out", type=Path, default=OUT)
    return p.parse_args(argv)


def config_of(shape: str):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=PAD_ID)


def random_model(config, seed: int):
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config).eval()


def sequences(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": list(ids)})
    return out


def queries(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    out = []
    for seq in sequences(n, length, vocab, seed):
        seq["labels"][: length // 2] = [-100] * (length // 2)  # the answer: the second half
        out.append(seq)
    return out


class Clock:
    """Wall time and peak device memory of one phase."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = None
        self.seconds = time.perf_counter() - self.start


def plain_pass(model, seqs: list[dict], batch_size: int, device) -> None:
    for start in range(0, len(seqs), batch_size):
        batch = collate(seqs[start : start + batch_size], range(start, start + batch_size), PAD_ID, device)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        lm_loss(out.logits, batch, "empirical").backward()
    model.zero_grad(set_to_none=True)


def big_check(args, device: torch.device, work: Path) -> dict:
    config = config_of(args.shape)
    fit_config = dict(batch_size=args.batch_size, checkpoint_every=0, model_dtype="bfloat16",
                      accumulate_dtype="float32")
    plan = plan_fit(config, FitConfig(**fit_config), max_length=args.length)
    print(f"plan: peak {format_bytes(plan.per_process_peak_bytes)} per process", flush=True)
    model = random_model(config, seed=0).to(device)
    data = sequences(args.sequences, args.length, config.vocab_size, seed=1)
    fits = {}
    factors = {}
    for stage in ("pretrained", "finetuned"):  # one model for both stages: the check is of cost, not meaning
        with Clock(device) as clock:
            factors[stage] = fit_factors(model, data, work / "big", FitConfig(stage=stage, **fit_config),
                                         pad_id=PAD_ID, info={}, show_progress=True)
        fits[stage] = {"seconds": clock.seconds, "peak_bytes": clock.peak}
        print(f"fit {stage}: {clock.seconds:.1f} s, peak "
              f"{format_bytes(clock.peak) if clock.peak is not None else 'n/a'}", flush=True)
    specs = factors["pretrained"].specs
    qs = queries(args.queries, args.length, config.vocab_size, seed=2)
    cands = sequences(args.candidates, args.length, config.vocab_size, seed=3)
    plain_pass(model, cands[: args.batch_size], args.batch_size, device)  # warm-up
    with Clock(device) as floor:
        plain_pass(model, cands, args.batch_size, device)
    with Clock(device) as grads_clock:
        grads = per_example_gradients(model, specs, qs, PAD_ID, args.batch_size)
    with Clock(device) as pre:
        weights = precondition_queries(grads, "ms-if", factors["finetuned"], factors["pretrained"], 0.1)
    del grads
    with Clock(device) as scoring:
        scores = score_candidates(model, specs, weights, cands, PAD_ID, args.batch_size)
    finite = bool(torch.isfinite(scores.total).all())
    result = {
        "plan": plan.to_json(),
        "fit": fits,
        "plan_peak_bytes": plan.per_process_peak_bytes,
        "measured_fit_peak_over_plan": (max(f["peak_bytes"] for f in fits.values()) / plan.per_process_peak_bytes
                                         if device.type == "cuda" else None),
        "scoring": {"queries": args.queries, "candidates": args.candidates,
                    "floor_seconds": floor.seconds, "query_gradients_seconds": grads_clock.seconds,
                    "precondition_seconds": pre.seconds, "score_seconds": scoring.seconds,
                    "ratio_to_floor": (pre.seconds + scoring.seconds) / floor.seconds,
                    "peak_bytes": scoring.peak, "scores_finite": finite},
    }
    print(f"scoring: precondition {pre.seconds:.2f} s + score {scoring.seconds:.2f} s = "
          f"{result['scoring']['ratio_to_floor']:.2f}x one forward+backward ({floor.seconds:.2f} s); "
          f"finite: {finite}", flush=True)
    return result


def precision_check(args, device: torch.device, work: Path) -> dict:
    """bf16 compute + float32 sums on the device against float64 throughout on the CPU, small model."""
    from accelerate import Accelerator

    config = config_of("tiny")
    data = sequences(64, 64, config.vocab_size, seed=4)
    reference = random_model(config, seed=5).double()
    cpu = Accelerator(cpu=True)
    ref = {stage: fit_factors(reference, data, work / "ref", FitConfig(stage=stage, batch_size=8, checkpoint_every=0,
                                                                        storage_dtype="float64"),
                              pad_id=PAD_ID, info={}, accelerator=cpu, show_progress=False)
           for stage in ("pretrained", "finetuned")}
    model = random_model(config, seed=5).to(device)
    ours = {stage: fit_factors(model, data, work / "dev", FitConfig(stage=stage, batch_size=8, checkpoint_every=0,
                                                                     model_dtype="bfloat16", accumulate_dtype="float32",
                                                                     storage_dtype="float32"),
                               pad_id=PAD_ID, info={}, show_progress=False)
            for stage in ("pretrained", "finetuned")}
    qs = queries(4, 64, config.vocab_size, seed=6)
    specs = ref["pretrained"].specs
    grads = per_example_gradients(reference, specs, qs, PAD_ID, 4)  # float64 gradients, preconditioned both ways
    w_ref = precondition_queries(grads, "ms-if", ref["finetuned"], ref["pretrained"], 0.1)
    # Factors are cast to the gradients' dtype and device when used: both in float64 on the CPU here.
    w_dev = precondition_queries(grads, "ms-if", ours["finetuned"], ours["pretrained"], 0.1)
    num = sum(float((w_ref[n] - w_dev[n].double()).square().sum()) for n in w_ref)
    den = sum(float(w_ref[n].square().sum()) for n in w_ref)
    error = (num / den) ** 0.5
    print(f"precision: bf16 compute + float32 sums vs float64 on the CPU: preconditioned-gradient relative error "
          f"{error:.2e}", flush=True)
    return {"model": "GPT-NeoX hidden 64, 2 layers", "relative_error": error, "damping": 0.1}


def attribution_check(args, device: torch.device, work: Path) -> dict:
    """``Attributor`` on the device against the CPU: the same tiny pair, factors fitted on the CPU."""
    from hub_msif.artifacts.manifest import read_manifest
    from hub_msif.attribution.attributor import Attributor
    from hub_msif.attribution.plan import plan_stages
    from hub_msif.data import CorpusSpec
    from hub_msif.factors.fit import fit_stage
    from hub_msif.toy.examples import example_texts, tiny_model, train_briefly, word_tokenizer

    texts = example_texts(64, seed=0)
    tokenizer = word_tokenizer(texts + ["what does the cat see ?"])
    model = tiny_model("gpt_neox", vocab_size=len(tokenizer), seed=0)
    train_briefly(model, tokenizer, texts, steps=8, batch_size=8)
    folder, data = work / "pair", work / "pair" / "texts.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    for stage in ("pretrained", "finetuned"):  # one model for both stages: the check is of devices, not meaning
        model.save_pretrained(folder / stage)
        tokenizer.save_pretrained(folder / stage)
        fit_stage(str(folder / stage), str(data), folder / "factors", FitConfig(stage=stage, batch_size=8, checkpoint_every=0),
                  corpus=CorpusSpec(data=str(data), max_length=64), show_progress=False)
    documents = [{"id": i, "text": t} for i, t in enumerate(example_texts(args.candidates, seed=5))]
    texts = [d["text"] for d in documents]
    query = [("what does the cat see ?", "the river")]
    with Clock(torch.device("cpu")) as cpu_clock:
        reference, _ = Attributor(folder / "factors", device="cpu").score(query, texts)
    out = {"candidates": len(texts), "cpu_seconds": cpu_clock.seconds}
    for dtype in ("float32", "bfloat16"):
        with Clock(device) as clock:
            attributor = Attributor(folder / "factors", device=str(device), model_dtype=dtype)
            scores, _ = attributor.score(query, texts)
        placed = {p.device.type for m in attributor.models.values() for p in m.parameters()}
        placed |= {t.device.type for f in attributor.factors.values() for m in f.modules.values() for t in m.tensors().values()}
        error = float((scores - reference).abs().max() / reference.abs().max())
        out[dtype] = {"relative_error": error, "top1_agrees": int(scores.argmax()) == int(reference.argmax()),
                      "seconds": clock.seconds, "peak_bytes": clock.peak, "tensors_on": sorted(placed)}
        print(f"attribution on {device} ({dtype} models) vs the CPU: max score difference {error:.2e} of the largest "
              f"|score|, top-1 {'agrees' if out[dtype]['top1_agrees'] else 'differs'}, {clock.seconds:.2f} s", flush=True)
    manifest = read_manifest(folder / "factors")
    plan = plan_stages(manifest, {s: str(folder / s) for s in ("pretrained", "finetuned")}, candidates=len(texts),
                       length=max(len(attributor.document_sequence(t)["input_ids"]) for t in texts))
    out["plan_total_bytes"] = plan.total_bytes
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; use --device cpu --shape tiny for a smoke check", file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "shape": args.shape, "sequences": args.sequences, "length": args.length,
                  "batch_size": args.batch_size, "torch": torch.__version__}
        result.update(big_check(args, device, Path(tmp)))
        result["precision"] = precision_check(args, device, Path(tmp))
        result["attribution"] = attribution_check(args, device, Path(tmp))
    result["seconds"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
