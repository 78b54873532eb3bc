"""The SDK over the network: ``oribus.connect`` (async) and ``oribus.Client`` (sync).

Both open a session over a ``RemoteBus`` (``oribus.rpc.bus_client``): one multiplexed
gRPC stream, or the bus's stream transport when it offers one this client can reach
(``transport="auto"``, the default), so a remote session has exactly the embedded API
and semantics.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from oribus.auth.credential import ENV_TOKEN
from oribus.client.session import AsyncSession
from oribus.client.sync import LoopThread, SyncSession
from oribus.rpc.bus_client import DEFAULT_TRANSPORT, RemoteBus
from oribus.rpc.wire import DEFAULT_BUS_ADDRESS, DEFAULT_CALL_TIMEOUT
from oribus.tls import TlsConfig
from oribus.types import DEFAULT_MAX_VALUE_BYTES


def connect(
    target: str = DEFAULT_BUS_ADDRESS,
    *,
    agent: str = "agent",
    session_id: str | None = None,
    strict: bool = False,
    tls: TlsConfig | str | Path | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float = DEFAULT_CALL_TIMEOUT,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
    transport: str = DEFAULT_TRANSPORT,
    token: str | None = None,
) -> AsyncSession:
    """Connect to a bus; returns the agent's session (close it, or use ``async with``).

    Example::

        async with oribus.connect("127.0.0.1:7700", agent="planner") as bus:
            plan = await bus.get("plan")
            await bus.commit({"plan": {"step": 2}})

    The connection is opened lazily on the first call; a lost connection
    raises Unavailable and is reopened on the next call. A commit whose
    outcome is unknown is retried with the same commit id (never applied twice).

    ``tls`` (a directory written by ``oribus certs init``, or a TlsConfig)
    connects over mutual TLS: the bus's certificate is checked against
    ``ca.crt`` and ``client.crt`` is presented. Missing or unreadable files
    raise InvalidRequest naming the file; a refused handshake raises
    Unavailable naming TLS::

        async with oribus.connect("bus:7700", agent="planner", tls="/etc/oribus/tls") as bus: ...

    ``transport``: "auto" (the default) asks the bus over gRPC for its stream listener and,
    when this client can reach it, sends every later call over it (several times less CPU
    per call on both ends); "grpc" stays on gRPC; "stream" dials ``target`` as the bus's
    stream address, without gRPC.

    ``token``: the agent's credential for a bus started with ``--auth`` (``oribus auth token``;
    specs/auth.md), sent with every call; None reads ``ORIBUS_TOKEN`` from the environment.
    A missing or refused token raises Unauthenticated; an operation the token's roles do
    not allow raises PermissionDenied naming the key and the rule::

        async with oribus.connect("bus:7700", agent="planner", token=os.environ["PLANNER_TOKEN"]) as bus: ...
    """
    if token is None:
        token = os.environ.get(ENV_TOKEN) or None
    remote = RemoteBus(target, credentials=credentials, timeout=timeout, tls=tls, transport=transport,
                       token=token)
    return AsyncSession(remote, agent, session_id, strict=strict, max_value_bytes=max_value_bytes, owner=remote)


def Client(  # noqa: N802 - a factory that reads like the class it returns
    target: str = DEFAULT_BUS_ADDRESS,
    *,
    agent: str = "agent",
    session_id: str | None = None,
    strict: bool = False,
    tls: TlsConfig | str | Path | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float = DEFAULT_CALL_TIMEOUT,
    transport: str = DEFAULT_TRANSPORT,
    token: str | None = None,
) -> SyncSession:
    """The synchronous client: the same methods as ``connect``'s session, without ``await``.
    ``tls``, ``transport`` and ``token`` (default: ``ORIBUS_TOKEN``) as for ``connect``.

    Example::

        with oribus.Client("127.0.0.1:7700", agent="planner") as bus:
            bus.put("plan", {"step": 1})
    """
    portal = LoopThread.shared()  # not closed with the client: see LoopThread.shared

    async def make() -> AsyncSession:
        return connect(target, agent=agent, session_id=session_id, strict=strict, tls=tls,
                       credentials=credentials, timeout=timeout, transport=transport, token=token)

    return SyncSession(portal.call(make()), portal, owner=True)
