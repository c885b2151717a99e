"""``hub-msif push factors|index|gradindex|space``: publish a folder as a versioned Hub dataset repo, or a Space.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hub_msif.apps.arguments import (
    check_existing_folder,
    model_name,
    non_empty,
    stage_model_name,
)
from hub_msif.apps.output import print_json, printable
from hub_msif.errors import MsifValueError


def add(sub) -> None:
    p = sub.add_parser("push", help="publish factors, an index or a gradient index as a versioned Hub dataset repo, or a Space", description=(
        "Publish a factor folder, an index folder or a gradient index folder to a Hub dataset repo: the folder is "
        "checked (manifest, sha256 of every file), then all its files and a dataset card go up in one commit, tagged with the next "
        "version vN (or --tag). The repo is created when missing. `push space` publishes a Gradio Space serving "
        "published ones. Needs a token with write access (HF_TOKEN)."))
    psub = p.add_subparsers(dest="artifact", required=True, metavar="ARTIFACT")
    for kind, what in (("factors", "factor folder (one stage or both)"), ("index", "document index folder"),
                       ("gradindex", "gradient index folder")):
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
            model = "embedding model" if kind == "index" else "model of the index's pre-trained stage"
            q.add_argument("--model-name", type=model_name, metavar="NAME",
                           help=f"what the card calls the {model} when it is a local folder (default: the "
                                "folder's name and its weights' short sha256, never its path)")
    _add_space(psub)


def _add_space(psub) -> None:
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
    q.add_argument("--gradindex", type=non_empty, metavar="REPO@REV",
                   help="a published gradient index of the pre-trained stage, served beside the index: the page then "
                        "offers candidates from the whole corpus")
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


def _run_space(args) -> int:
    from hub_msif.hub.space_push import given_wheel, push_space

    if args.wheel is not None:
        given_wheel(args.wheel)  # before any Hub traffic
    pushed = push_space(args.repo, args.factors, args.index, private=args.private, hardware=args.hardware,
                        token=args.token, wheel=args.wheel, commit_message=args.message,
                        link_card=not args.no_card_link, factors_pretrained=args.factors_pretrained,
                        factors_finetuned=args.factors_finetuned, replace=args.replace, gradindex=args.gradindex)
    factors = args.factors if not (args.factors_pretrained or args.factors_finetuned) else {
        "pretrained": args.factors_pretrained or args.factors, "finetuned": args.factors_finetuned or args.factors}
    summary = {"repo": args.repo, "commit": pushed.commit, "url": pushed.url, "factors": factors,
               "index": args.index, "card_linked": pushed.card_linked} | (
                   {"gradindex": args.gradindex} if args.gradindex else {})
    if args.json:
        print_json(summary)
    else:
        shown = factors if isinstance(factors, str) else f"{factors['pretrained']} + {factors['finetuned']}"
        print(f"pushed the Space {args.repo} (commit {pushed.commit}) serving {printable(shown)} and "
              f"{printable(args.index)}" + (f" and {printable(args.gradindex)}" if args.gradindex else "")
              + f": {pushed.url}" + ("" if pushed.card_linked or args.no_card_link else
                                                          "; the factor card does not link it (see the warning)"))
    return 0


def run(args) -> int:
    from hub_msif.hub.location import check_repo_id

    if args.artifact == "space":
        return _run_space(args)
    check_repo_id(args.repo)  # push checks it too, but only after hashing every file of the folder
    check_existing_folder(args.folder, {"factors": "factor folder", "index": "index folder",
                                        "gradindex": "gradient index folder"}[args.artifact])
    from hub_msif.hub import push_factors, push_gradindex, push_index

    if args.artifact == "factors":
        names = {}
        for stage, name in args.model_name:
            if stage in names:
                raise MsifValueError(f"--model-name {stage}= is given twice")
            names[stage] = name
        push: Callable[..., Any] = push_factors
        naming: dict[str, Any] = {"model_names": names or None, "stages": args.stage}
    else:
        push, naming = push_index if args.artifact == "index" else push_gradindex, {"model_name": args.model_name}
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
