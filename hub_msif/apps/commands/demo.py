"""``hub-msif demo``: the toy fact world end to end on a loopback Hub, and ``--space`` to serve it.
"""

from __future__ import annotations

from hub_msif.apps.arguments import (
    check_target_folder,
    fixed_port_number,
    non_empty,
    positive_int,
)
from hub_msif.apps.commands.common import add_device, add_threads, use_threads
from hub_msif.artifacts.local_folders import cache_root


def add(sub) -> None:
    p = sub.add_parser("demo", help="run the toy fact world end to end (no account, no network)", description=(
        "Builds (or reuses from the cache) a toy fact world, a trained pre-trained/fine-tuned GPT-NeoX pair, both "
        "stages' factors and a document index; publishes the factors and index to a Hub server of its own on "
        "loopback and pulls them back by tag; answers three held-out questions with the fine-tuned model and "
        "prints the pre-training documents MS-IF ranks highest (from the pulled copies), marking the true proponents."))
    p.add_argument("--cache", default=str(cache_root() / "demo"), type=non_empty,
                   help="where the demo's artifacts are kept (default: $HUB_MSIF_CACHE/demo or ~/.cache/hub_msif/demo)")
    p.add_argument("--top", type=positive_int, default=5, help="documents shown per question (default 5)")
    p.add_argument("--no-publish", action="store_true",
                   help="skip publishing the factors and index to a local Hub and pulling them back")
    p.add_argument("--space", action="store_true",
                   help="afterwards, serve the Gradio Space on the demo's fact world on 127.0.0.1 until Ctrl-C")
    p.add_argument("--port", type=fixed_port_number, help="port of the Space (default: the first free one from 7860)")
    add_threads(p)
    add_device(p)


def run(args) -> int:
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
