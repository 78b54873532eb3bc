"""``oribus mcp``'s command-line options. Imports nothing of the ``mcp`` SDK, so that
``oribus --help`` works without the extra."""

from __future__ import annotations

import argparse

from oribus.client import DEFAULT_BUS_ADDRESS


def http_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as (host, port); port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, e.g. 127.0.0.1:8765, not {text!r}")
    return host, int(port)


def add_arguments(p: argparse.ArgumentParser) -> None:
    bus = p.add_mutually_exclusive_group()
    bus.add_argument("--addr", default=DEFAULT_BUS_ADDRESS,
                     help="the bus's gRPC address (default: %(default)s)")
    bus.add_argument("--data-dir", help="run the bus in this process on this data directory instead "
                                        "(oribus.open_local; no other process may have it open)")
    p.add_argument("--agent", help="the agent name of every session (default: the name the MCP client "
                                   "gives in its clientInfo)")
    p.add_argument("--http", type=http_address, metavar="HOST:PORT",
                   help="serve streamable HTTP at http://HOST:PORT/mcp instead of stdio")
    p.add_argument("--tls-dir", help="connect to the bus over mutual TLS: a directory with ca.crt, "
                                     "client.crt, client.key (oribus certs init)")
