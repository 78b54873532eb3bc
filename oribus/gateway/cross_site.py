"""Who may send requests to the gateway from a browser: Content-Type, Origin and Host checks.

A web page on another site can make the operator's browser send requests to
the gateway (which has no authentication). Three checks, run before any route
(``specs/http.md``, "Browsers"):

* **Content-Type** — a POST with a body must declare ``application/json``;
  any other type, or none, gets 415. Browsers send ``text/plain``, form types,
  multipart and untyped bodies cross-site without a CORS preflight;
  ``application/json`` always needs one. S-Bus's own server (axum's JSON
  extractor) refuses an untyped body too, so its clients already send the
  header. An empty POST (``POST /admin/reset``, as S-Bus's smoke test sends
  it) has nothing to misread and passes whatever its type.
* **Origin** — a request whose ``Origin`` is not the gateway's own
  (scheme, host and port of the ``Host`` it was sent to) gets 403, unless the
  origin is listed in ``allow_origins`` (``*``: any); those also get the CORS
  headers and their preflights (``OPTIONS``) are answered. ``Origin: null``
  (sandboxed frames, local files) is foreign.
* **Host** — when the gateway listens on a non-loopback address, a ``Host``
  that is not a loopback name, an IP address, a name without a dot, this
  machine's name or one of
  ``hosts`` (``.example.com`` also matches its subdomains; ``*`` turns the
  check off) gets 421: a page whose DNS name was re-pointed at the gateway
  (DNS rebinding) sends its own name, which no check above would catch
  because to the browser the page and the gateway are the same origin.
  A request without Host (HTTP/1.0) is not checked: browsers always send one.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from aiohttp import web
from yarl import URL

from oribus.gateway.errors import request_error

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
JSON_TYPE = "application/json"
PREFLIGHT_MAX_AGE = "600"  # seconds a browser may cache an allowed preflight


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _origin(scheme: str, authority: str) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) with the default port filled in, or None if it does not parse."""
    try:
        url = URL(f"{scheme}://{authority}")
        host = url.host
    except ValueError:
        return None
    if not host:
        return None
    return url.scheme.lower(), host.lower().strip("[]"), url.port


def _parse_origin(origin: str) -> tuple[str, str, int | None] | None:
    scheme, sep, authority = origin.strip().partition("://")
    if not sep or not authority or "/" in authority:
        return None
    return _origin(scheme, authority)


class CrossSiteGuard:
    """The three checks, configured from ``GatewayConfig`` (``allow_origins``, ``hosts``, ``listen``)."""

    def __init__(self, listen_host: str, hosts: Iterable[str], allow_origins: Iterable[str]) -> None:
        listen_host = listen_host.lower().strip("[]")
        names = {n.strip().lower().strip("[]") for n in hosts if n.strip()}
        self.check_host = not is_loopback(listen_host) and "*" not in names
        self.host_suffixes = tuple(n for n in names if n.startswith("."))
        if listen_host not in ("", "0.0.0.0", "::"):
            names.add(listen_host)
        names.add(socket.gethostname().lower())  # no DNS lookup (getfqdn) at startup: it can hang
        self.host_names = frozenset(names)
        origins = [o.strip() for o in allow_origins if o.strip()]
        self.any_origin = "*" in origins
        self.allowed_origins = frozenset(p for o in origins if o != "*" and (p := _parse_origin(o)) is not None)

    def refusal(self, request: web.Request) -> web.StreamResponse | None:
        """The response that refuses ``request``, or None if it may go to its route."""
        host_header = request.headers.get("Host")
        if self.check_host and host_header is not None and not self._host_allowed(host_header):
            return request_error(
                421, "UnknownHost",
                f"Host {host_header!r} is not a name of this gateway; add it with --http-host "
                "(names are checked because the gateway listens on a non-loopback address)",
                host=host_header)
        foreign = self.foreign_origin(request)
        if foreign is not None:
            if not self._origin_allowed(foreign):
                return request_error(
                    403, "CrossOriginRefused",
                    f"requests from the web origin {foreign!r} are refused; allow it with --http-allow-origin",
                    origin=foreign)
            if request.method == "OPTIONS":  # the preflight of an allowed origin
                return web.Response(status=204, headers={
                    "Access-Control-Allow-Methods": "GET, POST",
                    "Access-Control-Allow-Headers": "Content-Type",
                    "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
                })
        if request.method in BODY_METHODS and request.body_exists and request.content_type != JSON_TYPE:
            declared = request.headers.get("Content-Type")
            said = f"not {declared!r}" if declared is not None else "but it has no Content-Type"
            return request_error(
                415, "UnsupportedMediaType",
                f"{request.method} bodies must be {JSON_TYPE} (send the header "
                f"'Content-Type: {JSON_TYPE}'), {said}",
                content_type=declared)
        return None

    def cors_headers(self, request: web.Request) -> dict[str, str]:
        """What a response to an allowed foreign origin adds so that the browser lets the page
        read it; nothing for the gateway's own origin or a refused one."""
        foreign = self.foreign_origin(request)
        if foreign is None or not self._origin_allowed(foreign):
            return {}
        return {"Access-Control-Allow-Origin": foreign, "Vary": "Origin"}

    def _origin_allowed(self, origin: str) -> bool:
        return self.any_origin or _parse_origin(origin) in self.allowed_origins

    def foreign_origin(self, request: web.Request) -> str | None:
        """The request's Origin if it is not the gateway's own (None without one)."""
        origin = request.headers.get("Origin")
        if origin is None:
            return None
        host_header = request.headers.get("Host")
        own = _origin(request.scheme, host_header) if host_header else None
        parsed = _parse_origin(origin)
        return origin if parsed is None or parsed != own else None

    def _host_allowed(self, host_header: str) -> bool:
        parsed = _origin("http", host_header)
        if parsed is None:
            return False
        host = parsed[1]
        # A name without a dot cannot be in public DNS, so no attacker's page can be served
        # under it first (compose services, Kubernetes Service short names).
        return (is_loopback(host) or _is_ip(host) or "." not in host or host in self.host_names
                or host.endswith(self.host_suffixes) or f".{host}" in self.host_suffixes)
