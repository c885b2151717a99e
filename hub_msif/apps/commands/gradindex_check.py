"""``hub-msif gradindex check``: recall@10 of exact MS-IF's top 10 within a gradient index's top 100, on
sampled queries and a sample of the index's corpus (docs/design.md, "Gradient index"). ``add_check``
adds the subcommand to ``hub-msif gradindex``; ``run_check`` runs it.
"""

from __future__ import annotations

from hub_msif.apps.arguments import (
    check_location,
    check_model,
    name_folder,
    non_empty,
    non_negative_int,
    positive_finite_float,
    positive_int,
)
from hub_msif.apps.commands.common import add_device, add_threads, use_threads
from hub_msif.apps.output import print_json, printable
from hub_msif.errors import MsifValueError


def add_check(isub) -> None:
    c = isub.add_parser("check", help="measure the gradient index's recall of exact MS-IF", description=(
        "For N queries sampled (seeded) from a JSON Lines file of prompt/answer, score every document of a seeded "
        "sample of the index's corpus exactly with MS-IF, search the index among the same documents, and report "
        "recall@10: how much of the exact top 10 the index's top 100 holds, averaged over the queries."))
    c.add_argument("--index", required=True, type=non_empty, metavar="LOCATION",
                   help="gradient index folder (hub-msif gradindex build) or Hub REPO[@REV]")
    c.add_argument("--queries", required=True, type=non_empty, metavar="FILE.jsonl",
                   help="JSON Lines with prompt and optional answer and id (an answer left out is generated)")
    c.add_argument("--sample", required=True, type=positive_int, metavar="N", help="queries drawn from the file")
    c.add_argument("--corpus-sample", type=positive_int, metavar="M",
                   help="documents of the index scored exactly per query (default: all of them, up to 2000)")
    c.add_argument("--seed", type=non_negative_int, default=0, help="seed of both samples (default 0)")
    c.add_argument("--factors", type=non_empty, help="pair factor folder (both stages) or Hub REPO[@REV]")
    c.add_argument("--factors-pretrained", type=non_empty, metavar="LOC",
                   help="the pre-trained stage's factors (default with --factors-finetuned: where the index says "
                        "it was built from)")
    c.add_argument("--factors-finetuned", type=non_empty, metavar="LOC", help="the fine-tuned stage's factors")
    c.add_argument("--pretrained", type=non_empty, help="pre-trained model id or folder (default: the recorded one)")
    c.add_argument("--finetuned", type=non_empty, help="fine-tuned model id or folder (default: the recorded one)")
    c.add_argument("--model-path", type=name_folder, action="append", default=[], metavar="NAME=FOLDER",
                   help="where a model the factors record as a local folder lies on this machine (repeatable)")
    c.add_argument("--damping", type=positive_finite_float, default=0.1,
                   help="damping, relative to mean(Lambda) per module (default 0.1)")
    c.add_argument("--absolute-damping", action="store_true", help="treat --damping as an absolute value")
    c.add_argument("--record", action="store_true",
                   help="write the result into the index's manifest (check; a local folder only, nothing else changes)")
    c.add_argument("--token", type=non_empty, help="Hugging Face token for private repos (default: HF_TOKEN)")
    c.add_argument("--json", action="store_true", help="print the result as JSON, with each query's recall")
    add_threads(c)
    add_device(c)


def run_check(args) -> int:
    from hub_msif.apps.inputs import read_queries
    from hub_msif.hub.location import parse_location

    check_location(args.index, "gradient index folder")
    local = parse_location(args.index).folder
    if args.record and local is None:
        raise MsifValueError("--record writes into a local gradient index folder, not into a Hub REPO[@REV]")
    if args.factors is None and args.factors_finetuned is None:
        raise MsifValueError("give --factors (a pair of stages) or --factors-finetuned: the fine-tuned stage")
    for location in (args.factors, args.factors_pretrained, args.factors_finetuned):
        if location is not None:
            check_location(location, "factor folder")
    queries = read_queries(args.queries)  # read whole before any model loads
    check_model(args.pretrained)
    check_model(args.finetuned)
    use_threads(args.threads)
    from hub_msif.attribution.device import resolve_device

    resolve_device(args.device)
    from hub_msif.attribution.attributor import Attributor
    from hub_msif.attribution.gradient_check import check_gradindex, record_check
    from hub_msif.attribution.gradient_index import GradientIndex

    gradindex = GradientIndex.load(args.index, token=args.token)
    pretrained_location = args.factors_pretrained
    if pretrained_location is None and args.factors is None:
        pretrained_location = (gradindex.metadata.get("stage") or {}).get("location")
        if not pretrained_location:
            raise MsifValueError("the gradient index records no location of its pre-trained factors: give "
                                 "--factors-pretrained")
    attributor = Attributor(args.factors, args.pretrained, args.finetuned, token=args.token,
                            factors_pretrained=pretrained_location, factors_finetuned=args.factors_finetuned,
                            model_paths=dict(args.model_path), device=args.device, model_dtype=args.model_dtype,
                            gradindex=gradindex)
    result = check_gradindex(attributor, gradindex, [(q.id, q.prompt, q.answer) for q in queries], args.sample,
                             args.corpus_sample, args.seed, args.damping, not args.absolute_damping)
    if args.record and local is not None:  # --record was refused above for a Hub location
        record_check(local, result)
    if args.json:
        print_json({"index": args.index, **result.to_json(), "recorded": bool(args.record)})
        return 0
    print(f"recall@10 of exact MS-IF's top 10 in the gradient index's top 100: {result.recall_at_10:.3f} "
          f"({len(result.queries)} queries, {result.corpus_sample} of {result.num_documents} documents, damping "
          f"{result.damping:g}{'' if result.relative else ' absolute'}, seed {result.seed})"
          + ("; every sampled document is in the top 100, so 1 by construction" if result.trivial else ""))
    for query in result.queries:
        print(f"  {query.recall_at_10:.2f}  [{printable(query.id)}] {printable(query.prompt)}")
    print(f"exact scoring {result.seconds['exact']:.1f} s, the index's search {result.seconds['index']:.2f} s"
          + (f"; recorded in {printable(local)}" if args.record else ""))
    return 0
