"""``LmdbHistory``: a shard's older versions in an LMDB file (issue 20, specs/engine.md "History store").

LMDB is a memory-mapped copy-on-write B+tree (the design etcd's bbolt copies):
readers never block, a commit either happened whole or not at all, and the
file needs no repair after a crash. It was chosen over SQLite in WAL mode by
``benchmarks/history_engines.py`` (figures in specs/engine.md).

Layout: ``DATA/shard-NNNN/history/data.mdb`` (``ShardConfig.history_dir``) (and LMDB's ``lock.mdb``), one
unnamed database. Each version is one record::

    key   = UTF-8 key | 0x00 | u64 version, big-endian
    value = msgpack [value or nil, agent, session id, commit id, committed_at]

A key never holds a control character (specs/engine.md "Data model"), so the
0x00 separator sorts all versions of a key together, in version order, before
any longer key: ``history`` and ``oldest`` are one cursor walk. One record
``0x00 "format"`` -> ``b"1"`` names the layout (no user key starts with 0x00).

Durability: the shard's WAL stays the source of durability (and of
replication). A version is written here when the write that replaces it is
applied (after its WAL record is durable). ``put`` buffers it; ``flush`` (once
per applied commit, on the shard's event loop) hands the buffer to a
background committer thread and returns at once. The committer writes every
batch handed to it since its last commit in one LMDB transaction, committed
with LMDB's ``sync`` on and ``metasync`` off (``MDB_NOMETASYNC``): the commit
fdatasyncs the new pages before it writes the meta page that points at them,
and leaves only that meta page unsynced until the next commit's fdatasync (or
``sync``). LMDB documents this mode as keeping the file's integrity ("a system
crash may undo the last committed transaction"); it never reuses a page the
last two metas can reach, so the unsynced meta at worst names the previous
transaction's tree, which is whole on disk. (With ``sync`` off, as
``unsafe_no_fsync`` opens it, a power cut may write the meta page before the
pages it points at, or pages reused after a commit the disk never saw: the
file can then be corrupt, not just behind.) The committer commits at most once
per ``_COMMIT_INTERVAL`` (20 ms; ``sync`` skips the pause), so one fdatasync
serves every commit applied meanwhile: its count follows the clock, not the
commit rate, and the event loop never waits for it.

What a crash or a power cut can take from this file is therefore only a
suffix of whole transactions: the batches handed over but not committed, and
the last committed one. ``sync`` (waits for the committer, then fsyncs the
meta) runs before every snapshot, so the WAL after the latest snapshot always
holds every record whose versions the file may lack. A record's (key,
version) names exactly one WAL record's write, so writing it again is
harmless: after a crash the shard replays the WAL from its last snapshot,
and every version that replay replaces is written again, the same bytes
under the same key.

Until the committer has committed a batch, its versions stay readable from
memory (``get``, ``newest_first``, ``oldest`` and ``view`` read them before
the file, so a version is never missed between the two). A failed commit
(a full map, a disk error) keeps its batches in memory and is retried at the
next ``flush``; ``sync`` raises it (``Unavailable``), so no snapshot lets the
WAL go while it lasts.

Retention (specs/engine.md "Retention"): the count rule's ``forget_through``
and the age rule's ``expire_older`` are buffered like ``put`` and handed to the
committer with the next ``flush``; it deletes them in the same LMDB transaction
as the batch's puts (count first, then age, each counted apart in ``stats``).
Until that transaction commits the versions an age expiry dropped are hidden
from reads by a floor per key kept in memory with the buffered batch (the count
rule needs none: reads ask only for the count's kept range). Every delete is of
a key's oldest versions, so whichever of these transactions a crash undoes, the
file still holds one consecutive run per key; a crash only brings back versions
(the next compaction drops them again), never loses a newer one.

Reads: ``get`` goes through a bounded cache of decoded versions
(``cache_bytes``); ``newest_first`` walks the B+tree in chunks of a few
versions, each in its own read transaction, so a reader that stops early
(``history(limit=1)``) reads no more.
"""

from __future__ import annotations

import contextlib
import heapq
import logging
import os
import struct
import tempfile
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import lmdb
import msgpack

from oribus.errors import DataCorrupted, Unavailable
from oribus.failpoints import failpoint
from oribus.shards.history.base import Meta, Older
from oribus.shards.wal.segment import fsync_directory

log = logging.getLogger("oribus.history")

FORMAT = b"1"
_FORMAT_KEY = b"\x00format"
_VERSION = struct.Struct(">Q")  # u64 big-endian: byte order is version order
_SEP = b"\x00"
# Address space reserved for the file, its largest size (it grows as written, not to this;
# a full map refuses the flush with Unavailable, and a reopen with a larger map goes on).
DEFAULT_MAP_BYTES = 1 << 38
_AUTO_FLUSH = 4096  # buffered versions that make ``put`` flush on its own (recovery replays)
_CHUNK = 8  # versions read per read transaction in ``newest_first``
# Versions handed to the committer and not yet committed above which ``flush`` waits for it
# (memory stays bounded when writes outrun the disk, as a long recovery replay may).
_MAX_HANDED = 65_536
_IDLE_SECONDS = 5.0  # the committer thread ends after this long without work (a flush restarts it)
# The committer commits at most this often (unless ``sync`` waits): what is handed over meanwhile
# joins the next transaction, so the engine's fdatasyncs stay few however fast commits come.
_COMMIT_INTERVAL = 0.02

Pending = dict[str, dict[int, Older]]  # key -> version -> record, not yet in the file


def _record_key(key: str, version: int) -> bytes:
    return key.encode() + _SEP + _VERSION.pack(version)


def _by_version(older: Older) -> int:
    return older[0]


def _committed_at(raw: bytes) -> float:
    """A record's commit time, without decoding its value (``expire_older`` reads many)."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(raw)
    unpacker.read_array_header()
    for _ in range(4):  # value, agent, session id, commit id
        unpacker.skip()
    return float(unpacker.unpack())


class _Batch:
    """What one ``flush`` handed to the committer."""

    __slots__ = ("puts", "forget", "expire", "count")

    def __init__(self, puts: Pending, forget: dict[str, int], expire: dict[str, int], count: int) -> None:
        self.puts = puts
        self.forget = forget  # key -> the count rule drops its versions up to this one
        self.expire = expire  # key -> the age rule drops its versions up to this one
        self.count = count


class LmdbHistory:
    persistent = True

    def __init__(self, directory: Path, *, cache_bytes: int, map_bytes: int = DEFAULT_MAP_BYTES,
                 unsafe_no_fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            # sync=True, metasync=False: each commit fdatasyncs its pages before writing the
            # meta page (left unsynced until the next commit): a power cut may undo the last
            # commit, never corrupt the file (module docstring). readahead=False: random reads.
            self.env = lmdb.open(str(self.directory), map_size=map_bytes, subdir=True,
                                 sync=not unsafe_no_fsync, metasync=False, readahead=False,
                                 max_dbs=0, lock=True)
        except lmdb.Error as e:
            raise DataCorrupted(f"history store {self.directory} cannot be opened: {e}",
                                path=str(self.directory)) from e
        self._db = self.env.open_db()  # the main (unnamed) database
        with self.env.begin(write=True) as txn:
            have = txn.get(_FORMAT_KEY)
            if have is None:
                txn.put(_FORMAT_KEY, FORMAT)
            elif have != FORMAT:
                self.env.close()
                raise DataCorrupted(f"history store {self.directory} has format {have!r}, not {FORMAT!r}",
                                    path=str(self.directory))
        self._unsafe_no_fsync = unsafe_no_fsync
        self._cache_limit = cache_bytes
        self._cache: OrderedDict[tuple[str, int], Older] = OrderedDict()
        self._cache_size = 0
        # Written by ``put``, not yet handed to the committer (the event loop's side):
        self._puts: Pending = {}
        self._buffered = 0
        self._forget: dict[str, int] = {}  # key -> drop versions up to this one, at the next flush
        self._expire: dict[str, int] = {}  # the same, by age: hidden from reads from now on (``_floor``)
        # Handed to the committer, not yet committed (oldest first); guarded by ``_cond``,
        # which also wakes the committer and whoever waits for it.
        self._cond = threading.Condition()
        self._handed: deque[_Batch] = deque()
        self._handed_versions = 0
        self._failure: BaseException | None = None  # the last commit's error, until one succeeds
        self._kicks = 0  # bumped by every flush and sync: a failed committer retries on the next
        self._waiters = 0  # callers of ``sync`` waiting for the committer (it then skips its pause)
        self._idle = False  # the committer waits for work (a flush then wakes it; in its pause it is left be)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._meta_seen: dict[tuple[Any, ...], Meta] = {}  # decoded metas of the last chunk read, shared
        self.counters = {"flushes": 0, "commits": 0, "versions_written": 0, "dropped_by_count": 0,
                         "dropped_by_age": 0, "reads": 0, "cache_hits": 0, "syncs": 0, "commit_failures": 0}

    # ---- writes -------------------------------------------------------------------

    def put(self, key: str, older: Older) -> None:
        versions = self._puts.get(key)
        if versions is None:
            versions = self._puts[key] = {}
        if older[0] not in versions:
            self._buffered += 1
        versions[older[0]] = older
        ck = (key, older[0])
        if ck in self._cache:  # a version number written again after a lost WAL tail (unsafe_no_fsync)
            self._uncache(ck)
        if self._buffered >= _AUTO_FLUSH:
            self.flush()

    def forget_through(self, key: str, version: int) -> None:
        if version > self._forget.get(key, 0):
            self._forget[key] = version

    def expire_older(self, key: str, cutoff: float, lowest: int, below: int) -> int:
        lowest = max(lowest, self._floor(key) + 1)
        pending = self._pending(key)
        through = 0
        expect = lowest
        with self.env.begin() as txn:
            cursor = txn.cursor()
            prefix = key.encode() + _SEP
            in_file = cursor.set_range(prefix + _VERSION.pack(lowest))
            while expect < below:
                older = pending.get(expect)
                if older is not None:
                    at = older[2][3]
                else:
                    # the file's next version of ``key`` at or above ``expect``
                    while in_file:
                        k = cursor.key()
                        if not k.startswith(prefix) or len(k) != len(prefix) + _VERSION.size:
                            in_file = False
                            break
                        version = _VERSION.unpack(k[len(prefix):])[0]
                        if version >= expect:
                            break
                        in_file = cursor.next()
                    if not in_file or _VERSION.unpack(cursor.key()[len(prefix):])[0] != expect:
                        break  # not held (the run ends): nothing past a gap is dropped
                    at = _committed_at(cursor.value())
                if not at < cutoff:
                    break
                through = expect
                expect += 1
        if not through:
            return 0
        self._expire[key] = through
        for version in range(lowest, through + 1):
            ck = (key, version)
            if ck in self._cache:
                self._uncache(ck)
        return through - lowest + 1

    def _floor(self, key: str) -> int:
        """The newest version of ``key`` an age expiry dropped that the file may still hold (0: none)."""
        floor = self._expire.get(key, 0)
        if self._handed:
            with self._cond:
                for batch in self._handed:
                    floor = max(floor, batch.expire.get(key, 0))
        return floor

    def flush(self) -> None:
        """Hand what ``put``, ``forget_through`` and ``expire_older`` buffered to the committer
        (no fsync, no wait, unless ``_MAX_HANDED`` versions are still waiting for the disk)."""
        if not self._puts and not self._forget and not self._expire:
            return
        failpoint("history.before_flush")  # the WAL record is durable, this file lacks its versions
        batch = _Batch(self._puts, self._forget, self._expire, self._buffered)
        with self._cond:
            if self._closed:
                raise Unavailable(f"history store {self.directory} is closed")
            while self._handed_versions > _MAX_HANDED:
                if self._failure is not None:
                    # Nothing handed over: the buffers stay (and stay readable) for the next flush.
                    raise Unavailable(f"history store {self.directory}: {self._handed_versions} versions "
                                      f"wait for a commit that fails: {self._failure}") from self._failure
                self._cond.wait()
            self._handed.append(batch)
            self._handed_versions += batch.count
            self._kicks += 1
            if self._thread is None:
                self._start_committer()
            elif self._idle:
                self._cond.notify_all()
        self._puts, self._forget, self._expire, self._buffered = {}, {}, {}, 0
        self.counters["flushes"] += 1

    def _start_committer(self) -> None:
        """Start the committer thread (the caller holds ``_cond`` and saw none running)."""
        self._thread = threading.Thread(target=self._commit_loop, daemon=True,
                                        name=f"history-committer:{self.directory}")
        self._thread.start()

    def _commit_loop(self) -> None:
        """The committer thread: every batch handed over since the last commit, in one LMDB
        transaction (one fdatasync). Ends when idle for ``_IDLE_SECONDS`` or at close."""
        seen_kicks = -1
        last_commit = 0.0
        while True:
            with self._cond:
                while not self._handed or (self._failure is not None and self._kicks == seen_kicks):
                    self._idle = True  # (a flush wakes it only now: not during its pause)
                    woken = self._cond.wait(_IDLE_SECONDS)
                    self._idle = False
                    if self._stopping or not woken:
                        if self._stopping or not self._handed:
                            self._thread = None
                            self._cond.notify_all()
                            return
                # At most one commit per _COMMIT_INTERVAL: what arrives meanwhile joins it.
                pause = last_commit + _COMMIT_INTERVAL - time.monotonic()
                if pause > 0 and not self._stopping and self._waiters == 0:
                    self._cond.wait(pause)
                seen_kicks = self._kicks
                batches = list(self._handed)
            try:
                failpoint("history.before_commit")  # handed over, not yet in the file
                by_count, by_age = self._write(batches)
            except BaseException as e:  # lmdb.Error, a closed environment, an armed failpoint
                with self._cond:
                    self._failure = e
                    self.counters["commit_failures"] += 1
                    self._cond.notify_all()
                log.error("history store %s: committing %d versions failed (kept in memory, retried "
                          "at the next flush): %s", self.directory, sum(b.count for b in batches), e)
                continue
            last_commit = time.monotonic()
            with self._cond:
                for _ in batches:
                    self._handed.popleft()
                written = sum(b.count for b in batches)
                self._handed_versions -= written
                self._failure = None
                self.counters["commits"] += 1
                self.counters["versions_written"] += written
                self.counters["dropped_by_count"] += by_count
                self.counters["dropped_by_age"] += by_age
                self._cond.notify_all()

    def _write(self, batches: list[_Batch]) -> tuple[int, int]:
        """One LMDB transaction: the batches' puts, then the count rule's deletes, then the age
        rule's. Returns how many records each rule deleted."""
        forget: dict[str, int] = {}
        expire: dict[str, int] = {}
        with self.env.begin(write=True) as txn:
            for batch in batches:
                for key, versions in batch.puts.items():
                    prefix = key.encode() + _SEP
                    for version, (_, value, meta) in versions.items():
                        txn.put(prefix + _VERSION.pack(version),
                                msgpack.packb([value, meta[0], meta[1], meta[2], meta[3]], use_bin_type=True))
                for through_of, into in ((batch.forget, forget), (batch.expire, expire)):
                    for key, through in through_of.items():
                        if through > into.get(key, 0):
                            into[key] = through
            cursor = txn.cursor()
            by_count = sum(_delete_through(cursor, key, through) for key, through in forget.items())
            if expire:
                failpoint("history.compact_commit")  # the age rule's deletes, in the committer's transaction
            by_age = sum(_delete_through(cursor, key, through) for key, through in expire.items())
        return by_count, by_age

    def _wait_committed(self) -> None:
        """Until every batch handed over is in the file; ``Unavailable`` if a commit fails."""
        with self._cond:
            self._failure = None  # the committer retries; its next error is this call's
            self._kicks += 1
            self._waiters += 1  # the committer commits at once, without its pause
            self._cond.notify_all()
            try:
                while self._handed and self._failure is None:
                    if self._thread is None:  # ended meanwhile (idle timer): start it again
                        self._start_committer()
                    self._cond.wait(1.0)
            finally:
                self._waiters -= 1
            if self._failure is not None:
                raise Unavailable(f"history store {self.directory}: committing {self._handed_versions} "
                                  f"versions failed: {self._failure}") from self._failure

    def sync(self) -> None:
        """Wait for the committer, then fsync (LMDB's ``env.sync(force=True)``: the last meta
        page too); runs in a worker thread."""
        self._wait_committed()
        if not self._unsafe_no_fsync:
            try:
                self.env.sync(True)
            except lmdb.Error as e:
                raise Unavailable(f"history store {self.directory}: fsync failed: {e}") from e
            self.counters["syncs"] += 1

    def clear(self) -> None:
        self._puts, self._forget, self._expire, self._buffered = {}, {}, {}, 0
        with contextlib.suppress(Unavailable):  # what could not be written is dropped anyway
            self._wait_committed()
        with self._cond:
            self._handed.clear()
            self._handed_versions = 0
            self._failure = None
        self._cache.clear()
        self._cache_size = 0
        with self.env.begin(write=True) as txn:
            txn.drop(self._db, delete=False)
            txn.put(_FORMAT_KEY, FORMAT)

    _closed = False

    def close(self) -> None:
        """Flush, wait for the committer, fsync and close. Idempotent."""
        if self._closed:
            return
        try:
            self.flush()
            self.sync()
        finally:
            with self._cond:
                self._closed = self._stopping = True
                self._cond.notify_all()
                while self._thread is not None:
                    self._cond.wait(1.0)
            self.env.close()

    def _pending(self, key: str) -> dict[int, Older]:
        """``key``'s versions not yet in the file, the newest write of each version winning.
        Read before the file: a batch leaves ``_handed`` only after its commit."""
        with self._cond:
            handed = [b.puts[key] for b in self._handed if key in b.puts]
        mine = self._puts.get(key)
        if not handed:
            return dict(mine) if mine else {}
        merged: dict[int, Older] = {}
        for versions in handed:
            merged.update(versions)
        if mine:
            merged.update(mine)
        return merged

    def _all_pending(self) -> Pending:
        with self._cond:
            handed = list(self._handed)
        merged: Pending = {}
        for puts in [b.puts for b in handed] + [self._puts]:
            for key, versions in puts.items():
                merged.setdefault(key, {}).update(versions)
        return merged

    # ---- reads --------------------------------------------------------------------

    def _decode(self, version: int, raw: bytes) -> Older:
        value, agent, session, commit_id, committed_at = msgpack.unpackb(raw, raw=False)
        shared = (agent, session, commit_id, committed_at)
        meta = self._meta_seen.get(shared)
        if meta is None:
            if len(self._meta_seen) > 64:
                self._meta_seen.clear()
            meta = self._meta_seen[shared] = shared
        return (version, value, meta)

    def _uncache(self, ck: tuple[str, int]) -> None:
        old = self._cache.pop(ck, None)
        if old is not None:
            self._cache_size -= 64 + len(old[1] or b"")

    def _remember(self, key: str, older: Older) -> None:
        size = 64 + len(older[1] or b"")
        if size > self._cache_limit:
            return
        ck = (key, older[0])
        self._uncache(ck)
        self._cache[ck] = older
        self._cache_size += size
        while self._cache_size > self._cache_limit:
            _, evicted = self._cache.popitem(last=False)
            self._cache_size -= 64 + len(evicted[1] or b"")

    def get(self, key: str, version: int) -> Older | None:
        if (self._expire or self._handed) and version <= self._floor(key):
            return None  # dropped by age; the committer has yet to delete it
        ck = (key, version)
        mine = self._puts.get(key)
        if mine is not None and version in mine:
            return mine[version]
        if self._handed:
            pending = self._pending(key).get(version)
            if pending is not None:
                return pending
        hit = self._cache.get(ck)
        if hit is not None:
            self._cache.move_to_end(ck)
            self.counters["cache_hits"] += 1
            return hit
        self.counters["reads"] += 1
        with self.env.begin() as txn:
            raw = txn.get(_record_key(key, version))
        if raw is None:
            return None
        older = self._decode(version, raw)
        self._remember(key, older)
        return older

    def newest_first(self, key: str, below: int, lowest: int) -> Iterator[Older]:
        lowest = max(lowest, self._floor(key) + 1)
        pending = [o for v, o in self._pending(key).items() if lowest <= v < below]
        pending.sort(key=_by_version, reverse=True)
        yield from _merge_unique(pending, self._file_newest_first(key, below, lowest), descending=True)

    def _file_newest_first(self, key: str, below: int, lowest: int) -> Iterator[Older]:
        prefix = key.encode() + _SEP
        upper = below  # next chunk: versions below this
        while upper > lowest:
            chunk: list[Older] = []
            with self.env.begin() as txn:
                cursor = txn.cursor()
                positioned = cursor.set_range(prefix + _VERSION.pack(upper))
                moved = cursor.prev() if positioned else cursor.last()
                while moved and len(chunk) < _CHUNK:
                    k = cursor.key()
                    if not k.startswith(prefix) or len(k) != len(prefix) + _VERSION.size:
                        break
                    version = _VERSION.unpack(k[len(prefix):])[0]
                    if version < lowest:
                        break
                    chunk.append(self._decode(version, cursor.value()))
                    moved = cursor.prev()
            self.counters["reads"] += 1
            if not chunk:
                return
            yield from chunk
            upper = chunk[-1][0]
            if len(chunk) < _CHUNK:
                return

    def oldest(self, key: str, lowest: int) -> int | None:
        lowest = max(lowest, self._floor(key) + 1)
        pending = [v for v in self._pending(key) if v >= lowest]
        prefix = key.encode() + _SEP
        found: int | None = None
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if cursor.set_range(prefix + _VERSION.pack(lowest)):
                k = cursor.key()
                if k.startswith(prefix) and len(k) == len(prefix) + _VERSION.size:
                    found = int(_VERSION.unpack(k[len(prefix):])[0])
        if found is not None:
            pending.append(found)
        return min(pending) if pending else None

    def view(self) -> LmdbView:
        """An LMDB read transaction over what is in the file now, with a copy of what is not
        yet (taken first: a batch leaves memory only once committed): later commits and
        retention deletes do not reach it (copy-on-write keeps its pages), so a watch
        replaying from it never loses a version it planned. Held open, it keeps those pages
        from being reused: the watcher closes it once its replay is done, or when it ends."""
        pending = self._all_pending()
        return LmdbView(self.env.begin(), self._decode, self.directory, pending)

    # ---- a consistent copy, for a replica group's catch-up ----------------------------

    def copy_file(self) -> BinaryIO:
        """The file as one read transaction sees it now, compacted (LMDB's ``env.copyfd``), in
        an unlinked temporary file beside it (the caller closes it): every version committed
        so far, none half written; what the committer has not yet committed is left out (the
        WAL after the snapshot that travels with it replays it). Runs in a worker thread."""
        f = tempfile.TemporaryFile(dir=self.directory)
        try:
            self.env.copyfd(f.fileno(), compact=True)
        except lmdb.Error as e:
            f.close()
            raise Unavailable(f"history store {self.directory}: copying it failed: {e}") from e
        return f

    @staticmethod
    def install_file(directory: Path, incoming: Path, *, fsync: bool = True) -> None:
        """Replace the file in ``directory`` (no environment open on it) by ``incoming``, a
        copy from ``copy_file`` already fsynced: renamed over ``data.mdb``, the directory
        fsynced. The reader lock table (``lock.mdb``) goes too; LMDB makes a new one."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        os.replace(incoming, directory / "data.mdb")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / "lock.mdb")
        if fsync:
            fsync_directory(directory)

    # ---- figures ------------------------------------------------------------------

    def stats(self) -> dict[str, float]:
        info = self.env.info()
        stat = self.env.stat()
        return {
            **self.counters,
            "records": stat["entries"],
            "file_bytes": (info["last_pgno"] + 1) * stat["psize"],
            "cache_bytes": self._cache_size,
            "cache_entries": len(self._cache),
        }

    def sizes(self, key: str) -> dict[str, int]:
        return {}  # nothing per key in memory but the bounded cache


class LmdbView:
    """``HistoryView`` over one LMDB read transaction and the versions not yet committed
    when it was taken (``LmdbHistory.view``)."""

    def __init__(self, txn: lmdb.Transaction, decode: Callable[[int, bytes], Older], directory: Path,
                 pending: Pending | None = None) -> None:
        self._txn: lmdb.Transaction | None = txn
        self._decode = decode
        self._directory = directory
        self._pending = pending or {}

    def _gone(self, why: object) -> Unavailable:
        # The shard closed (its environment with it) while a watch was replaying: the stream
        # stops with a retryable error, and the client resumes from the last versions it saw.
        return Unavailable(f"history store {self._directory} closed during a watch's replay ({why}); "
                           "resume from the last version seen of each key")

    def ascending(self, key: str, lowest: int, highest: int) -> Iterator[Older]:
        pending = sorted((o for v, o in self._pending.get(key, {}).items() if lowest <= v <= highest),
                         key=_by_version)
        yield from _merge_unique(pending, self._file_ascending(key, lowest, highest), descending=False)

    def _file_ascending(self, key: str, lowest: int, highest: int) -> Iterator[Older]:
        prefix = key.encode() + _SEP
        if self._txn is None:
            raise self._gone("view released")
        try:
            cursor = self._txn.cursor()
            if not cursor.set_range(prefix + _VERSION.pack(lowest)):
                return
            for item_key, item in cursor:
                k, raw = bytes(item_key), bytes(item)
                if not k.startswith(prefix) or len(k) != len(prefix) + _VERSION.size:
                    return
                version = _VERSION.unpack(k[len(prefix):])[0]
                if version > highest:
                    return
                yield self._decode(version, raw)
        except lmdb.Error as e:
            raise self._gone(e) from e

    def close(self) -> None:
        if self._txn is not None:
            with contextlib.suppress(lmdb.Error):  # already gone with its environment
                self._txn.abort()
            self._txn = None
        self._pending = {}


def _delete_through(cursor: lmdb.Cursor, key: str, through: int) -> int:
    """Delete ``key``'s records up to version ``through``; returns how many."""
    prefix = key.encode() + _SEP
    deleted = 0
    if not cursor.set_range(prefix):
        return 0
    while True:
        k = bytes(cursor.key())
        if not k.startswith(prefix) or _VERSION.unpack(k[len(prefix):])[0] > through:
            break
        deleted += 1
        if not cursor.delete():  # moves to the next record
            break
    return deleted


def _merge_unique(pending: list[Older], from_file: Iterable[Older], *, descending: bool) -> Iterator[Older]:
    """Two runs sorted the same way, merged lazily; a version in both (committed while it was
    read) comes once, from ``pending`` (the same bytes either way)."""
    if not pending:
        yield from from_file
        return
    order = (lambda o: -o[0]) if descending else _by_version
    last: int | None = None
    for older in heapq.merge(pending, from_file, key=order):
        if older[0] != last:
            last = older[0]
            yield older
