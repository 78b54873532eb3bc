"""``oribus mcp``: open the bus, serve its tools over stdio or streamable HTTP, close the bus.

stdio (the default) is what an MCP host starts as a subprocess: one client, whose
session is the process's. ``--http HOST:PORT`` serves ``http://HOST:PORT/mcp`` to
many clients, one oribus session per MCP session (``Mcp-Session-Id``). An MCP
session is what ties an agent's reads to its commits, so the HTTP endpoint speaks
the protocol revisions that have one (those with the ``initialize`` handshake): a
request of a revision without sessions (2026-07-28 on) is answered with the
protocol's "unsupported protocol version" error naming the supported ones, and the
SDK's clients fall back to the handshake by themselves (``mode="auto"``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Iterator
from typing import Any

import oribus
from oribus.client import AsyncSession
from oribus.integrations.mcp.sessions import SessionPool

# Seconds an HTTP session may go unused before the SDK's session manager ends it; its
# oribus session is dropped after as long (sessions.SessionPool).
HTTP_SESSION_IDLE_SECONDS = 30 * 60
# The agent name of the connection the server holds to the bus; sessions act as their own.
SERVER_AGENT = "oribus-mcp"

Scope = dict[str, Any]
ASGIApp = Any


class HandshakeRevisionsOnly:
    """ASGI middleware: answers a request of a sessionless protocol revision with -32022.

    The SDK routes by the ``MCP-Protocol-Version`` header; a request without it, or
    with a handshake revision, goes on to the SDK's session manager unchanged.
    """

    def __init__(self, app: ASGIApp) -> None:
        from mcp.types.version import HANDSHAKE_PROTOCOL_VERSIONS

        self.app = app
        self.supported = list(HANDSHAKE_PROTOCOL_VERSIONS)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            version = dict(scope.get("headers") or []).get(b"mcp-protocol-version")
            if version is not None and version.decode("latin-1") not in self.supported:
                await self._refuse(version.decode("latin-1"), receive, send)
                return
        await self.app(scope, receive, send)

    async def _refuse(self, requested: str, receive: Any, send: Any) -> None:
        from mcp.types import UNSUPPORTED_PROTOCOL_VERSION

        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        try:
            request_id = json.loads(body).get("id")
        except (ValueError, AttributeError):
            request_id = None
        reply = json.dumps({"jsonrpc": "2.0", "id": request_id, "error": {
            "code": UNSUPPORTED_PROTOCOL_VERSION,
            "message": f"protocol version {requested} has no sessions; this server keeps one oribus session "
                       f"per MCP session: use one of {', '.join(self.supported)}",
            "data": {"supported": self.supported, "requested": requested},
        }}).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(reply)).encode())]})
        await send({"type": "http.response.body", "body": reply})


async def open_bus(args: argparse.Namespace) -> AsyncSession:
    if args.data_dir:
        return await oribus.open_local(args.data_dir, agent=SERVER_AGENT)
    return oribus.connect(args.addr, agent=SERVER_AGENT, tls=args.tls_dir)


async def serve_stdio(pool: SessionPool) -> None:
    from oribus.integrations.mcp.server import build_server

    await build_server(pool).run_stdio_async()


async def serve_http(pool: SessionPool, host: str, port: int) -> None:
    import uvicorn

    from oribus.integrations.mcp.server import build_server

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn would re-raise SIGTERM once stopped, ending the process before the bus
            # is closed: ``serve`` handles the signals instead
            yield

    app = build_server(pool).streamable_http_app(session_idle_timeout=HTTP_SESSION_IDLE_SECONDS, host=host)
    server = Server(uvicorn.Config(HandshakeRevisionsOnly(app), host=host, port=port, log_level="warning",
                                   lifespan="on"))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))

    async def announce() -> None:
        while not server.started and not server.should_exit:
            await asyncio.sleep(0.05)
        for s in server.servers:
            for sock in s.sockets:
                bound_host, bound_port = sock.getsockname()[:2]
                shown = f"[{bound_host}]" if ":" in bound_host else bound_host
                print(f"oribus mcp: serving http://{shown}:{bound_port}/mcp", file=sys.stderr, flush=True)

    announcer = asyncio.create_task(announce())
    try:
        await server.serve()
    finally:
        announcer.cancel()


async def serve(args: argparse.Namespace) -> None:
    base = await open_bus(args)
    pool = SessionPool(base, args.agent, idle_seconds=HTTP_SESSION_IDLE_SECONDS if args.http else None)
    try:
        if args.http:
            await serve_http(pool, *args.http)
        else:
            # SIGTERM ends the server like the end of its input: the bus is closed cleanly
            main = asyncio.current_task()
            assert main is not None
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
            with contextlib.suppress(asyncio.CancelledError):
                await serve_stdio(pool)
    finally:
        await pool.close()


def main(args: argparse.Namespace) -> int:
    """``oribus mcp``: returns the exit status."""
    try:
        import mcp  # noqa: F401
    except ImportError:
        print("oribus mcp needs the mcp extra: pip install 'oribus[mcp]'", file=sys.stderr)
        return 2
    if args.agent == "":
        print("oribus mcp: --agent must not be empty", file=sys.stderr)
        return 2
    asyncio.run(serve(args))  # an oribus error (a locked data directory, ...) is the command line's to report
    return 0
