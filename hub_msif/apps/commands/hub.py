"""``hub-msif hub serve|gc``: a Hub-compatible server on this machine, and its garbage collection
(docs/design.md, "Hub server").
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

from hub_msif.apps.arguments import (
    check_existing_folder,
    check_target_folder,
    non_empty,
    non_negative_float,
    port_number,
    positive_int,
    token_spec,
)
from hub_msif.apps.output import print_json, printable
from hub_msif.errors import MsifValueError


def add(sub) -> None:
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


def run(args) -> int:
    return _gc(args) if args.hub_command == "gc" else _serve(args)


def _serve(args) -> int:
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


def _gc(args) -> int:
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
