"""``hub-msif attribute``: rank candidate documents for one prompt or many queries, or with ``--plan``
print the attribution's memory plan (docs/design.md, "Command line" and "Device and attribution plan").
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hub_msif.apps.arguments import (
    check_location,
    check_model,
    name_folder,
    non_empty,
    non_negative_int,
    positive_finite_float,
    positive_int,
)
from hub_msif.apps.commands.common import PlanAction, add_device, add_threads, use_threads
from hub_msif.apps.output import json_line, print_json, printable, show_progress
from hub_msif.errors import MsifValueError


def add(sub) -> None:
    p = sub.add_parser("attribute", help="rank pre-training documents by their influence on an answer", description=(
        "Retrieve candidate documents for a prompt and answer from an index and rank them by multi-stage influence "
        "(or a baseline). Positive scores support the answer; relative scores divide by the largest |score|."))
    p.add_argument("--factors", type=non_empty, help="pair factor folder (both stages) or Hub REPO[@REV]")
    p.add_argument("--factors-pretrained", type=non_empty, metavar="LOC",
                   help="the pre-trained stage's factors from their own place (folder or REPO[@REV]; replaces "
                        "that stage of --factors): one published base stage serves every fine-tune of it")
    p.add_argument("--factors-finetuned", type=non_empty, metavar="LOC",
                   help="the fine-tuned stage's factors from their own place (folder or REPO[@REV])")
    p.add_argument("--model-path", type=name_folder, action="append", default=[], metavar="NAME=FOLDER",
                   help="where a model that the factors record as a local folder (by NAME and its weights' sha256) "
                        "lies on this machine (repeatable; default: a folder this machine has seen with those weights)")
    p.add_argument("--index", type=non_empty, help="document index folder (hub-msif index build) or Hub REPO[@REV]")
    p.add_argument("--gradindex", type=non_empty, metavar="LOCATION",
                   help="gradient index of the pre-trained stage (hub-msif gradindex build), folder or Hub REPO[@REV]: "
                        "candidates from the whole corpus by compressed MS-IF, then scored exactly")
    p.add_argument("--candidates-from", choices=["embedding", "gradient", "both"], help=(
        "where the --candidates come from: the document index (embedding), the gradient index (gradient), or the "
        "union of both top N (both); default: gradient when --gradindex is given, else embedding"))
    p.add_argument("--documents", type=non_empty, metavar="FILE.jsonl",
                   help="score exactly these candidates instead of retrieving them: JSON Lines with id and text "
                        "(not with --index or --gradindex)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", type=non_empty, help="the question or prompt")
    what.add_argument("--queries", type=non_empty, metavar="FILE.jsonl",
                      help="many queries in one run: JSON Lines with prompt and optional answer and id; "
                           "prints JSON Lines, one object per query, in file order")
    p.add_argument("--answer", type=non_empty, help="the answer to attribute (default: the fine-tuned model's greedy answer)")
    p.add_argument("--pretrained", type=non_empty, help="pre-trained model id or folder (default: the one the factors record)")
    p.add_argument("--finetuned", type=non_empty, help="fine-tuned model id or folder (default: the one the factors record)")
    p.add_argument("--method", default="ms-if", choices=["ms-if", "ss-if", "gdp", "repsim", "bm25"], help="score (default ms-if)")
    p.add_argument("--candidates", type=positive_int, default=100, help="documents retrieved and scored (default 100)")
    p.add_argument("--top", type=positive_int, default=10, help="documents shown (default 10)")
    p.add_argument("--damping", type=positive_finite_float, default=0.1,
                   help="damping, relative to mean(Lambda) per module (default 0.1)")
    p.add_argument("--absolute-damping", action="store_true", help="treat --damping as an absolute value")
    p.add_argument("--damping-pretrained", type=positive_finite_float, metavar="D",
                   help="the pre-trained stage's damping (MS-IF), replacing --damping for that stage")
    p.add_argument("--damping-finetuned", type=positive_finite_float, metavar="D",
                   help="the fine-tuned stage's damping (MS-IF, SS-IF), replacing --damping for that stage")
    p.add_argument("--contrast", choices=["subject"], help=(
        "subject: score the answer's gradient minus that with the prompt's subject replaced by a neutral token "
        "(gradient methods)"))
    p.add_argument("--subject", type=non_empty, help=(
        "with --contrast subject: the subject's text in the prompt (default: the span whose removal lowers the "
        "answer's probability the most)"))
    p.add_argument("--query-rank", type=positive_int,
                   help="keep each module's preconditioned query at this rank (default: full rank)")
    p.add_argument("--normalize", action="store_true",
                   help="gradient methods: cosine of the preconditioned query and the candidate's gradient")
    p.add_argument("--base-model", type=non_empty,
                   help="base model of a PEFT adapter used as the fine-tuned model (default: the adapter's)")
    p.add_argument("--modules", default="all", choices=["all", "mlp"], help="use all tracked modules or MLP only")
    p.add_argument("--allow-revision-mismatch", action="store_true",
                   help="warn instead of failing when a model's revision differs from the factors'")
    p.add_argument("--token", type=non_empty, help="Hugging Face token for private factor or index repos (default: HF_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_threads(p)
    p.add_argument("--refine-steps", type=non_negative_int, default=0, help=(
        "refine the query's EK-FAC iHVPs by N conjugate-gradient steps on the exact Gauss-Newton matrix of each "
        "stage's curvature sample (default 0: plain EK-FAC)"))
    p.add_argument("--refine-data", type=_stage_file, action="append", default=[], metavar="STAGE=FILE", help=(
        "curvature sample of a stage's fitting data (pretrained=FILE, finetuned=FILE; repeatable; default: the "
        "local data file the stage's factors record)"))
    p.add_argument("--refine-sequences", type=positive_int, default=64,
                   help="sequences drawn from each stage's curvature data (default 64)")
    add_device(p)
    g = p.add_argument_group("attribution plan (attribute --plan: print the memory plan and exit; reads only the "
                             "factor manifest and the models' configs)")
    g.add_argument("--plan", action=PlanAction, frees=("prompt", "queries"), help=(
        "print the bytes one attribution needs on its device (both models' weights, both stages' factors, one "
        "query at --query-rank, the --candidates batch's working set; no weights or factor files read) and exit; "
        "--index/--gradindex/--documents and --prompt/--queries are then not needed"))
    g.add_argument("--plan-tokens", type=positive_int, metavar="T",
                   help="tokens per candidate document and per query in the plan (default: the model's maximum)")


def _stage_file(text: str) -> tuple[str, str]:
    stage, sep, path = text.partition("=")
    if not sep or stage not in ("pretrained", "finetuned") or not path.strip():
        raise argparse.ArgumentTypeError(f"must be pretrained=FILE or finetuned=FILE, got {text!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return stage, path


def _run_attribute_plan(args) -> int:
    """Prints the attribution plan: each stage's factor manifest (a folder's, or only the manifest of
    Hub factors) and the two models' configs (the recorded ones, or --pretrained/--finetuned); no
    weights read."""
    from hub_msif.artifacts.manifest import FACTORS, read_manifest, stage_info
    from hub_msif.attribution.plan import format_attribution_plan, plan_stages
    from hub_msif.factors.memory_plan import load_config
    from hub_msif.hub.location import stage_locations
    from hub_msif.hub.pull import pull_factors
    from hub_msif.models import recorded_model

    locations = stage_locations(args.factors, args.factors_pretrained, args.factors_finetuned)
    manifest: dict = {"stages": {}}
    configs, names = {}, {}
    for stage, given in (("pretrained", args.pretrained), ("finetuned", args.finetuned)):
        folder = pull_factors(locations[stage], modules=args.modules, stages=[], token=args.token)
        info = manifest["stages"][stage] = stage_info(read_manifest(folder, FACTORS), stage, locations[stage])
        recorded = info.get("model") or {}
        if not recorded.get("id") and given is None:
            raise MsifValueError(f"the factors record no {stage} model; give --{stage}")
        model, revision = (given, None) if given is not None else recorded_model(recorded, f"{stage} model",
                                                                                dict(args.model_path))
        configs[stage], names[stage] = load_config(model, revision), given or recorded["id"]
    plan = plan_stages(manifest, configs, query_rank=args.query_rank, candidates=args.candidates,
                       model_dtype=args.model_dtype, modules=args.modules, length=args.plan_tokens, names=names)
    if args.json:
        print_json(plan.to_json())
    else:
        print(format_attribution_plan(plan))
    return 0


def _check_factor_locations(args) -> None:
    for location in (args.factors, args.factors_pretrained, args.factors_finetuned):
        if location is not None:
            check_location(location, "factor folder")


def run(args) -> int:
    from hub_msif.apps.inputs import read_documents, read_queries
    from hub_msif.hub.location import stage_locations

    stage_locations(args.factors, args.factors_pretrained, args.factors_finetuned)  # both stages given, at once
    if args.plan:
        _check_factor_locations(args)
        check_model(args.pretrained)
        check_model(args.finetuned)
        return _run_attribute_plan(args)
    if args.plan_tokens is not None:
        raise MsifValueError("--plan-tokens goes with --plan")
    if args.documents is not None and (args.index is not None or args.gradindex is not None):
        raise MsifValueError("--documents are scored as they are: not with --index or --gradindex")
    if args.documents is None and args.index is None and args.gradindex is None:
        raise MsifValueError("give --index, --gradindex or --documents: where the candidates come from")
    if args.candidates_from is not None and args.documents is not None:
        raise MsifValueError("--candidates-from goes with --index and --gradindex, not with --documents")
    if args.candidates_from in ("embedding", "both") and args.index is None:
        raise MsifValueError(f"--candidates-from {args.candidates_from} needs --index (a document index)")
    if args.candidates_from in ("gradient", "both") and args.gradindex is None:
        raise MsifValueError(f"--candidates-from {args.candidates_from} needs --gradindex (a gradient index)")
    if args.subject is not None and args.contrast is None:
        raise MsifValueError("--subject goes with --contrast subject")
    if args.answer is not None and args.queries is not None:
        raise MsifValueError("--answer goes with --prompt; with --queries, give each query's answer in the file")
    queries = read_queries(args.queries) if args.queries is not None else None  # no heavy import before these
    documents = read_documents(args.documents) if args.documents is not None else None
    if args.index is not None:
        check_location(args.index, "index folder")
    if args.gradindex is not None:
        check_location(args.gradindex, "gradient index folder")
    _check_factor_locations(args)
    check_model(args.pretrained)  # loaded only after the index and both stages' factors
    check_model(args.finetuned)
    use_threads(args.threads)
    check_model(args.base_model)
    from hub_msif.attribution.device import resolve_device

    resolve_device(args.device)  # a CUDA device this machine lacks: refused before anything loads
    from hub_msif.attribution.attributor import Attributor
    from hub_msif.attribution.retrieval import DocumentIndex

    index = DocumentIndex.load(args.index, token=args.token) if args.index is not None else None
    if index is not None:
        index.model_paths = dict(args.model_path)  # a local embedding model, too
    gradindex = None
    if args.gradindex is not None:
        from hub_msif.attribution.gradient_index import GradientIndex

        gradindex = GradientIndex.load(args.gradindex, token=args.token)
    attributor = Attributor(args.factors, args.pretrained, args.finetuned, args.modules, args.allow_revision_mismatch,
                            token=args.token, index=index, query_rank=args.query_rank, normalize=args.normalize,
                            base_model=args.base_model, refine_steps=args.refine_steps,
                            curvature_data=dict(args.refine_data), curvature_size=args.refine_sequences,
                            factors_pretrained=args.factors_pretrained, factors_finetuned=args.factors_finetuned,
                            model_paths=dict(args.model_path), device=args.device, model_dtype=args.model_dtype,
                            gradindex=gradindex,
                            damping_pretrained=args.damping_pretrained, damping_finetuned=args.damping_finetuned,
                            contrast=args.contrast, subject=args.subject)
    settings = {"candidates": args.candidates, "top": args.top, "method": args.method, "damping": args.damping,
                "relative": not args.absolute_damping, "candidates_from": args.candidates_from}
    if queries is not None:
        results = attributor.attribute_many([(q.prompt, q.answer) for q in queries], documents, **settings,
                                            show_progress=show_progress())
        lines = [json_line({"id": q.id, **r.to_json(timing=True)}) for q, r in zip(queries, results, strict=True)]
        print("\n".join(lines), flush=True)  # all checked first: no half-written output on a refusal
        return 0
    result = attributor.attribute(args.prompt, args.answer, documents=documents, **settings,
                                  show_progress=show_progress(args.json))
    if args.json:
        print_json(result.to_json(timing=True))
        return 0
    print(f"prompt: {printable(result.prompt)}")
    print(f"answer: {printable(result.answer)}" + ("   (generated by the fine-tuned model)" if result.answer_generated else "")
          + (f"   log p(answer) = {result.answer_logprob:.4f}" if result.answer_logprob is not None else ""))
    print(f"{result.method} over {result.num_candidates} candidates, modules: {printable(result.modules)}")
    if result.stage_one is not None:
        print(stage_one_line(result.stage_one) + (f"; the whole query {result.seconds:.2f} s"
                                                  if result.seconds is not None else ""))
    _print_rows(result.rows)
    if result.opponents:
        print(f"opponents (the most negative scores; rank among all {result.num_candidates} candidates):")
        _print_rows(result.opponents)
    else:
        print("opponents: none (no candidate has a score below 0)")
    print(f"score: {result.method} influence of the document on the answer (positive: supports it, negative: opposes "
          f"it); rel: score / the largest |score| of the {result.num_candidates} candidates; log p(answer): natural-log "
          "probability of the answer's tokens given the prompt under the fine-tuned model")
    return 0


def stage_one_line(stage: dict) -> str:
    """How the candidates were found, in one line (``Attribution.stage_one``)."""
    searched = " and ".join(f"the {'gradient' if k == 'gradient' else 'document'} index ({n} documents)"
                            for k, n in stage["searched"].items())
    check = stage.get("check")
    recall = (f"; the gradient index's last check: recall@10 {check['recall_at_10']:.3f} over {check.get('queries')} "
              f"queries" if check and "recall_at_10" in check else "")
    what = {"embedding": "nearest by sentence embedding", "gradient": "top by compressed MS-IF",
            "both": "union of the embedding and compressed MS-IF tops"}[stage["source"]]
    return f"stage one: {stage['candidates']} candidates ({what}) from {searched} in {stage['seconds']:.3f} s{recall}"


def _print_rows(rows) -> None:
    print(f"{'rank':>4} {'score':>11} {'rel':>6} {'mlp/attn':>17}  document")
    for row in rows:
        roles = row.by_role
        split = f"{roles['mlp']:>8.2g}/{roles['attention']:<8.2g}" if roles else " " * 17
        snippet = row.text if len(row.text) <= 80 else row.text[:77] + "..."
        print(f"{row.rank:>4} {row.score:>11.4g} {row.relative_score:>+6.2f} {split}  [{printable(row.id)}] "
              f"{printable(snippet)}")
