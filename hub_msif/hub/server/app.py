"""``HubServer``: the API of ``routes.py`` served by uvicorn in a background thread, behind a front door.

The front door is the ASGI layer every request passes before routing: it authenticates the
caller, routes on the raw (still percent-encoded) path, records the request in
``HubServer.request_log`` and turns a crash into a logged 500.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hub_msif.hub.server.api_errors import HubApiError, error_response
from hub_msif.hub.server.auth import TokenBook
from hub_msif.hub.server.garbage import collect_garbage
from hub_msif.hub.server.request_context import DEFAULT_MAX_REQUEST_BYTES
from hub_msif.hub.server.routes import build_app
from hub_msif.hub.server.store import Store

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 5  # seconds stop() lets requests in flight finish before cutting them off (an int, as uvicorn types it)


class HubServer:
    """A Hub-compatible HTTP server for ``huggingface_hub`` clients, keeping its repos under ``root``.

    ``tokens``: ``{token: {"user": "alice", "orgs": ["team"], "role": "write" | "read"}}``; None
    reads ``<root>/tokens.json`` (re-read when it changes). ``port`` 0 picks a free port; ``url``
    says which once started. ``request_log`` holds ``{"method", "path", "status", "user"}`` per
    request answered, ``path`` as sent (with the query). Clients need ``HF_HUB_DISABLE_XET=1``.
    """

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int = 0, tokens: dict | None = None,
                 max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.host, self.port = host, int(port)
        self.store = Store(self.root)
        self.request_log: list[dict] = []
        api = build_app(self.store)
        api.state.max_request_bytes = int(max_request_bytes)
        self.app = _FrontDoor(api, TokenBook(self.root, tokens), self.request_log.append)
        self.url = self._url()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def _url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> HubServer:
        """Starts serving in a background thread and returns once connections are accepted; raises
        ``OSError`` when the address cannot be bound. Returns self."""
        if self._server is not None:
            return self
        # What killed pushes left behind; no commit of this server is in flight yet, and the grace
        # period spares uploads that a client's commit may still name (garbage.py says why).
        collect_garbage(self.root)
        # Bound here rather than by uvicorn: a busy port fails in the caller, and port 0 is known at once.
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart on the same port at once
        try:
            sock.bind((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        self.url = self._url()
        config = uvicorn.Config(self.app, interface="asgi3", lifespan="off", ws="none", loop="asyncio",
                                log_config=None, access_log=False, proxy_headers=False, server_header=False,
                                timeout_keep_alive=60, timeout_graceful_shutdown=_STOP_TIMEOUT_S)
        server = _ThreadServer(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"hub-server-{self.port}",
                                  daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                sock.close()
                raise RuntimeError(f"the hub server on {self.url} stopped while starting (see the log)")
            time.sleep(0.01)
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stops accepting connections, closes idle ones, lets requests in flight finish (for a few
        seconds at most) and returns once the port is free. Does nothing when not started."""
        server, self._server = self._server, None
        if server is None:
            return
        server.should_exit = True
        if self._thread is not None:  # set with self._server
            self._thread.join(timeout=_STOP_TIMEOUT_S + 5)

    def serve_forever(self) -> None:
        """Serves until Ctrl-C (the command line's ``hub serve``)."""
        self.start()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _ThreadServer(uvicorn.Server):
    """A uvicorn server for a background thread: signals (Ctrl-C) stay with the main thread, which
    stops the server through ``HubServer.stop``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _FrontDoor:
    """The ASGI layer around the API: authentication, raw-path routing, request log, crash answers."""

    def __init__(self, app: ASGIApp, tokens: TokenBook, record: Callable[[dict], None]) -> None:
        self.app, self.tokens, self.record = app, tokens, record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan is off and websockets are not spoken
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string", b"").decode("latin-1")
        entry = {"method": scope["method"], "path": raw_path.decode("latin-1") + (f"?{query}" if query else ""),
                 "status": None, "user": None}

        async def send_and_record(message: Message) -> None:
            # recorded when the answer starts, so a client that has its answer finds it in the log
            if message["type"] == "http.response.start" and entry["status"] is None:
                entry["status"] = message["status"]
                self.record(entry)
            await send(message)

        # A revision is one percent-encoded path segment that may hold '/' (refs%2Fpr%2F1): route on
        # the raw path, and let each handler decode its parameters.
        scope = {**scope, "path": raw_path.decode("utf-8", errors="replace")}
        try:
            caller = self.tokens.authenticate(Headers(scope=scope).get("authorization"))
        except HubApiError as err:
            return await error_response(err)(scope, receive, send_and_record)
        entry["user"] = caller.user
        scope["state"] = {**scope.get("state", {}), "caller": caller}
        try:
            await self.app(scope, receive, send_and_record)
        except ClientDisconnect:
            logger.debug("client went away during %s %s", entry["method"], entry["path"])
        except Exception:  # starlette answered 500 already (routes._on_crash); keep the traceback
            logger.exception("hub server error on %s %s", entry["method"], entry["path"])
            if entry["status"] is None:
                await error_response(HubApiError(500, "internal server error"))(scope, receive, send_and_record)
