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
and the commit fails closed (specs/PROTOCOL.md, "Sessions: scopes and failing
closed").

Some sessions must fail closed although the bus no longer tracks their reads:
one evicted over a session cap, or reset (or forgotten) by a caller that did
not prove it owns it (specs/http.md). Such a session is *marked*: its next
commit is refused with SessionExpired, which *acknowledges* the mark (the
client now knows its earlier reads are gone), and later commits are checked
as usual. Marks live in a fixed-size bit set indexed by a hash of the
session, so a flood of evicted sessions costs no memory: a session whose bit
another one set (a false positive) is refused once, then acknowledged —
never validated against less than it read.

Format: a WAL (``oribus.shards.wal``: CRC-32C framed msgpack records in
segments, torn-tail recovery) in its own directory, with these record types::

    OBSERVE  {"s": [agent, session_id], "h": shard, "t": [epoch, incarnation]}
    RESET    {"s": [agent, session_id]}     tokens dropped (an acknowledged or owned session stays, empty)
    OWN      {"s": [agent, session_id], "h": sha256(session_token)}   who opened the session
    OWNER    {"s": [agent, session_id], "a": identity}   under --auth: the identity the session
                                            belongs to (specs/auth.md §5); kept through RESET
                                            and MARK (a reset or evicted session stays its owner's)
    MARK     {"s": [agent, session_id]}     bit set; tokens, owner and acknowledgement dropped
    ACK      {"s": [agent, session_id]}     the session was refused once for its mark
    MARKS    {"b": bytes}                   the whole bit set (compaction; empty: all clear)

Replay keeps the first token per (session, shard) until a RESET or MARK, like
the in-memory table. Opening compacts the journal when it holds far more
records than live entries: the live entries (and the bit set, if any bit is
set) are appended to a new segment, made durable, and only then are the
older segments removed, so a crash at any point replays to the same state.

The directory is locked (``<dir>/LOCK``, ``oribus.datadir_lock``) before it is
read, so a second bus on the same directory is refused with ``DataDirLocked``.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from oribus.datadir_lock import DataDirLock
from oribus.messages import Token
from oribus.shards.wal import Wal, WalConfig, list_segments
from oribus.types import SessionRef

log = logging.getLogger("oribus.bus.sessions")

OBSERVE = 1
RESET = 2
MARK = 3
ACK = 4
MARKS = 5
OWN = 6
OWNER = 7

MARK_BITS = 1 << 23  # 1 MiB of marks: ~1% false positives after 80,000 marked sessions


def mark_bit(session: SessionRef) -> int:
    """The session's bit in the mark set (stable across restarts and processes)."""
    digest = hashlib.blake2b(f"{session[0]}\0{session[1]}".encode("utf-8", "surrogatepass"), digest_size=8)
    return int.from_bytes(digest.digest(), "little") % MARK_BITS


class SessionJournal:
    """``await SessionJournal.open(dir)``; every change returns once durable, and only
    then shows in ``table`` / ``acked`` / ``is_marked`` (one ``_apply`` for replay and
    live changes)."""

    def __init__(self, wal: Wal, dir_lock: DataDirLock | None = None) -> None:
        self._wal = wal
        self._dir_lock = dir_lock  # released on close
        self.table: dict[SessionRef, dict[int, Token]] = {}  # SessionTable adopts it
        self.acked: set[SessionRef] = set()  # marked sessions refused once since (each has a table entry)
        self.owners: dict[SessionRef, bytes] = {}  # sha256 of each owned session's token (each has an entry)
        # under --auth: the identity each session belongs to, in the order claimed (SessionOwners adopts it)
        self.identities: dict[SessionRef, str] = {}
        self._marks = bytearray(MARK_BITS // 8)
        self._any_mark = False

    @classmethod
    async def open(cls, directory: Path, *, unsafe_no_fsync: bool = False) -> SessionJournal:
        records = 0
        pending: list[tuple[int, Any]] = []

        def replay(_lsn: int, rtype: int, body: Any) -> None:
            nonlocal records
            records += 1
            pending.append((rtype, body))

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
        journal = cls(wal, dir_lock)
        for rtype, body in pending:
            journal._apply(rtype, body)
        live = (sum(len(t) for t in journal.table.values()) + len(journal.acked) + len(journal.owners)
                + len(journal.identities))
        if records > 4 * live + 1024:
            try:
                await journal._compact()
            except BaseException:
                await journal.close()
                raise
        log.info("session journal %s: %d sessions (%d records replayed)", directory, len(journal.table), records)
        return journal

    def _apply(self, rtype: int, body: Any) -> None:
        if rtype == MARKS:
            bits = bytes(body["b"])
            self._marks[:] = bits if bits else bytes(len(self._marks))
            self._any_mark = bool(bits) and any(bits)
            if not bits:
                self.acked.clear()
                for s in [s for s, t in self.table.items() if not t and s not in self.owners]:
                    del self.table[s]
            return
        session = SessionRef(body["s"][0], body["s"][1])
        if rtype == OBSERVE:
            epoch, inc = body["t"]
            self.table.setdefault(session, {}).setdefault(body["h"], (epoch, inc))
        elif rtype == RESET:
            if session in self.acked or session in self.owners:
                self.table[session] = {}
            else:
                self.table.pop(session, None)
        elif rtype == MARK:
            bit = mark_bit(session)
            self._marks[bit >> 3] |= 1 << (bit & 7)
            self._any_mark = True
            self.table.pop(session, None)
            self.acked.discard(session)
            self.owners.pop(session, None)
        elif rtype == OWN:
            self.owners[session] = bytes(body["h"])
            self.table.setdefault(session, {})
        elif rtype == ACK:
            self.acked.add(session)
            self.table.setdefault(session, {})
        elif rtype == OWNER:
            self.identities.setdefault(session, body["a"])  # the first claim stands

    async def _write(self, rtype: int, body: Any) -> None:
        await self._wal.sync(self._wal.append(rtype, body))
        self._apply(rtype, body)

    async def _compact(self) -> None:
        self._wal.roll()
        first = None
        if self._any_mark:
            first = self._wal.append(MARKS, {"b": bytes(self._marks)})
        for session in self.acked:
            lsn = self._wal.append(ACK, {"s": list(session)})
            first = first or lsn
        for session, digest in self.owners.items():
            lsn = self._wal.append(OWN, {"s": list(session), "h": digest})
            first = first or lsn
        for session, identity in self.identities.items():  # (those SessionOwners dropped over its cap are gone)
            lsn = self._wal.append(OWNER, {"s": list(session), "a": identity})
            first = first or lsn
        for session, tokens in self.table.items():
            for shard, token in tokens.items():
                lsn = self._wal.append(OBSERVE, {"s": list(session), "h": shard, "t": list(token)})
                first = first or lsn
        if first is None:  # nothing live: an empty record-free segment would not roll
            first = self._wal.append(RESET, {"s": ["", ""]})
        await self._wal.sync()
        self._wal.remove_segments_before(first)

    def is_marked(self, session: SessionRef) -> bool:
        """Whether the session's bit is set (it, or one sharing its bit, was marked)."""
        if not self._any_mark:
            return False
        bit = mark_bit(session)
        return bool(self._marks[bit >> 3] & (1 << (bit & 7)))

    async def observe(self, session: SessionRef, shard: int, token: Token) -> None:
        await self._write(OBSERVE, {"s": list(session), "h": shard, "t": list(token)})

    async def reset(self, session: SessionRef) -> None:
        await self._write(RESET, {"s": list(session)})

    async def mark(self, session: SessionRef) -> None:
        await self._write(MARK, {"s": list(session)})

    async def own(self, session: SessionRef, token_digest: bytes) -> None:
        await self._write(OWN, {"s": list(session), "h": token_digest})

    async def own_by(self, session: SessionRef, identity: str) -> None:
        """Record that ``session`` belongs to ``identity`` (durable on return)."""
        await self._write(OWNER, {"s": list(session), "a": identity})

    async def ack(self, session: SessionRef) -> None:
        await self._write(ACK, {"s": list(session)})

    async def clear_marks(self) -> None:
        """Every mark and acknowledgement gone (S-Bus ``/admin/reset``)."""
        await self._write(MARKS, {"b": b""})

    async def close(self) -> None:
        try:
            await self._wal.close()
        finally:
            if self._dir_lock is not None:
                self._dir_lock.release()
