"""``hub-msif find-factors``: published stages of a model (with the gradient indexes built from each),
or the newest factors of a pair.
"""

from __future__ import annotations

from hub_msif.apps.arguments import (
    check_model,
    non_empty,
)
from hub_msif.apps.output import print_json, printable
from hub_msif.errors import MsifValueError


def add(sub) -> None:
    p = sub.add_parser("find-factors", help="find published factors for a model or a model pair", description=(
        "Search the Hub for factor repos (tags hub-msif, ekfac). With --model: list every published stage of that "
        "model, newest first, with what it was fitted on and how (a pre-trained stage serves every fine-tune of its "
        "base), and under each pre-trained stage the gradient indexes built from it (tags hub-msif, gradient-index). "
        "With --pretrained and --finetuned: print REPO@TAG of the newest version holding both stages of "
        "exactly these two models (same revisions)."))
    p.add_argument("--model", type=non_empty, help="Hub ID[@REV] or local folder: list its published stages")
    p.add_argument("--revision", type=non_empty, help="with --model: only factors of this revision (branch, tag, sha)")
    p.add_argument("--stage", choices=["pretrained", "finetuned"], help="with --model: only this stage")
    p.add_argument("--pretrained", type=non_empty, help="pre-trained model of a pair: Hub ID[@REV] or local folder")
    p.add_argument("--finetuned", type=non_empty, help="fine-tuned model of a pair: Hub ID[@REV] or local folder")
    p.add_argument("--author", type=non_empty, help="only repos of this user or organization")
    p.add_argument("--token", type=non_empty, help="Hugging Face token (default: HF_TOKEN or the saved login)")
    p.add_argument("--json", action="store_true", help="print JSON (with --model: a list of stages)")


def run(args) -> int:
    pair = args.pretrained is not None or args.finetuned is not None
    if pair == (args.model is not None):
        raise MsifValueError("give --model (its published stages), or --pretrained and --finetuned (a pair)")
    if pair and (args.pretrained is None or args.finetuned is None):
        raise MsifValueError("a pair needs both --pretrained and --finetuned")
    if pair and (args.revision is not None or args.stage is not None):
        raise MsifValueError("--revision and --stage go with --model; for a pair, write ID@REV")
    for model in (args.model, args.pretrained, args.finetuned):
        check_model(model)
    from hub_msif.hub import find_factors
    from hub_msif.hub.find import find_stages

    if pair:
        location = find_factors(args.pretrained, args.finetuned, token=args.token, author=args.author)
        print_json({"location": location}) if args.json else print(printable(location))
        return 0
    found = find_stages(args.model, revision=args.revision, stage=args.stage, token=args.token, author=args.author)
    if args.json:
        print_json(found)
        return 0
    if not found:
        print(f"no published factors of {printable(args.model)}" + (f" ({args.stage} stage)" if args.stage else ""))
        return 0
    for entry in found:
        model, fit = entry["model"], entry["settings"]
        config = fit.get("config") or fit
        data = entry["data"].get("data")
        data = ", ".join(map(str, data)) if isinstance(data, list) else data
        settings = ", ".join(f"{k} {config[k]}" for k in ("label_mode", "seed", "storage_dtype", "samples_per_sequence")
                             if config.get(k) is not None)
        print(f"{printable(entry['location'])}  {entry['stage']}  {printable(model['id'])}@{str(model['revision'])[:19]}  "
              f"fitted on {printable(data)}: {entry['num_sequences']} sequences, {entry['num_tokens']} tokens"
              + (f"; {settings}" if settings else "") + (f"  ({entry['date'][:10]})" if entry.get("date") else ""))
        for index in entry.get("gradient_indexes") or []:
            print("    " + _gradindex_line(index))
    return 0


def _gradindex_line(index: dict) -> str:
    """One published gradient index, printed under the stage it was built from."""
    corpus = index["corpus"].get("data")
    corpus = ", ".join(map(str, corpus)) if isinstance(corpus, list) else corpus
    projection = index["projection"]
    shown = ", ".join(f"{k} {projection[k]}" for k in ("dims", "seed") if projection.get(k) is not None)
    check: dict = index["check"] if isinstance(index.get("check"), dict) else {}
    return (f"gradient index {printable(index['location'])}: {index['num_documents']} documents of "
            f"{printable(corpus)}, {index['bytes_per_document']} bytes per document, {projection.get('kind')} "
            f"projection" + (f" ({shown})" if shown else "")
            + (f"; check recall {check['recall']}" if check.get("recall") is not None else "")
            + ("" if index.get("pinned") else f"; built from {printable(index['stage_location'])}")
            + (f"  ({index['date'][:10]})" if index.get("date") else ""))
