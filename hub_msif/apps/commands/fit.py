"""``hub-msif fit``: fit one stage's EK-FAC factors, or with ``--plan`` print its memory plan
(docs/design.md, "Fitting EK-FAC" and "Memory plan").

The options that change the factors are generated from the fields of ``FitConfig`` and ``CorpusSpec``
(``hub_msif.options``), so that a card's reproduce command knows them all.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from hub_msif.apps.arguments import (
    check_location,
    check_target_folder,
    model_name,
    non_empty,
    positive_int,
)
from hub_msif.apps.commands.common import PlanAction, add_threads, use_threads
from hub_msif.apps.output import print_json, printable, show_progress
from hub_msif.errors import MsifValueError


def add(sub) -> None:
    from hub_msif.data import CorpusSpec
    from hub_msif.factors.config import FitConfig
    from hub_msif.options import add_options

    p = sub.add_parser("fit", help="fit one stage's EK-FAC factors", description=(
        "Fit EK-FAC factors of one training stage (a model and the text it was trained on) and save "
        "them into a factor folder. Run under `accelerate launch` for several processes or GPUs."))
    p.add_argument("--model", required=True, type=non_empty, help="Hub model id or local model folder")
    p.add_argument("--revision", type=non_empty, help="Hub revision (branch, tag or commit sha) of the model")
    p.add_argument("--base-model", type=non_empty,
                   help="when --model is a PEFT (LoRA) adapter: its base model id or folder (default: the adapter's)")
    # The settings that change the factors are generated from the fields of FitConfig and CorpusSpec
    # (help text, flag, type in their metadata), so the card's reproduce command knows them all.
    add_options(p, FitConfig, only=["stage"])
    p.add_argument("--data", required=True, nargs="+", type=non_empty,
                   help="datasets Hub id, or local .txt/.jsonl/.parquet files or folders")
    add_options(p, CorpusSpec)
    add_options(p, FitConfig, skip=["stage"])
    p.add_argument("--out", required=True, type=non_empty, help="factor folder to write (a stage already there is replaced)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_threads(p)
    _add_sources(p)
    _add_plan_options(p)


def _add_sources(p) -> None:
    """``fit`` options that say where things come from and what they are called, not how to fit."""
    p.add_argument("--model-name", type=model_name, metavar="NAME",
                   help="when --model is a local folder: the name the manifest records it by, with its weights' "
                        "sha256 (default: the folder's name; never its path)")
    p.add_argument("--reuse-pretrained", type=non_empty, metavar="REPO@REV",
                   help="with --stage finetuned: take the pre-trained stage from these published factors (a Hub "
                        "REPO@REV or a folder, pulled and copied into --out) instead of fitting it")


def fit_settings(args):
    """``(FitConfig, CorpusSpec)`` of the parsed ``fit`` arguments (the corpus's data: None under --plan)."""
    from hub_msif.data import CorpusSpec
    from hub_msif.factors.config import FitConfig
    from hub_msif.options import from_args

    data = args.data[0] if args.data and len(args.data) == 1 else args.data
    return from_args(FitConfig, args), from_args(CorpusSpec, args, data=data)


def _memory_size(text: str) -> int:
    from hub_msif.factors.memory_plan import parse_size

    try:
        return parse_size(text)
    except MsifValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_plan_options(p) -> None:
    """``fit --plan`` and its options, added to the ``fit`` parser; with --plan, --data and --out are not needed."""
    g = p.add_argument_group("memory plan (fit --plan: print the plan and exit; reads only the model's config)")
    g.add_argument("--plan", action=PlanAction, frees=("data", "out"),
                   help="print the memory plan of this fit per process (no data or weights read) and exit")
    g.add_argument("--num-processes", type=positive_int, default=None,
                   help="processes of the planned fit (default: the launcher's WORLD_SIZE, else 1)")
    g.add_argument("--max-memory", type=_memory_size, metavar="SIZE",
                   help="memory per process, e.g. 70GB or 40GiB: the plan picks the fewest module partitions that fit")
    g.add_argument("--query-rank", dest="plan_query_rank", type=positive_int, metavar="R",
                   help="rank of the preconditioned query whose bytes the plan reports (default: full rank)")
    g.add_argument("--measure", action="store_true",
                   help="with --plan: time one forward and backward of the planned batch (the model built from its "
                        "config with random weights, on this machine) and estimate the fit's time")


def run(args) -> int:
    """``fit --plan`` prints the plan. A fit with ``--max-memory`` is planned first: a one-line error before
    any data or weights are read when nothing fits, else the plan's number of module partitions. (Every
    real fit prints its plan once the model is loaded: ``fit_factors``.)"""
    if args.plan:
        return _run_plan(args)
    if args.measure:
        raise MsifValueError("--measure goes with --plan (it times the planned fit's batch)")
    if args.max_memory is not None:
        args.module_partitions = _plan_of(args).module_partitions
    elif args.module_partitions is None:
        args.module_partitions = 1
    return _run_fit(args)


def _plan_of(args):
    from hub_msif.factors.memory_plan import plan_fit

    config, corpus = fit_settings(args)
    processes = args.num_processes or int(os.environ.get("WORLD_SIZE", "1") or 1)
    return plan_fit(args.model, config, num_processes=processes, max_memory=args.max_memory,
                    choose_partitions=args.module_partitions is None, max_length=corpus.max_length,
                    query_rank=args.plan_query_rank, revision=args.revision)


def _run_plan(args) -> int:
    """Prints the memory plan of the fit these arguments describe; reads no data and no weights.
    With ``--measure``, also one timed forward and backward of the planned batch (random weights)."""
    from hub_msif.factors.memory_plan import format_plan, format_timing, measure_fit

    plan = _plan_of(args)
    if not args.measure:
        if args.json:
            print_json(plan.to_json())
        else:
            print(format_plan(plan))
        return 0
    use_threads(args.threads)
    config, corpus = fit_settings(args)
    tokens = corpus.max_tokens
    if tokens is None and corpus.max_sequences is not None:
        tokens = corpus.max_sequences * corpus.max_length
    timing = measure_fit(args.model, config, plan, tokens=tokens, revision=args.revision)
    if args.json:
        print_json(plan.to_json() | {"measured": timing.to_json()})
    else:
        print(format_plan(plan))
        print(format_timing(timing))
    return 0


def _run_fit(args) -> int:
    check_target_folder(args.out, "--out")  # found out only when the fitted factors are saved, otherwise
    if args.reuse_pretrained is not None:
        if args.stage != "finetuned":
            raise MsifValueError("--reuse-pretrained goes with --stage finetuned: it supplies the pre-trained stage")
        check_location(args.reuse_pretrained, "factor folder")
    use_threads(args.threads)
    if args.reuse_pretrained is not None:
        _reuse_pretrained(args)
    from hub_msif.factors.fit import fit_stage

    config, corpus = fit_settings(args)
    # Not loaded back whole: each process holds only its own modules; the summary reads one at a time.
    factors = fit_stage(args.model, corpus.data, args.out, config, corpus=corpus, revision=args.revision,
                        load_result=False, show_progress=show_progress(args.json), base_model=args.base_model,
                        model_name=args.model_name)
    from accelerate import PartialState

    if PartialState().is_main_process:
        _print_summary(factors if factors is not None else _StageOnDisk(Path(args.out), args.stage), args.out, args.json)
    return 0


def _reuse_pretrained(args) -> None:
    """``fit --reuse-pretrained LOC``: the published pre-trained stage copied into --out before the
    fine-tuned fit (which then checks that both stages track the same modules). A PEFT adapter
    whose base is not the model that stage was fitted for is refused before anything is copied."""
    from hub_msif.hub.pull import reuse_stage
    from hub_msif.models import resolve_adapter

    ref = resolve_adapter(args.model, args.revision, args.base_model)[2]

    def same_base(info: dict) -> None:
        recorded = info.get("model") or {}
        if ref.base is not None and recorded.get("revision") not in (None, ref.base.revision):
            raise MsifValueError(f"the pre-trained stage at {args.reuse_pretrained} was fitted for "
                                 f"{recorded.get('id')}@{recorded.get('revision')}, but the adapter {args.model} sits "
                                 f"on {ref.base.id}@{ref.base.revision}")

    reuse_stage(args.reuse_pretrained, args.out, "pretrained", check=same_base)


class _StageOnDisk:
    """A fitted stage as the fit summary reads it, each module loaded (and dropped) in turn."""

    def __init__(self, folder: Path, stage: str):
        from hub_msif.artifacts.manifest import read_manifest

        self.folder, self.stage = folder, stage
        self.info = read_manifest(folder)["stages"][stage]
        self.modules = self

    def values(self):
        from hub_msif.factors.storage import load_module_file

        return (load_module_file(self.folder, entry, self.stage) for entry in self.info["modules"])


def _print_summary(factors, out, as_json: bool) -> None:
    fit = factors.info["fit"]
    summary = {
        "out": str(out), "stage": factors.stage, "model": factors.info["model"],
        "num_sequences": fit["num_sequences"], "num_tokens": fit["num_tokens"], "seconds": fit["seconds"],
        "modules": [{"name": m.spec.name, "role": m.spec.role, "blocks": m.spec.num_blocks,
                     "shape": [m.spec.d_out, m.spec.d_in], "mean_lambda": float(m.lam.double().mean())}
                    for m in factors.modules.values()],
    }
    if as_json:
        print_json(summary)
        return
    print(f"{factors.stage} factors for {printable(summary['model']['id'])} ({summary['model']['revision'][:19]}) "
          f"in {printable(out)}")
    print(f"fitted on {summary['num_sequences']} sequences, {summary['num_tokens']} tokens in {summary['seconds']:.1f}s")
    print(f"{'module':<48} {'role':<9} {'blocks':>6} {'d_out x d_in':>13} {'mean Lambda':>12}")
    for m in summary["modules"]:
        shape = f"{m['shape'][0]}x{m['shape'][1]}"
        print(f"{m['name']:<48} {m['role']:<9} {m['blocks']:>6} {shape:>13} {m['mean_lambda']:>12.4g}")
