"""Fit EK-FAC factors for both stages of a model pair and publish them on the Hugging Face Hub.

Copy this file and edit the defaults below (or pass the options). It runs what ``hub-msif fit``
and ``hub-msif push factors`` do, from Python:

1. ``fit_stage`` the pre-trained model on (a sample of) its pre-training corpus, then the fine-tuned
   model on its fine-tuning data (prompt/response rows: only the response carries the loss), both
   into one factor folder;
2. ``push_factors`` the pair to a dataset repo (one commit, tagged ``v1``, ``v2``, ...), and the
   pre-trained stage alone to a second repo (``stages="pretrained"``): a pre-trained stage serves
   every fine-tune of its base (``Attributor(factors_pretrained=...)``).

Run: ``python examples/fit_and_push.py --repo your-name/pythia-70m-factors``. Pushing needs a token
with write rights (``HF_TOKEN`` or ``huggingface-cli login``); ``--no-push`` only fits.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hub_msif import FitConfig, fit_stage, push_factors
from hub_msif.data import CorpusSpec

# -- edit these ------------------------------------------------------------------------------------
PRETRAINED = "EleutherAI/pythia-70m"  # Hub id or local folder of the pre-trained model
FINETUNED = "your-name/pythia-70m-qa"  # Hub id or local folder of its fine-tune
PRETRAIN_DATA = "pretrain.jsonl"  # Hub dataset id or local txt/jsonl/parquet file(s), a "text" column
FINETUNE_DATA = "finetune.jsonl"  # the fine-tuning rows, with "prompt" and "response" columns
TEMPLATE = "{prompt}\n"  # how the fine-tune saw a prompt
REPO = "your-name/pythia-70m-factors"  # the dataset repo of the pair's factors
OUT = "factors"  # the local factor folder


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", default=PRETRAINED, help=f"pre-trained model (default {PRETRAINED})")
    parser.add_argument("--finetuned", default=FINETUNED, help=f"fine-tuned model (default {FINETUNED})")
    parser.add_argument("--pretrain-data", default=PRETRAIN_DATA, help="pre-training corpus (text column)")
    parser.add_argument("--finetune-data", default=FINETUNE_DATA, help="fine-tuning data (prompt, response)")
    parser.add_argument("--template", default=TEMPLATE, help="prompt template of the fine-tune, with {prompt}")
    parser.add_argument("--max-sequences", type=int, default=1000, help="sequences per stage (default 1000)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--out", default=OUT, help=f"local factor folder (default {OUT})")
    parser.add_argument("--repo", default=REPO, help=f"dataset repo of the pair's factors (default {REPO})")
    parser.add_argument("--pretrained-repo", default=None,
                        help="dataset repo of the pre-trained stage alone (default: REPO with -pretrained)")
    parser.add_argument("--private", action="store_true", help="create the repos private")
    parser.add_argument("--no-push", action="store_true", help="fit only")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    pretrain = CorpusSpec(data=args.pretrain_data, max_length=args.max_length, max_sequences=args.max_sequences)
    finetune = CorpusSpec(data=args.finetune_data, prompt_column="prompt", response_column="response",
                          template=args.template, max_length=args.max_length, max_sequences=args.max_sequences)
    for stage, model, corpus in (("pretrained", args.pretrained, pretrain), ("finetuned", args.finetuned, finetune)):
        print(f"fitting the {stage} stage of {model} on {corpus.data}")
        fit_stage(model, corpus.data, out, FitConfig(stage=stage, batch_size=args.batch_size), corpus=corpus,
                  load_result=False)
    print(f"factors of both stages in {out}")
    if args.no_push:
        return {"folder": out}
    pair = push_factors(out, args.repo, private=args.private)
    print(f"pushed the pair to {args.repo}@{pair.tag} (commit {pair.commit[:12]})")
    pretrained_repo = args.pretrained_repo or f"{args.repo}-pretrained"
    alone = push_factors(out, pretrained_repo, private=args.private, stages="pretrained")
    print(f"pushed the pre-trained stage alone to {pretrained_repo}@{alone.tag} (commit {alone.commit[:12]})")
    return {"folder": out, "pair": f"{args.repo}@{pair.tag}", "pretrained": f"{pretrained_repo}@{alone.tag}"}


if __name__ == "__main__":
    main()
