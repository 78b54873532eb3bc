"""A bus reached over gRPC: ``RemoteBus``, the ``BusService`` behind ``oribus.connect``.

``BusByCalls`` offers the bus methods a session calls (read, commit, history, forget,
reset, stats, scan) as calls of ``bus_codec.BUS_OPS``; ``RemoteBus`` sends them over one
multiplexed gRPC stream (``oribus.rpc.mux_client``), so a remote session has exactly the
embedded API and semantics. The simulated network has its own ``BusByCalls``.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc

from oribus.contract import BusService, CommitRequest, CommitResult, Entry, ReadResult
from oribus.messages import Change, ReadItem, WatchRequest
from oribus.rpc import bus_codec, wire
from oribus.rpc.mux_client import MuxClient
from oribus.tls import TlsConfig, channel_credentials
from oribus.types import DEFAULT_SCAN_LIMIT, SessionRef


class BusByCalls(BusService):
    """The bus methods a session calls (``BusService``), each one call ``_call(op, *params)`` of
    ``bus_codec.BUS_OPS``: the shape of every remote bus (gRPC, the simulated network),
    which differ only in how a call travels (and in watch)."""

    @abc.abstractmethod
    async def _call(self, op: str, *params: Any) -> Any:
        """Send one call of ``bus_codec.BUS_OPS`` and return its decoded result."""

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

    async def scan(self, prefix: str = "", after: str = "", limit: int = DEFAULT_SCAN_LIMIT) -> list[ReadItem]:
        return await self._call("scan", prefix, after, limit)


class RemoteBus(BusByCalls):
    """A bus reached over gRPC at ``target`` (``HOST:PORT``); over mutual TLS with ``tls``."""

    def __init__(self, target: str = wire.DEFAULT_BUS_ADDRESS, *, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float = wire.DEFAULT_CALL_TIMEOUT, tls: TlsConfig | str | Path | None = None) -> None:
        self.target = target
        cfg = TlsConfig.of(tls)
        if cfg is not None and credentials is None:
            credentials = channel_credentials(cfg)
        self.mux = MuxClient(target, wire.BUS_SERVICE, credentials=credentials, timeout=timeout,
                             options=cfg.channel_options() if cfg is not None else ())

    async def _call(self, op: str, *params: Any) -> Any:
        return await self.mux.call_op(bus_codec.BUS_OPS, op, *params)

    def watch(self, request: WatchRequest) -> AsyncIterator[Change]:
        return self.mux.watch(request)

    async def close(self) -> None:
        await self.mux.close()
