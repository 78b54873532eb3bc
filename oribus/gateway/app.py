"""The HTTP gateway of the bus: S-Bus compatible routes, the native ``/v1`` JSON API,
health, metrics and the operator dashboard, on one aiohttp server.

Like the gRPC service it only moves messages: every route calls ``Bus``
methods, so HTTP agents get exactly the semantics SDK agents get. What is
HTTP-specific lives here:

* sessions: an HTTP agent sends no tokens, so its session is *durable* — the
  bus journals where it read before answering (``oribus.bus.session_journal``),
  and commits send the bus's complete knowledge (no broadcast needed). Without
  a journal the gateway refuses to start: it could not keep HTTP sessions
  fail-closed across a restart.
* errors: one table (``errors.py``) maps oribus errors to statuses; bodies the
  gateway cannot parse never reach the bus.
* logs: one JSON line per request on the ``oribus.http`` logger (method, path,
  status, milliseconds, agent, commit id) at INFO.
* credentials (``authority``, ``--auth``; specs/auth.md): every route but the public ones
  (``PUBLIC_PATHS``: health, readiness, metrics, the API document, the dashboard's static
  page) needs ``Authorization: Bearer TOKEN``, or over HTTPS an agent's client certificate
  (``oribus certs agent``) — missing or refused: 401 with
  ``WWW-Authenticate``. ``/v1`` routes then call ``GuardedBus``, which applies the rules per
  key and per session (403); the S-Bus routes, ``/admin/*`` and the dashboard's rollback
  need the ``admin`` grant (S-Bus's own API names no per-key identity to check); the
  dashboard's feed shows an identity without it only its own sessions and the keys it may
  read (``ANY_IDENTITY_PATHS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from oribus import tracing
from oribus.auth import Authority, Operation
from oribus.auth.credential import CERTIFICATE, CREDENTIAL, agent_of_peercert, bearer
from oribus.bus.bus import Bus
from oribus.bus.guarded import GuardedBus
from oribus.bus.sessions import SessionLimits
from oribus.contract import CommitRequest, CommitResult
from oribus.errors import InvalidRequest, OribusError
from oribus.gateway import dashboard, native, sbus
from oribus.gateway.connections import ConnectionCap, GuardedConnection
from oribus.gateway.cross_site import CrossSiteGuard
from oribus.gateway.errors import (
    LOG_FIELDS,
    RequestError,
    error_response,
    json_response,
    request_error,
)
from oribus.messages import Scope
from oribus.meta.directory import UnregisteredShard
from oribus.tls import TlsConfig, server_ssl_context

log = logging.getLogger("oribus.http")

DEFAULT_HTTP = "127.0.0.1:7780"
CLOSE_AFTER = web.RequestKey("close_after", bool)  # the connection cannot carry another request (body cut off)
# Under --auth, what answers without a credential: no key, no value, no session in any of them.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v1/openapi.json", "/"})
# outside /v1, the routes any identity may call: the dashboard's feed shows each what it may read
ANY_IDENTITY_PATHS = frozenset({"/dashboard/state"})


@dataclass
class GatewayConfig:
    listen: str = DEFAULT_HTTP  # HOST:PORT; port 0 picks a free port
    admin: bool = False  # serve /admin/* and the dashboard's rollback; otherwise they answer 403
    max_body_bytes: int = 4 << 20  # larger request bodies get 413 before they are parsed
    sbus_max_delta: int = 0  # S-Bus DeltaTooLarge limit in characters (0: only the value size limit)
    # versions kept per key (S-Bus delta_log_depth is capped by it); None: the bus holds no
    # shards and asks each shard for its own count (sbus.py, SbusRoutes.history_limit)
    history_limit: int | None = None
    ready_timeout: float = 2.0  # seconds a shard has to answer /readyz
    # Browsers (specs/http.md, "Browsers"): cross_site.py
    allow_origins: tuple[str, ...] = ()  # web origins besides the gateway's own that may call it ("*": any)
    hosts: tuple[str, ...] = ()  # Host names accepted on a non-loopback listen address, besides loopback
    #   names, IPs, dotless names and this machine's name (against DNS rebinding); ".a.b": and subdomains
    # Connections (specs/http.md, "Connections"): connections.py
    header_timeout: float = 10.0  # seconds from a request's first byte to its last header line
    body_timeout: float = 30.0  # seconds to receive a whole body once a route reads it (then 408)
    idle_timeout: float = 60.0  # seconds a connection may wait for its next (or first) request
    max_connections: int = 512  # open connections; past it new ones get 503 and are closed at once
    # Caps on HTTP sessions, in all, per agent and per client address (specs/http.md); over
    # one, the group's most idle session is evicted and fails closed. None: SessionLimits().
    session_limits: SessionLimits | None = None
    # HTTPS (specs/auth.md §2): the server certificate and CA of --tls-dir, the same as gRPC's.
    # A client certificate is checked against the CA when presented; ``mtls`` (--http-mtls)
    # requires one. None: plain HTTP.
    tls: TlsConfig | None = None
    mtls: bool = False


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # json.loads accepts NaN and Infinity by default


class HttpGateway:
    """Serve ``bus`` over HTTP. ``await start()`` / ``await stop()`` (idempotent)."""

    def __init__(self, bus: Bus, config: GatewayConfig | None = None, *, guarded: GuardedBus | None = None) -> None:
        if bus.sessions.journal is None:
            raise InvalidRequest(
                "the HTTP gateway needs the bus's session journal (a data directory): without it "
                "HTTP sessions could not stay fail-closed across a restart"
            )
        self.bus = bus
        # --auth: ``bus`` behind its access rules, the same GuardedBus the gRPC server serves
        self.authority: Authority | None = guarded.authority if guarded is not None else None
        # what the /v1 routes call: the bus itself, or behind the access rules
        self.api: Bus | GuardedBus = bus if guarded is None else guarded
        self.config = config = config or GatewayConfig()
        if config.session_limits is not None:  # HTTP agents are the bus's only durable sessions
            bus.sessions.limits = config.session_limits
        self.cross_site = CrossSiteGuard(config.listen.rpartition(":")[0], config.hosts, config.allow_origins)
        self.connections = ConnectionCap(config.max_connections)
        self.started_at = time.time()
        self.app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._middleware])
        self.sbus = sbus.SbusRoutes(self)
        self.native = native.NativeRoutes(self)
        self.dashboard = dashboard.DashboardRoutes(self)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/readyz", self._readyz)
        self.app.router.add_get("/metrics", self._metrics)
        self.sbus.register(self.app.router)
        self.native.register(self.app.router)
        self.dashboard.register(self.app.router)
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._address: str | None = None
        self._closing = False

    # ---- lifecycle -------------------------------------------------------------------

    @property
    def address(self) -> str:
        assert self._address is not None, "not started"
        return self._address

    @property
    def url(self) -> str:
        return f"{'https' if self.config.tls is not None else 'http'}://{self.address}"

    async def start(self) -> None:
        if self._runner is not None:
            return
        host, _, port = self.config.listen.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidRequest(f"--http must be HOST:PORT, not {self.config.listen!r}")
        if self.config.mtls and self.config.tls is None:
            raise InvalidRequest("--http-mtls needs --tls-dir (the CA client certificates are checked against)")
        # bad certificate files stop the gateway here, naming the file (oribus.tls)
        ssl = server_ssl_context(self.config.tls, require_client_cert=self.config.mtls) if self.config.tls else None
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        loop = asyncio.get_running_loop()
        cfg = self.config
        server = runner.server
        assert server is not None

        def new_connection() -> GuardedConnection:
            return GuardedConnection(
                server, loop=loop, cap=self.connections, header_timeout=cfg.header_timeout,
                keepalive_timeout=cfg.idle_timeout, lingering_time=cfg.body_timeout, access_log=None)

        try:
            listener = await loop.create_server(new_connection, host.strip("[]"), int(port), reuse_address=True,
                                                ssl=ssl)
        except OSError:
            await runner.cleanup()
            raise
        self._runner, self._listener = runner, listener
        self.dashboard.start()
        sock = listener.sockets[0]
        self._address = f"{host}:{sock.getsockname()[1]}"
        log.info("http gateway serving on %s", self.url)

    async def stop(self) -> None:
        self._closing = True
        await self.dashboard.close()
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()  # no new connections; open ones are shut down by the runner
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    # ---- shared plumbing --------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        t0 = time.perf_counter()
        fields: dict[str, str] = {}  # what the route adds to the log line
        request[LOG_FIELDS] = fields
        try:
            refused = self.cross_site.refusal(request)
            if refused is None and self.authority is not None and request.path not in PUBLIC_PATHS:
                self._authenticate(request)
            if refused is not None:
                response = refused
            elif tracing.on() and "traceparent" in request.headers:
                # the caller's span (W3C trace context) is the parent of the bus's spans
                with tracing.remote_parent({"traceparent": request.headers["traceparent"],
                                            "tracestate": request.headers.get("tracestate", "")}):
                    response = await handler(request)
            else:
                response = await handler(request)
        except RequestError as e:
            response = request_error(e.status, e.code, e.message, **e.details)
        except OribusError as e:
            response = error_response(e)
        except web.HTTPRequestEntityTooLarge as e:
            response = request_error(413, "BodyTooLarge", e.text or "request body too large",
                                     limit=self.config.max_body_bytes)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = {404: "NotFound", 405: "MethodNotAllowed"}.get(e.status, "HttpError")
            response = request_error(e.status, code, f"{request.method} {request.path}: {e.reason}")
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            response = request_error(500, "Internal", "internal error (logged by the server)")
        if not response.prepared:  # a streamed response (watch) sent its headers already
            if request.get(CLOSE_AFTER):
                response.force_close()
            response.headers.update(self.cross_site.cors_headers(request))
        if log.isEnabledFor(logging.INFO):
            log.info(json.dumps({
                "event": "http", "method": request.method, "path": request.path,
                "status": response.status, "ms": round((time.perf_counter() - t0) * 1000, 3), **fields,
            }, ensure_ascii=False))
        return response

    def _authenticate(self, request: web.Request) -> None:
        """Under ``--auth``: the request's bearer token verified (Unauthenticated: 401) and set
        for the route's bus calls; outside ``/v1``, the admin grant (PermissionDenied: 403)."""
        assert self.authority is not None
        token = bearer(request.headers.get("Authorization"))
        # without a token, over HTTPS, an agent's client certificate (CN=agent:NAME) may stand for one
        certificate = None
        if not token and request.transport is not None:
            certificate = agent_of_peercert(request.transport.get_extra_info("peercert"))
        identity = self.authority.authenticate(token, f"http {request.method} {request.path}", certificate)
        request[LOG_FIELDS]["identity"] = identity.agent
        CREDENTIAL.set(token)  # the handler runs in this task: GuardedBus reads it there
        CERTIFICATE.set(certificate)
        if not request.path.startswith("/v1/") and request.path not in ANY_IDENTITY_PATHS:
            self.authority.require(identity, Operation.ADMIN, op=f"{request.method} {request.path}")

    async def body(self, request: web.Request) -> dict[str, Any]:
        """The request's JSON object body, or RequestError (400 syntax, 422 not an object,
        408 not received within ``body_timeout``)."""
        try:
            raw = await asyncio.wait_for(request.read(), self.config.body_timeout)
        except TimeoutError:
            request[CLOSE_AFTER] = True  # the rest of the body is still on its way: not a request boundary
            raise RequestError(408, "RequestTimeout",
                               f"the request body did not arrive within {self.config.body_timeout:g} s") from None
        if not raw:
            raise RequestError(400, "InvalidRequest", "a JSON object body is required")
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, "InvalidRequest", f"body is not valid JSON: {e}") from None
        except RecursionError:
            raise RequestError(400, "InvalidRequest", "body is nested too deeply") from None
        if not isinstance(body, dict):
            raise RequestError(422, "InvalidRequest", "body must be a JSON object")
        return body

    async def commit_unread(self, req: CommitRequest, *, may_write_reserved: bool = False) -> CommitResult:
        """Commit on behalf of the server itself (S-Bus key creation, admin reset, a
        dashboard rollback): it depends on no read, only on its ``expect``.

        Transaction scope with no reads, so nothing the same system session did
        before is validated again (an earlier creation whose key changed since
        would otherwise refuse every later one); and the deliveries the commit
        leaves (its own writes) are forgotten, so the session does not grow.
        """
        req.scope = Scope.TRANSACTION
        req.since = {}
        req.complete_tokens = True
        result = await self.bus.commit(req, may_write_reserved=may_write_reserved)
        keys = [*req.writes, *req.rollback]
        with contextlib.suppress(OribusError):  # best effort: TTL expiry drops them anyway
            await self.bus.forget(req.session, keys)
        return result

    # ---- health and metrics -----------------------------------------------------------

    async def _healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok", "uptime_seconds": round(time.time() - self.started_at, 3)})

    async def shard_health(self) -> dict[int, dict[str, Any]]:
        """Every shard's stats, or the error that kept it from answering in time."""
        return await self.bus.shard_stats(self.config.ready_timeout)

    async def _readyz(self, request: web.Request) -> web.Response:
        """Ready: every shard answers (within ``ready_timeout``); otherwise 503 naming the
        shards that do not (``down``) or that no server has claimed (``unregistered``).

        ``?routable=1`` asks less: that this bus can route — it is not stopping and knows a
        server for every shard — with shards that do not answer listed under ``down``. That is
        the load balancer's question: were a shard down to make every bus replica unready at
        once, keys on the healthy shards would become unreachable too.
        """
        if self._closing:
            return json_response({"status": "stopping"}, 503)
        shards = await self.shard_health()
        down = [sid for sid, st in shards.items() if not st["up"]]
        unknown = [sid for sid, sh in self.bus.shards.items() if isinstance(sh, UnregisteredShard)]
        routable_only = request.query.get("routable", "").lower() in ("1", "true", "yes")
        ready = not unknown and (routable_only or not down)
        body = {"status": "ready" if ready else "not ready", "shards": len(shards), "down": down,
                "unregistered": unknown,
                "errors": {str(sid): shards[sid]["error"] for sid in down}}
        return json_response(body, 200 if ready else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        from oribus.bus.metrics import render_bus_metrics
        from oribus.metrics import CONTENT_TYPE

        text = await render_bus_metrics(self.bus)
        return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})
