"""The SDK over the network: ``oribus.connect`` (async) and ``oribus.Client`` (sync).

``RemoteBus`` offers the bus methods the session classes call (read, commit,
history, forget, reset, stats, watch) over one multiplexed gRPC stream, so a
remote session has exactly the embedded API and semantics.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from oribus import wire
from oribus.client.session import AsyncSession
from oribus.client.sync import LoopThread, SyncSession
from oribus.contract import BusService, CommitRequest, CommitResult, Entry, ReadResult
from oribus.mux import MuxClient
from oribus.protocol import Change, WatchRequest
from oribus.tls import TlsConfig, channel_credentials
from oribus.types import DEFAULT_MAX_VALUE_BYTES, SessionRef

DEFAULT_ADDRESS = "127.0.0.1:7700"


class BusByCalls(BusService):
    """The bus methods a session calls (``BusService``), each one call ``_call(op, *params)`` of
    ``wire.BUS_OPS``: the shape of every remote bus (gRPC, the simulated network),
    which differ only in how a call travels (and in watch)."""

    @abc.abstractmethod
    async def _call(self, op: str, *params: Any) -> Any:
        """Send one call of ``wire.BUS_OPS`` and return its decoded result."""

    async def read(self, session: SessionRef, keys: list[str], record: bool = True) -> ReadResult:
        return await self._call("read", session, keys, record)

    async def commit(self, req: CommitRequest) -> CommitResult:
        return await self._call("commit", req)

    async def history(self, key: str, limit: int | None = None) -> list[Entry]:
        return await self._call("history", key, limit)

    async def forget(self, session: SessionRef, keys: list[str]) -> None:
        await self._call("forget", session, keys)

    async def reset(self, session: SessionRef) -> None:
        await self._call("reset", session)

    async def stats(self) -> dict:
        return await self._call("stats")


class RemoteBus(BusByCalls):
    """A bus reached over gRPC at ``target`` (``HOST:PORT``); over mutual TLS with ``tls``."""

    def __init__(self, target: str = DEFAULT_ADDRESS, *, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float = 30.0, tls: TlsConfig | str | Path | None = None) -> None:
        self.target = target
        cfg = TlsConfig.of(tls)
        if cfg is not None and credentials is None:
            credentials = channel_credentials(cfg)
        self.mux = MuxClient(target, wire.BUS_SERVICE, credentials=credentials, timeout=timeout,
                             options=cfg.channel_options() if cfg is not None else ())

    async def _call(self, op: str, *params: Any) -> Any:
        return await self.mux.call_op(wire.BUS_OPS, op, *params)

    def watch(
        self,
        prefix: str = "",
        from_version: int | None = None,
        *,
        after: Mapping[str, int] | None = None,
        since: float | None = None,
    ) -> AsyncIterator[Change]:
        return self.mux.watch(WatchRequest(prefix, from_version, dict(after or {}), since))

    async def close(self) -> None:
        await self.mux.close()


def connect(
    target: str = DEFAULT_ADDRESS,
    *,
    agent: str = "agent",
    session_id: str | None = None,
    strict: bool = False,
    tls: TlsConfig | str | Path | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float = 30.0,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
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
    """
    remote = RemoteBus(target, credentials=credentials, timeout=timeout, tls=tls)
    return AsyncSession(remote, agent, session_id, strict=strict, max_value_bytes=max_value_bytes, owner=remote)


def Client(  # noqa: N802 - a factory that reads like the class it returns
    target: str = DEFAULT_ADDRESS,
    *,
    agent: str = "agent",
    session_id: str | None = None,
    strict: bool = False,
    tls: TlsConfig | str | Path | None = None,
    credentials: grpc.ChannelCredentials | None = None,
    timeout: float = 30.0,
) -> SyncSession:
    """The synchronous client: the same methods as ``connect``'s session, without ``await``.
    ``tls`` as for ``connect``.

    Example::

        with oribus.Client("127.0.0.1:7700", agent="planner") as bus:
            bus.put("plan", {"step": 1})
    """
    portal = LoopThread.shared()  # not closed with the client: see LoopThread.shared

    async def make() -> AsyncSession:
        return connect(target, agent=agent, session_id=session_id, strict=strict, tls=tls,
                       credentials=credentials, timeout=timeout)

    return SyncSession(portal.call(make()), portal, owner=True)
