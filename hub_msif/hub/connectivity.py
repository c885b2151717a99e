"""Whether the Hub can be reached at all, known in at most a few seconds instead of after retries
(docs/design.md, "Hub artifacts").

``huggingface_hub`` retries a refused or timed-out connection five times with back-off (about
23 s, a warning on each try) before it gives up. One TCP connection to the endpoint's host and
port (or to the proxy the environment names for it) with a short timeout tells the usual cases
apart at once: nothing listens (refused), no route, no such host. Push and find then fail in one
line; pull serves what the cache holds, as it does offline. A server that accepts the connection
and then fails is left to ``huggingface_hub``'s own handling.
"""

from __future__ import annotations

import socket
import urllib.request
from urllib.parse import urlsplit

from hub_msif.errors import HubUnreachableError
from hub_msif.hub.hub_errors import endpoint, offline

PROBE_TIMEOUT_S = 2.0


def _first_hop(url: str) -> tuple[str, int, str]:
    """``(host, port, via)`` of a request to ``url``: the proxy the environment sets for it (httpx
    reads the same ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` / ``NO_PROXY``; ``via`` then
    names it), else the endpoint itself (``via`` empty)."""
    parts = urlsplit(url)
    default_port = 443 if parts.scheme == "https" else 80
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        hop = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return hop.hostname or "", hop.port or (443 if hop.scheme == "https" else 80), f" through the proxy {proxy}"
    return parts.hostname or "", parts.port or default_port, ""


def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None when a TCP connection to ``url``'s host and port (or to its proxy) opens within
    ``timeout`` seconds; else why not, in a few words (``connection refused``)."""
    host, port, via = _first_hop(url)
    if not host:
        return "the address names no host"
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except socket.gaierror as err:
        return f"unknown host {host}{via} ({err.strerror or err})"
    except TimeoutError:
        return f"no answer from {host}:{port}{via} within {timeout:g} s"
    except OSError as err:
        return f"{(err.strerror or type(err).__name__).lower()}{via}"


def hub_unreachable() -> str | None:
    """Why the Hub of ``HF_ENDPOINT`` cannot be reached now; None when it can, or when
    ``HF_HUB_OFFLINE=1`` (then ``huggingface_hub`` sends nothing anyway)."""
    return None if offline() else unreachable(endpoint())


def require_hub(doing: str) -> None:
    """Raises ``HubUnreachableError`` (``doing``: the Hub at ENDPOINT cannot be reached (why)) unless
    the Hub accepts connections."""
    reason = hub_unreachable()
    if reason:
        raise HubUnreachableError(f"{doing}: the Hub at {endpoint()} cannot be reached ({reason}); try again when "
                                  "it is up")
