"""``hub-msif gradindex``: the gradient index (docs/design.md, "Gradient index").

``gradindex build`` projects every document's pre-trained-stage gradient and writes a gradient index
folder; run it under ``accelerate launch -m hub_msif gradindex build ...`` to split the documents
across processes (each writes its own shards; rank 0 writes the manifest last). A killed build
resumes when started again with the same arguments.

Each action is a parser added in ``add`` and a runner in ``ACTIONS``; ``gradindex check`` (the recall
of the index against exact MS-IF) lives in ``gradindex_check``.
"""

from __future__ import annotations

from hub_msif.apps.arguments import (
    check_location,
    check_target_folder,
    name_folder,
    non_empty,
    non_negative_float,
    positive_int,
)
from hub_msif.apps.commands.common import add_threads, device_text, use_threads
from hub_msif.apps.commands.gradindex_check import add_check, run_check
from hub_msif.apps.output import print_json, printable, show_progress


def add(sub) -> None:
    p = sub.add_parser("gradindex", help="build or check a gradient index (whole-corpus MS-IF candidates)",
                       description="Gradient indexes: every document's pre-trained-stage gradient, projected and "
                                   "compressed, searched with faiss by a query's multi-stage vector.")
    gsub = p.add_subparsers(dest="gradindex_command", required=True, metavar="ACTION")
    _add_build(gsub)
    add_check(gsub)


def _add_build(gsub) -> None:
    from hub_msif.attribution.gradient_defaults import (
        ANN_CHOICES,
        DEFAULT_BALANCE,
        DEFAULT_BATCH_SIZE,
        DEFAULT_DIMS,
        DEFAULT_K,
        DEFAULT_SHARD_SIZE,
        PROJECTION_KINDS,
    )
    from hub_msif.data import CorpusSpec
    from hub_msif.options import add_options

    b = gsub.add_parser("build", help="project a corpus's gradients into a gradient index folder", description=(
        "For every document of the corpus, its gradient under the stage's model, projected in the stage's EK-FAC "
        "eigenbasis (seeded Kronecker projection, then mixed into --dims numbers), written as float16 shards with "
        "a manifest gradindex.json (sha256 of every file). Resumes after a kill; split across processes under "
        "`accelerate launch -m hub_msif gradindex build ...`."))
    b.add_argument("--factors", required=True, type=non_empty, metavar="STAGE_LOCATION",
                   help="factor folder or Hub REPO[@REV] holding the stage")
    b.add_argument("--stage", default="pretrained", choices=["pretrained", "finetuned"],
                   help="the stage whose gradients are indexed (default: pretrained, the candidates of MS-IF)")
    b.add_argument("--data", required=True, nargs="+", type=non_empty,
                   help="datasets Hub id, or local .txt/.jsonl/.parquet files or folders")
    add_options(b, CorpusSpec, only=CORPUS_OPTIONS)  # the corpus options of `fit`, defined once in CorpusSpec
    b.add_argument("--id-column", type=non_empty,
                   help="column holding document ids (default: id if present, else the row number)")
    b.add_argument("--out", required=True, type=non_empty, help="gradient index folder to write (or to resume)")
    b.add_argument("--projection", default="kronecker", choices=list(PROJECTION_KINDS),
                   help="kronecker (default: compressed) or identity (every module whole: exact, large)")
    b.add_argument("--k", type=positive_int, default=DEFAULT_K,
                   help=f"projection size per side and module (default {DEFAULT_K}; capped at the module's size)")
    b.add_argument("--dims", type=positive_int, default=DEFAULT_DIMS,
                   help=f"numbers per document after mixing the modules (default {DEFAULT_DIMS})")
    b.add_argument("--balance", type=non_negative_float, default=DEFAULT_BALANCE,
                   help=f"share of the damped inverse put on the documents' side, 0 to 1 (default {DEFAULT_BALANCE})")
    b.add_argument("--damping", type=non_negative_float, default=None,
                   help="relative damping of the side scales (default: the attribution default); queries choose "
                        "their own damping")
    b.add_argument("--seed", type=int, default=0, help="seed of the random projections (default 0)")
    b.add_argument("--ann", default="flat", choices=list(ANN_CHOICES),
                   help="search recorded for the index: flat (exact inner product, default) or ivf,pq")
    b.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"documents per forward and backward pass (default {DEFAULT_BATCH_SIZE})")
    b.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE,
                   help=f"documents per shard file (default {DEFAULT_SHARD_SIZE})")
    b.add_argument("--device", type=device_text, default="auto", metavar="auto|cpu|cuda[:N]",
                   help="where the model runs (default auto: CUDA when there is one); under accelerate launch each "
                        "process takes its own")
    b.add_argument("--model-path", type=name_folder, action="append", default=[], metavar="NAME=FOLDER",
                   help="where a model that the factors record as a local folder lies on this machine (repeatable)")
    b.add_argument("--json", action="store_true", help="print a JSON summary")
    add_threads(b)


def run(args) -> int:
    return ACTIONS[args.gradindex_command](args)


def _run_build(args) -> int:
    check_target_folder(args.out, "--out")
    check_location(args.factors, "factor folder")
    if not 0 <= args.balance <= 1:
        from hub_msif.errors import MsifValueError

        raise MsifValueError(f"--balance must be from 0 to 1, got {args.balance}")
    use_threads(args.threads)
    from hub_msif.attribution.checks import DEFAULT_DAMPING
    from hub_msif.attribution.gradient_index_build import build_gradindex
    from hub_msif.data import CorpusSpec
    from hub_msif.options import from_args, option_fields

    corpus = from_args(CorpusSpec, args, skip=[f.name for f, _ in option_fields(CorpusSpec) if f.name not in CORPUS_OPTIONS],
                       data=args.data[0] if len(args.data) == 1 else args.data)
    manifest = build_gradindex(
        args.factors, corpus, args.out, stage=args.stage, kind=args.projection, k=args.k, dims=args.dims,
        balance=args.balance, seed=args.seed, damping=args.damping if args.damping is not None else DEFAULT_DAMPING,
        ann=args.ann, batch_size=args.batch_size, shard_size=args.shard_size, id_column=args.id_column,
        device=args.device, model_paths=dict(args.model_path), show_progress=show_progress(args.json))
    if manifest is None:  # not the main process
        return 0
    build = manifest["build"]
    summary = {"out": str(args.out), "num_documents": manifest["num_documents"], "dims": manifest["projection"]["dims"],
               "projection": manifest["projection"]["kind"], "stage": manifest["stage"]["name"],
               "model": manifest["stage"]["model"], "num_processes": build["num_processes"],
               "bytes_per_document": build["bytes_per_document"], "seconds": build["seconds"]}
    if args.json:
        print_json(summary)
    else:
        print(f"indexed the {summary['stage']} gradients of {summary['num_documents']} documents "
              f"({summary['dims']} dims, {summary['projection']}, {summary['bytes_per_document']:.0f} bytes each) of "
              f"{printable(str(summary['model'].get('id')))} into {printable(args.out)} in {summary['seconds']:.1f}s")
    return 0


# The corpus settings a build reads (CorpusSpec's others describe instruction data, not documents).
CORPUS_OPTIONS = ["split", "revision", "text_column", "max_length", "max_sequences"]
ACTIONS = {"build": _run_build, "check": run_check}
