"""The durable part of the bus's session table, for clients that do not track tokens.

An SDK client remembers, per shard, the token (shard epoch, delivery-log
incarnation) its session was given and sends it with every commit, so a
shard that restarted (and lost the session's deliveries) refuses the commit
with SessionExpired. A plain HTTP agent (S-Bus style) sends nothing: only the
bus knows where it read. If the bus kept that only in memory, a crash of the
bus together with a shard — one process in ``oribus up`` — would leave a
commit that nobody can tell had deliveries: it would pass with less
validation. So for such sessions the bus writes each first (session, shard,
token) it sees to this journal, durably, before the read is answered; after a
restart the old token is still known, the shard's new epoch does not match,
and the commit fails closed (DESIGN.md, "Sessions fail closed").

Format: a WAL (``oribus.shards.wal``: CRC-32C framed msgpack records in
segments, torn-tail recovery) in its own directory, with two record types::

    OBSERVE  {"s": [agent, session_id], "h": shard, "t": [epoch, incarnation]}
    RESET    {"s": [agent, session_id]}

Replay keeps the first token per (session, shard) until a RESET, like the
in-memory table. Opening compacts the journal when it holds far more records
than live entries: the live entries are appended to a new segment, made
durable, and only then are the older segments removed, so a crash at any
point replays to the same table.

The directory is locked (``<dir>/LOCK``, ``oribus.datadir_lock``) before it is
read, so a second bus on the same directory is refused with ``DataDirLocked``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from oribus.datadir_lock import DataDirLock
from oribus.errors import LimitExceeded
from oribus.protocol import Token
from oribus.shards.wal import Wal, WalConfig, list_segments
from oribus.types import SessionRef

log = logging.getLogger("oribus.bus.sessions")

OBSERVE = 1
RESET = 2


class SessionJournal:
    """``await SessionJournal.open(dir)``; ``observe`` / ``reset`` return once durable."""

    def __init__(self, wal: Wal, table: dict[SessionRef, dict[int, Token]], max_sessions: int,
                 dir_lock: DataDirLock | None = None) -> None:
        self._wal = wal
        self._dir_lock = dir_lock  # released on close
        self.table = table  # the replayed state; SessionTable adopts it
        self.max_sessions = max_sessions

    @classmethod
    async def open(cls, directory: Path, *, max_sessions: int = 1_000_000,
                   unsafe_no_fsync: bool = False) -> SessionJournal:
        table: dict[SessionRef, dict[int, Token]] = {}
        records = 0

        def replay(_lsn: int, rtype: int, body: Any) -> None:
            nonlocal records
            records += 1
            session = (body["s"][0], body["s"][1])
            if rtype == OBSERVE:
                epoch, inc = body["t"]
                table.setdefault(session, {}).setdefault(body["h"], (epoch, inc))
            elif rtype == RESET:
                table.pop(session, None)

        directory = Path(directory)
        dir_lock = DataDirLock.acquire(directory)  # before reading: one bus per journal
        try:
            # Compaction removes a prefix of the log; it then starts at its first segment's LSN.
            segments = list_segments(directory)
            first = segments[0].first_lsn if segments else 1
            wal = Wal.open(directory, WalConfig(segment_bytes=16 << 20, unsafe_no_fsync=unsafe_no_fsync),
                           replay_from_lsn=first, on_record=replay)
        except BaseException:
            dir_lock.release()
            raise
        journal = cls(wal, table, max_sessions, dir_lock)
        live = sum(len(t) for t in table.values())
        if records > 4 * live + 1024:
            try:
                await journal._compact()
            except BaseException:
                await journal.close()
                raise
        log.info("session journal %s: %d sessions (%d records replayed)", directory, len(table), records)
        return journal

    async def _compact(self) -> None:
        self._wal.roll()
        first = None
        for session, tokens in self.table.items():
            for shard, token in tokens.items():
                lsn = self._wal.append(OBSERVE, {"s": list(session), "h": shard, "t": list(token)})
                first = first or lsn
        if first is None:  # nothing live: an empty record-free segment would not roll
            first = self._wal.append(RESET, {"s": ["", ""]})
        await self._wal.sync()
        self._wal.remove_segments_before(first)

    async def observe(self, session: SessionRef, shard: int, token: Token) -> None:
        if session not in self.table and len(self.table) >= self.max_sessions:
            # Evicting would forget where a session read; refusing keeps it fail-closed.
            raise LimitExceeded(
                f"{self.max_sessions} sessions are tracked for clients without tokens; "
                "reset finished sessions (POST /session) to make room",
                limit=self.max_sessions,
            )
        await self._wal.sync(self._wal.append(OBSERVE, {"s": list(session), "h": shard, "t": list(token)}))

    async def reset(self, session: SessionRef) -> None:
        await self._wal.sync(self._wal.append(RESET, {"s": list(session)}))

    async def close(self) -> None:
        try:
            await self._wal.close()
        finally:
            if self._dir_lock is not None:
                self._dir_lock.release()
