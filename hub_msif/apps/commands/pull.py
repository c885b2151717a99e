"""``hub-msif pull factors|index|gradindex``: download published factors, an index or a gradient index into
the Hugging Face cache.
"""

from __future__ import annotations

from hub_msif.apps.arguments import (
    non_empty,
)
from hub_msif.apps.output import print_json, printable


def add(sub) -> None:
    p = sub.add_parser("pull", help="download published factors, an index or a gradient index into the Hugging Face cache",
                       description=(
        "Download factors, an index or a gradient index from REPO[@REV] (branch, tag or commit sha; default main) "
        "into the Hugging Face cache, only the files needed, each checked against the manifest's sha256; prints the local folder. "
        "Works offline (HF_HUB_OFFLINE=1) for what is cached."))
    p.add_argument("artifact", choices=["factors", "index", "gradindex"], help="what to pull")
    p.add_argument("location", type=non_empty, help="REPO[@REV], e.g. msif-team/pythia-410m-factors@v2")
    p.add_argument("--modules", default="all", choices=["all", "mlp"], help="factors: all modules or MLP only")
    p.add_argument("--token", type=non_empty, help="Hugging Face token for private repos (default: HF_TOKEN or the saved login)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args) -> int:
    from hub_msif.hub import pull_factors, pull_gradindex, pull_index

    if args.artifact == "factors":
        folder = pull_factors(args.location, modules=args.modules, token=args.token)
    elif args.artifact == "gradindex":
        folder = pull_gradindex(args.location, token=args.token)
    else:
        folder = pull_index(args.location, token=args.token)
    if args.json:
        print_json({"location": args.location, "folder": str(folder)})
    else:
        print(printable(folder))
    return 0
