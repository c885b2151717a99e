"""The ``hub-msif`` command line (docs/design.md, "Command line").

Every command has ``--help``; bad input ends in one line on stderr and exit status 2, never a
traceback (set ``HUB_MSIF_DEBUG=1`` to see one); Ctrl-C ends in one line and exit status 130.
Arguments are checked before any model loads or anything is written: argparse ``type=``
functions for single values, ``check_*`` at the top of each runner for paths and locations
(the library checks the rest, e.g. ``FitConfig.validate``, before its first load); see
``hub_msif.apps.arguments``. What is printed goes through ``hub_msif.apps.output``. Heavy imports
(torch, transformers, huggingface_hub) stay inside the runners so that ``--help`` and argument
errors answer at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
from pathlib import Path

from hub_msif import __version__
from hub_msif.apps.arguments import (
    Parser,
    check_existing_folder,
    check_location,
    check_model,
    check_target_folder,
    check_unicode,
    fixed_port_number,
    model_name,
    non_empty,
    non_negative_float,
    non_negative_int,
    port_number,
    positive_finite_float,
    positive_int,
    stage_model_name,
    token_spec,
)
from hub_msif.apps.output import json_line, print_json, printable, quiet_libraries, show_progress
from hub_msif.errors import Interrupted, MsifError, MsifValueError

DEFAULT_CACHE = Path(os.environ.get("HUB_MSIF_CACHE") or Path.home() / ".cache" / "hub_msif")
INTERRUPTED_STATUS = 130  # what shells report for a process ended by SIGINT (128 + 2)


# --- commands ----------------------------------------------------------------------------------


def _add_threads(p) -> None:
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="CPU threads for torch (intra- and inter-op) and OpenMP (default: the libraries' own choice, "
                        "usually all cores; on a busy machine 1 can be many times faster)")


def use_threads(threads: int | None) -> None:
    """``--threads N``: before any work, so that every pool (torch's intra- and inter-op, OpenMP of
    faiss) starts at that size; set through the environment too when torch is not yet imported."""
    if threads is None:
        return
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # once inter-op work has started (a second command in one process) it is fixed
        pass


def _add_fit(sub) -> None:
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
    _add_threads(p)
    _add_fit_sources(p)
    _add_plan_options(p)


def _add_fit_sources(p) -> None:
    """``fit`` options that say where things come from and what they are called, not how to fit."""
    p.add_argument("--model-name", type=model_name, metavar="NAME",
                   help="when --model is a local folder: the name the manifest records it by, with its weights' "
                        "sha256 (default: the folder's name; never its path)")
    p.add_argument("--reuse-pretrained", type=non_empty, metavar="REPO@REV",
                   help="with --stage finetuned: take the pre-trained stage from these published factors (a Hub "
                        "REPO@REV or a folder, pulled and copied into --out) instead of fitting it")


def _fit_settings(args):
    """``(FitConfig, CorpusSpec)`` of the parsed ``fit`` arguments (the corpus's data: None under --plan)."""
    from hub_msif.data import CorpusSpec
    from hub_msif.factors.config import FitConfig
    from hub_msif.options import from_args

    data = args.data[0] if args.data and len(args.data) == 1 else args.data
    return from_args(FitConfig, args), from_args(CorpusSpec, args, data=data)


# --- fit --plan: the memory plan (docs/design.md, "Memory plan") --------------------------------


def _memory_size(text: str) -> int:
    from hub_msif.factors.plan import parse_size

    try:
        return parse_size(text)
    except MsifValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class _PlanAction(argparse.Action):
    """``--plan``: sets the flag and, for this parse, makes --data and --out optional (a plan reads neither)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        for action in parser._actions:
            if action.dest in ("data", "out"):
                action.required = False


def _add_plan_options(p) -> None:
    """``fit --plan`` and its options, added to the ``fit`` parser; with --plan, --data and --out are not needed."""
    g = p.add_argument_group("memory plan (fit --plan: print the plan and exit; reads only the model's config)")
    g.add_argument("--plan", action=_PlanAction,
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


def _run_fit_or_plan(args) -> int:
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
    from hub_msif.factors.plan import plan_fit

    config, corpus = _fit_settings(args)
    processes = args.num_processes or int(os.environ.get("WORLD_SIZE", "1") or 1)
    return plan_fit(args.model, config, num_processes=processes, max_memory=args.max_memory,
                    choose_partitions=args.module_partitions is None, max_length=corpus.max_length,
                    query_rank=args.plan_query_rank, revision=args.revision)


def _run_plan(args) -> int:
    """Prints the memory plan of the fit these arguments describe; reads no data and no weights.
    With ``--measure``, also one timed forward and backward of the planned batch (random weights)."""
    from hub_msif.factors.plan import format_plan, format_timing, measure_fit

    plan = _plan_of(args)
    if not args.measure:
        if args.json:
            print_json(plan.to_json())
        else:
            print(format_plan(plan))
        return 0
    use_threads(args.threads)
    config, corpus = _fit_settings(args)
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

    config, corpus = _fit_settings(args)
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
    from hub_msif.artifacts.manifest import FACTORS, read_manifest
    from hub_msif.attribution.attributor import stage_info
    from hub_msif.hub.pull import pull_factors, reuse_stage
    from hub_msif.models import resolve_adapter

    source = pull_factors(args.reuse_pretrained, stages=["pretrained"])
    recorded = stage_info(read_manifest(source, FACTORS), "pretrained", args.reuse_pretrained)["model"]
    ref = resolve_adapter(args.model, args.revision, args.base_model)[2]
    if ref.base is not None and recorded.get("revision") not in (None, ref.base.revision):
        raise MsifValueError(f"the pre-trained stage at {args.reuse_pretrained} was fitted for "
                             f"{recorded.get('id')}@{recorded.get('revision')}, but the adapter {args.model} sits on "
                             f"{ref.base.id}@{ref.base.revision}")
    reuse_stage(args.reuse_pretrained, args.out, "pretrained")


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


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="run the toy fact world end to end (no account, no network)", description=(
        "Builds (or reuses from the cache) a toy fact world, a trained pre-trained/fine-tuned GPT-NeoX pair, both "
        "stages' factors and a document index; publishes the factors and index to a Hub server of its own on "
        "loopback and pulls them back by tag; answers three held-out questions with the fine-tuned model and "
        "prints the pre-training documents MS-IF ranks highest (from the pulled copies), marking the true proponents."))
    p.add_argument("--cache", default=str(DEFAULT_CACHE / "demo"), type=non_empty,
                   help="where the demo's artifacts are kept (default: $HUB_MSIF_CACHE/demo or ~/.cache/hub_msif/demo)")
    p.add_argument("--top", type=positive_int, default=5, help="documents shown per question (default 5)")
    p.add_argument("--no-publish", action="store_true",
                   help="skip publishing the factors and index to a local Hub and pulling them back")
    p.add_argument("--space", action="store_true",
                   help="afterwards, serve the Gradio Space on the demo's fact world on 127.0.0.1 until Ctrl-C")
    p.add_argument("--port", type=fixed_port_number, help="port of the Space (default: the first free one from 7860)")
    _add_threads(p)
    _add_device(p)


def _add_device(p) -> None:
    """``--device`` and ``--model-dtype`` of ``attribute`` and ``demo`` (docs/design.md, "Device and attribution plan")."""
    p.add_argument("--device", type=_device_text, default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where both models and the factors live (default auto: CUDA when there is one, else the CPU)")
    p.add_argument("--model-dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="dtype of both models' forward and backward (default: as loaded); gradients and "
                        "preconditioning stay float32")


def _device_text(text: str) -> str:
    from hub_msif.attribution.device import check_device_text

    try:
        return check_device_text(text)
    except MsifValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _run_demo(args) -> int:
    check_target_folder(args.cache, "--cache")
    from hub_msif.attribution.device import resolve_device

    resolve_device(args.device)  # a CUDA device this machine lacks: refused before the demo builds anything
    from hub_msif.toy.demo import local_hub_environment  # light: must run before huggingface_hub is imported

    local_hub_environment(args.cache)
    use_threads(args.threads)
    from hub_msif.toy.demo import run

    run(args.cache, top=args.top, publish=not args.no_publish, device=args.device, model_dtype=args.model_dtype)
    if args.space:
        from hub_msif.apps.space import serve_demo

        app, url = serve_demo(args.cache, port=args.port)
        print(f"\nthe Space is serving the fact world at {url} (Ctrl-C to stop)", flush=True)
        try:
            app.block_thread()
        except KeyboardInterrupt:  # the normal way to stop serving: exit status 0
            app.close()
    return 0


def _add_attribute(sub) -> None:
    p = sub.add_parser("attribute", help="rank pre-training documents by their influence on an answer", description=(
        "Retrieve candidate documents for a prompt and answer from an index and rank them by multi-stage influence "
        "(or a baseline). Positive scores support the answer; relative scores divide by the largest |score|."))
    p.add_argument("--factors", type=non_empty, help="pair factor folder (both stages) or Hub REPO[@REV]")
    p.add_argument("--factors-pretrained", type=non_empty, metavar="LOC",
                   help="the pre-trained stage's factors from their own place (folder or REPO[@REV]; replaces "
                        "that stage of --factors): one published base stage serves every fine-tune of it")
    p.add_argument("--factors-finetuned", type=non_empty, metavar="LOC",
                   help="the fine-tuned stage's factors from their own place (folder or REPO[@REV])")
    p.add_argument("--model-path", type=_name_folder, action="append", default=[], metavar="NAME=FOLDER",
                   help="where a model that the factors record as a local folder (by NAME and its weights' sha256) "
                        "lies on this machine (repeatable; default: a folder this machine has seen with those weights)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--index", type=non_empty, help="document index folder (hub-msif index build) or Hub REPO[@REV]")
    where.add_argument("--documents", type=non_empty, metavar="FILE.jsonl",
                       help="score exactly these candidates instead of retrieving them: JSON Lines with id and text")
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
    _add_threads(p)
    p.add_argument("--refine-steps", type=non_negative_int, default=0, help=(
        "refine the query's EK-FAC iHVPs by N conjugate-gradient steps on the exact Gauss-Newton matrix of each "
        "stage's curvature sample (default 0: plain EK-FAC)"))
    p.add_argument("--refine-data", type=_stage_file, action="append", default=[], metavar="STAGE=FILE", help=(
        "curvature sample of a stage's fitting data (pretrained=FILE, finetuned=FILE; repeatable; default: the "
        "local data file the stage's factors record)"))
    p.add_argument("--refine-sequences", type=positive_int, default=64,
                   help="sequences drawn from each stage's curvature data (default 64)")
    _add_device(p)
    g = p.add_argument_group("attribution plan (attribute --plan: print the memory plan and exit; reads only the "
                             "factor manifest and the models' configs)")
    g.add_argument("--plan", action=_AttributePlanAction, help=(
        "print the bytes one attribution needs on its device (both models' weights, both stages' factors, one "
        "query at --query-rank, the --candidates batch's working set; no weights or factor files read) and exit; "
        "--index/--documents and --prompt/--queries are then not needed"))
    g.add_argument("--plan-tokens", type=positive_int, metavar="T",
                   help="tokens per candidate document and per query in the plan (default: the model's maximum)")


def _name_folder(text: str) -> tuple[str, str]:
    name, sep, folder = text.partition("=")
    if not sep or not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"must be NAME=FOLDER, got {text!r}")
    if not Path(folder).expanduser().is_dir():
        raise argparse.ArgumentTypeError(f"no such model folder: {folder}")
    return name, str(Path(folder).expanduser())


def _stage_file(text: str) -> tuple[str, str]:
    stage, sep, path = text.partition("=")
    if not sep or stage not in ("pretrained", "finetuned") or not path.strip():
        raise argparse.ArgumentTypeError(f"must be pretrained=FILE or finetuned=FILE, got {text!r}")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return stage, path


class _AttributePlanAction(argparse.Action):
    """``attribute --plan``: sets the flag and, for this parse, makes the candidate source (--index or
    --documents) and the query (--prompt or --queries) optional: a plan reads neither."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        for group in parser._mutually_exclusive_groups:
            if {a.dest for a in group._group_actions} & {"index", "documents", "prompt", "queries"}:
                group.required = False


def _run_attribute_plan(args) -> int:
    """Prints the attribution plan: each stage's factor manifest (a folder's, or only the manifest of
    Hub factors) and the two models' configs (the recorded ones, or --pretrained/--finetuned); no
    weights read."""
    from hub_msif.artifacts.manifest import FACTORS, read_manifest
    from hub_msif.attribution.attributor import stage_info, stage_locations
    from hub_msif.attribution.plan import format_attribution_plan, plan_stages
    from hub_msif.factors.plan import load_config
    from hub_msif.hub.pull import pull_factors
    from hub_msif.models import recorded_model

    locations = stage_locations(args.factors, args.factors_pretrained, args.factors_finetuned)
    manifest = {"stages": {}}
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


def _run_attribute(args) -> int:
    from hub_msif.apps.inputs import read_documents, read_queries

    if args.factors is None and (args.factors_pretrained is None or args.factors_finetuned is None):
        raise MsifValueError("give --factors (a pair of stages), or --factors-pretrained and --factors-finetuned")
    if args.plan:
        _check_factor_locations(args)
        check_model(args.pretrained)
        check_model(args.finetuned)
        return _run_attribute_plan(args)
    if args.plan_tokens is not None:
        raise MsifValueError("--plan-tokens goes with --plan")
    if args.answer is not None and args.queries is not None:
        raise MsifValueError("--answer goes with --prompt; with --queries, give each query's answer in the file")
    queries = read_queries(args.queries) if args.queries is not None else None  # no heavy import before these
    documents = read_documents(args.documents) if args.documents is not None else None
    if args.index is not None:
        check_location(args.index, "index folder")
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
    attributor = Attributor(args.factors, args.pretrained, args.finetuned, args.modules, args.allow_revision_mismatch,
                            token=args.token, index=index, query_rank=args.query_rank, normalize=args.normalize,
                            base_model=args.base_model, refine_steps=args.refine_steps,
                            curvature_data=dict(args.refine_data), curvature_size=args.refine_sequences,
                            factors_pretrained=args.factors_pretrained, factors_finetuned=args.factors_finetuned,
                            model_paths=dict(args.model_path), device=args.device, model_dtype=args.model_dtype)
    settings = {"candidates": args.candidates, "top": args.top, "method": args.method, "damping": args.damping,
                "relative": not args.absolute_damping}
    if queries is not None:
        results = attributor.attribute_many([(q.prompt, q.answer) for q in queries], documents, **settings,
                                            show_progress=show_progress())
        lines = [json_line({"id": q.id, **r.to_json()}) for q, r in zip(queries, results, strict=True)]
        print("\n".join(lines), flush=True)  # all checked first: no half-written output on a refusal
        return 0
    result = attributor.attribute(args.prompt, args.answer, documents=documents, **settings,
                                  show_progress=show_progress(args.json))
    if args.json:
        print_json(result.to_json())
        return 0
    print(f"prompt: {printable(result.prompt)}")
    print(f"answer: {printable(result.answer)}" + ("   (generated by the fine-tuned model)" if result.answer_generated else "")
          + (f"   log p(answer) = {result.answer_logprob:.4f}" if result.answer_logprob is not None else ""))
    print(f"{result.method} over {result.num_candidates} candidates, modules: {printable(result.modules)}")
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


def _print_rows(rows) -> None:
    print(f"{'rank':>4} {'score':>11} {'rel':>6} {'mlp/attn':>17}  document")
    for row in rows:
        roles = row.by_role
        split = f"{roles['mlp']:>8.2g}/{roles['attention']:<8.2g}" if roles else " " * 17
        snippet = row.text if len(row.text) <= 80 else row.text[:77] + "..."
        print(f"{row.rank:>4} {row.score:>11.4g} {row.relative_score:>+6.2f} {split}  [{printable(row.id)}] "
              f"{printable(snippet)}")


def _add_index(sub) -> None:
    p = sub.add_parser("index", help="build a document index for candidate selection",
                       description="Document indexes: sentence embeddings of pre-training documents, searched with faiss.")
    isub = p.add_subparsers(dest="index_command", required=True, metavar="ACTION")
    b = isub.add_parser("build", help="embed a corpus and write an index folder", description=(
        "Embed every document of a corpus with a sentence-transformers model (normalised) and write an index "
        "folder: index.json (manifest), documents.parquet, embeddings.safetensors."))
    b.add_argument("--data", required=True, nargs="+", type=non_empty,
                   help="datasets Hub id, or local .txt/.jsonl/.parquet files or folders")
    b.add_argument("--data-revision", type=non_empty, help="Hub revision of the dataset")
    b.add_argument("--split", default="train", type=non_empty, help="dataset split (Hub datasets; default: train)")
    b.add_argument("--text-column", type=non_empty, help="column holding the document text (default: text)")
    b.add_argument("--id-column", type=non_empty,
                   help="column holding document ids (default: id if present, else the row number)")
    b.add_argument("--embedding-model", type=non_empty,
                   help="sentence-transformers Hub id or local folder (default: all-MiniLM-L6-v2)")
    b.add_argument("--index-type", default="flat", choices=["flat", "hnsw"],
                   help="exact inner-product search (flat, default) or approximate (hnsw)")
    b.add_argument("--batch-size", type=positive_int, default=64, help="documents per embedding batch (default 64)")
    b.add_argument("--out", required=True, type=non_empty, help="index folder to write")
    b.add_argument("--example", action="append", type=non_empty, dest="examples", metavar="QUESTION",
                   help="an example question to record with the index (repeatable; the Space offers them and the "
                        "index card lists them)")
    b.add_argument("--json", action="store_true", help="print a JSON summary")
    _add_threads(b)


def _run_index(args) -> int:
    check_target_folder(args.out, "--out")  # found out only after embedding the corpus, otherwise
    use_threads(args.threads)
    import time

    from hub_msif.attribution.retrieval import build_index
    from hub_msif.data import CorpusSpec

    start = time.perf_counter()
    spec = CorpusSpec(data=args.data[0] if len(args.data) == 1 else args.data, split=args.split,
                      revision=args.data_revision, text_column=args.text_column)
    index = build_index(spec, embedding_model=args.embedding_model, index_type=args.index_type, out=args.out,
                        id_column=args.id_column, batch_size=args.batch_size,
                        show_progress=show_progress(args.json), example_questions=args.examples)
    meta = index.metadata
    summary = {"out": str(args.out), "num_documents": meta["num_documents"], "dimension": meta["dimension"],
               "embedding_model": meta["embedding_model"], "index_type": meta["index_type"],
               "example_questions": meta.get("example_questions", []), "seconds": round(time.perf_counter() - start, 3)}
    if args.json:
        print_json(summary)
    else:
        print(f"indexed {summary['num_documents']} documents ({summary['dimension']} dims, {summary['index_type']}) "
              f"with {printable(meta['embedding_model']['id'])} into {printable(args.out)} in {summary['seconds']:.1f}s")
    return 0


def _add_push(sub) -> None:
    p = sub.add_parser("push", help="publish factors or an index as a versioned Hub dataset repo, or a Space", description=(
        "Publish a factor folder or an index folder to a Hub dataset repo: the folder is checked (manifest, "
        "sha256 of every file), then all its files and a dataset card go up in one commit, tagged with the next "
        "version vN (or --tag). The repo is created when missing. `push space` publishes a Gradio Space serving "
        "published ones. Needs a token with write access (HF_TOKEN)."))
    psub = p.add_subparsers(dest="artifact", required=True, metavar="ARTIFACT")
    for kind, what in (("factors", "factor folder (one stage or both)"), ("index", "document index folder")):
        q = psub.add_parser(kind, help=f"push a {what}", description=f"Push a {what} as one commit plus a version tag.")
        q.add_argument("folder", type=non_empty, help=what)
        q.add_argument("--repo", required=True, type=non_empty, help="dataset repo id, namespace/name (created when missing)")
        q.add_argument("--tag", type=non_empty, help="version tag (default: the next vN); an existing tag is refused")
        q.add_argument("--private", action="store_true", help="create the repo private (when it does not exist)")
        q.add_argument("--message", type=non_empty, help="commit message (default: 'hub_msif <artifact> <tag>')")
        q.add_argument("--license", default="apache-2.0", type=non_empty,
                       help="license in the card's metadata (default apache-2.0)")
        q.add_argument("--token", type=non_empty, help="Hugging Face token (default: HF_TOKEN or the saved login)")
        q.add_argument("--json", action="store_true", help="print a JSON summary")
        if kind == "factors":
            q.add_argument("--stage", choices=["pretrained", "finetuned", "both"],
                           help="publish this stage alone (a pre-trained stage serves every fine-tune of its base) "
                                "or both (default: every stage the folder holds)")
            q.add_argument("--model-name", action="append", default=[], type=stage_model_name, metavar="STAGE=NAME",
                           help="what the card calls a stage's model when it is a local folder (repeatable; default: "
                                "the folder's name and its weights' short sha256, never its path)")
        else:
            q.add_argument("--model-name", type=model_name, metavar="NAME",
                           help="what the card calls the embedding model when it is a local folder (default: the "
                                "folder's name and its weights' short sha256, never its path)")
    _add_push_space(psub)


def _add_push_space(psub) -> None:
    q = psub.add_parser("space", help="publish a Gradio Space serving published factors and an index", description=(
        "Publish a Gradio Space that serves published factors and a published index, as one commit to a Hub "
        "space repo (created when missing): app.py, README.md, requirements.txt pinned to the tested versions, "
        "msif_space.json (what it serves) and a wheel of this hub_msif. The factor repo's card then links it."))
    q.add_argument("--repo", required=True, type=non_empty, help="space repo id, namespace/name (created when missing)")
    q.add_argument("--factors", type=non_empty, help="published pair factors, REPO@REV (e.g. a tag v1)")
    q.add_argument("--factors-pretrained", type=non_empty, metavar="REPO@REV",
                   help="the published pre-trained stage (its own repo, or a pair's; replaces that stage of --factors)")
    q.add_argument("--factors-finetuned", type=non_empty, metavar="REPO@REV",
                   help="the published fine-tuned stage (its own repo, or a pair's)")
    q.add_argument("--index", required=True, type=non_empty, help="published document index, REPO@REV")
    q.add_argument("--private", action="store_true", help="create the Space private (when it does not exist)")
    q.add_argument("--hardware", type=non_empty, help="Space hardware to request (cpu-basic, t4-small, a10g-small, "
                                                      "l4x1, a100-large, zero-a10g, ...)")
    q.add_argument("--wheel", type=non_empty, help="hub_msif wheel to ship (default: one packed from this hub_msif)")
    q.add_argument("--message", type=non_empty, help="commit message")
    q.add_argument("--no-card-link", action="store_true", help="leave the factor repo's card as it is")
    q.add_argument("--replace", action="store_true",
                   help="replace an existing Space of another sdk, or one hub_msif did not make, deleting its files "
                        "(refused without it, naming what would be deleted)")
    q.add_argument("--token", type=non_empty, help="Hugging Face token (default: HF_TOKEN or the saved login)")
    q.add_argument("--json", action="store_true", help="print a JSON summary")


def _run_push_space(args) -> int:
    from hub_msif.hub.space import given_wheel, push_space

    if args.wheel is not None:
        given_wheel(args.wheel)  # before any Hub traffic
    pushed = push_space(args.repo, args.factors, args.index, private=args.private, hardware=args.hardware,
                        token=args.token, wheel=args.wheel, commit_message=args.message,
                        link_card=not args.no_card_link, factors_pretrained=args.factors_pretrained,
                        factors_finetuned=args.factors_finetuned, replace=args.replace)
    factors = args.factors if not (args.factors_pretrained or args.factors_finetuned) else {
        "pretrained": args.factors_pretrained or args.factors, "finetuned": args.factors_finetuned or args.factors}
    summary = {"repo": args.repo, "commit": pushed.commit, "url": pushed.url, "factors": factors,
               "index": args.index, "card_linked": pushed.card_linked}
    if args.json:
        print_json(summary)
    else:
        shown = factors if isinstance(factors, str) else f"{factors['pretrained']} + {factors['finetuned']}"
        print(f"pushed the Space {args.repo} (commit {pushed.commit}) serving {printable(shown)} and "
              f"{printable(args.index)}: {pushed.url}" + ("" if pushed.card_linked or args.no_card_link else
                                                          "; the factor card does not link it (see the warning)"))
    return 0


def _run_push(args) -> int:
    from hub_msif.hub.location import check_repo_id

    if args.artifact == "space":
        return _run_push_space(args)
    check_repo_id(args.repo)  # push checks it too, but only after hashing every file of the folder
    check_existing_folder(args.folder, "factor folder" if args.artifact == "factors" else "index folder")
    from hub_msif.hub import push_factors, push_index

    if args.artifact == "factors":
        names = {}
        for stage, name in args.model_name:
            if stage in names:
                raise MsifValueError(f"--model-name {stage}= is given twice")
            names[stage] = name
        push, naming = push_factors, {"model_names": names or None, "stages": args.stage}
    else:
        push, naming = push_index, {"model_name": args.model_name}
    pushed = push(args.folder, args.repo, tag=args.tag, private=args.private, token=args.token,
                  commit_message=args.message, license=args.license, **naming)
    commit, tag = pushed
    summary = {"repo": args.repo, "tag": tag, "commit": commit, "location": f"{args.repo}@{tag}",
               "created": pushed.created}
    if args.json:
        print_json(summary)
    elif pushed.created:
        print(f"pushed {args.artifact} {printable(args.folder)} to {args.repo}@{printable(tag)} (commit {commit})")
    else:
        print(f"{args.artifact} {printable(args.folder)} is already published as {args.repo}@{printable(tag)} "
              f"(commit {commit}): nothing written")
    return 0


def _add_pull(sub) -> None:
    p = sub.add_parser("pull", help="download published factors or an index into the Hugging Face cache",
                       description=(
        "Download factors or an index from REPO[@REV] (branch, tag or commit sha; default main) into the Hugging "
        "Face cache, only the files needed, each checked against the manifest's sha256; prints the local folder. "
        "Works offline (HF_HUB_OFFLINE=1) for what is cached."))
    p.add_argument("artifact", choices=["factors", "index"], help="what to pull")
    p.add_argument("location", type=non_empty, help="REPO[@REV], e.g. msif-team/pythia-410m-factors@v2")
    p.add_argument("--modules", default="all", choices=["all", "mlp"], help="factors: all modules or MLP only")
    p.add_argument("--token", type=non_empty, help="Hugging Face token for private repos (default: HF_TOKEN or the saved login)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def _run_pull(args) -> int:
    from hub_msif.hub import pull_factors, pull_index

    if args.artifact == "factors":
        folder = pull_factors(args.location, modules=args.modules, token=args.token)
    else:
        folder = pull_index(args.location, token=args.token)
    if args.json:
        print_json({"location": args.location, "folder": str(folder)})
    else:
        print(printable(folder))
    return 0


def _add_find_factors(sub) -> None:
    p = sub.add_parser("find-factors", help="find published factors for a model or a model pair", description=(
        "Search the Hub for factor repos (tags hub-msif, ekfac). With --model: list every published stage of that "
        "model, newest first, with what it was fitted on and how (a pre-trained stage serves every fine-tune of its "
        "base). With --pretrained and --finetuned: print REPO@TAG of the newest version holding both stages of "
        "exactly these two models (same revisions)."))
    p.add_argument("--model", type=non_empty, help="Hub ID[@REV] or local folder: list its published stages")
    p.add_argument("--revision", type=non_empty, help="with --model: only factors of this revision (branch, tag, sha)")
    p.add_argument("--stage", choices=["pretrained", "finetuned"], help="with --model: only this stage")
    p.add_argument("--pretrained", type=non_empty, help="pre-trained model of a pair: Hub ID[@REV] or local folder")
    p.add_argument("--finetuned", type=non_empty, help="fine-tuned model of a pair: Hub ID[@REV] or local folder")
    p.add_argument("--author", type=non_empty, help="only repos of this user or organization")
    p.add_argument("--token", type=non_empty, help="Hugging Face token (default: HF_TOKEN or the saved login)")
    p.add_argument("--json", action="store_true", help="print JSON (with --model: a list of stages)")


def _run_find_factors(args) -> int:
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
    return 0


def _add_hub(sub) -> None:
    p = sub.add_parser("hub", help="a local Hugging Face Hub compatible server", description=(
        "Tools for a Hub-compatible server on this machine (for offline work and tests)."))
    hsub = p.add_subparsers(dest="hub_command", required=True, metavar="ACTION")
    s = hsub.add_parser("serve", help="serve repos from a folder over HTTP until Ctrl-C", description=(
        "Serve a Hub-compatible HTTP API (repos, commits, LFS, refs, downloads, search) with repos stored under "
        "--root. Point clients at it with HF_ENDPOINT=<printed URL> and HF_HUB_DISABLE_XET=1. Tokens given with "
        "--token are added to ROOT/tokens.json and kept for later runs; reads of public repos need no token."))
    s.add_argument("--root", required=True, type=non_empty, help="folder holding the repos (created when missing)")
    s.add_argument("--host", default="127.0.0.1", type=non_empty, help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=port_number, default=8765, help="port (default 8765; 0 picks a free one)")
    s.add_argument("--token", action="append", default=[], type=token_spec, metavar="TOKEN=USER[:ORG1,ORG2][:read]",
                   help="add a token (repeatable): it may write to USER/ and the ORGs' namespaces, or only read")
    s.add_argument("--max-request-bytes", type=positive_int, default=100_000_000, metavar="N",
                   help="refuse (413) a request body over N bytes, e.g. a commit payload (default 100000000, the "
                        "Hub's limit); bodies without a token are capped at 1 MiB and are never read before the "
                        "token is checked; LFS uploads stream to disk, bounded by the size their batch announced")
    g = hsub.add_parser("gc", help="remove uploads that no commit references", description=(
        "Remove LFS uploads and blobs of a server root that no commit references (left by pushes killed before "
        "their commit), once they are older than --grace-seconds, so that a commit still in flight keeps its "
        "uploads. A running server does the same at start-up."))
    g.add_argument("--root", required=True, type=non_empty, help="the server's root folder")
    g.add_argument("--grace-seconds", type=non_negative_float, default=None,
                   help="keep unreferenced uploads younger than this (default: one day, the upload URLs' lifetime)")
    g.add_argument("--json", action="store_true", help="print a JSON summary")


def _run_hub(args) -> int:
    if args.hub_command == "gc":
        return _run_hub_gc(args)
    root = Path(args.root).expanduser()
    check_target_folder(root, "--root")
    from hub_msif.hub.server import HubServer, load_tokens, save_tokens

    try:
        tokens = load_tokens(root)
    except (ValueError, TypeError, AttributeError) as err:  # not JSON, or not {token: {user, orgs, role}}
        raise MsifValueError(f"{root / 'tokens.json'} cannot be read: {err}") from err
    tokens.update(dict(args.token))
    created = not root.exists()
    if args.token:  # saved even when the port is busy: a server running on this root picks them up
        root.mkdir(parents=True, exist_ok=True)
        save_tokens(root, tokens)
    # Ctrl-C and SIGTERM stop the server even where the shell started it with SIGINT ignored
    # (a background job): Python then installs no KeyboardInterrupt handler of its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    server = HubServer(root, host=args.host, port=args.port, max_request_bytes=args.max_request_bytes)
    try:
        server.start()
    except OSError as err:  # address in use, unknown host, a privileged port
        if created:  # leave no empty root behind for a server that never ran
            shutil.rmtree(root, ignore_errors=True)
        raise OSError(f"cannot listen on {args.host} port {args.port}: {err.strerror or err}") from err
    users = ", ".join(sorted({f"{i['user']} ({i['role']})" for i in tokens.values()})) or "none: read-only"
    print(f"Hub server at {server.url} serving {printable(root)} (tokens: {users}); Ctrl-C stops it", flush=True)
    print(f"  export HF_ENDPOINT={server.url} HF_HUB_DISABLE_XET=1", flush=True)
    server.serve_forever()  # returns on Ctrl-C or SIGTERM: the normal way to stop, exit status 0
    return 0


def _run_hub_gc(args) -> int:
    root = Path(args.root).expanduser()
    check_existing_folder(root, "hub server root")
    from hub_msif.hub.server import DEFAULT_GRACE_SECONDS, collect_garbage

    grace = DEFAULT_GRACE_SECONDS if args.grace_seconds is None else args.grace_seconds
    removed, freed = collect_garbage(root, grace_seconds=grace)
    if args.json:
        print_json({"root": str(root), "removed": removed, "bytes": freed, "grace_seconds": grace})
    else:
        print(f"removed {removed} unreferenced file(s), {freed} bytes, from {printable(root)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="hub-msif", description=(
        "Multi-stage influence functions: attribute a fine-tuned LLM's answers to pre-training documents, "
        "with EK-FAC factors shared on the Hugging Face Hub."))
    parser.add_argument("--version", action="version", version=f"hub_msif {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")  # subparsers are Parser too
    _add_fit(sub)
    _add_demo(sub)
    _add_index(sub)
    _add_attribute(sub)
    _add_push(sub)
    _add_pull(sub)
    _add_find_factors(sub)
    _add_hub(sub)
    return parser


RUNNERS = {"fit": _run_fit_or_plan, "demo": _run_demo, "index": _run_index, "attribute": _run_attribute}
RUNNERS.update({"push": _run_push, "pull": _run_pull, "find-factors": _run_find_factors})
RUNNERS["hub"] = _run_hub


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    quiet_libraries()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    debug = os.environ.get("HUB_MSIF_DEBUG", "") not in ("", "0")
    if threading.current_thread() is threading.main_thread():
        # Started with SIGINT ignored (a background job of a script), Python installs no handler:
        # Ctrl-C or kill -INT would then be lost instead of ending the command with status 130.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        check_unicode(parser, args)  # before any runner: text reaches tokenizers and JSON output
        return RUNNERS[args.command](args)
    except (MsifError, OSError) as err:  # anything else is a bug and shows its traceback
        if debug:
            raise
        print(f"hub-msif {args.command}: error: {printable(str(err) or type(err).__name__)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C; an Interrupted says what it left behind
        if debug:
            raise
        left = f": {printable(err)}" if isinstance(err, Interrupted) and str(err) else ""
        print(f"hub-msif {args.command}: interrupted{left}", file=sys.stderr)
        return INTERRUPTED_STATUS


if __name__ == "__main__":
    sys.exit(main())
