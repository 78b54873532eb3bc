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
applied (after its WAL record is durable), buffered and committed in one LMDB
transaction per applied commit (``flush``), *without* an fsync; ``sync``
(an fsync) runs before every snapshot and at close. A record's (key,
version) names exactly one WAL record's write, so writing it again is
harmless: after a crash the shard replays the WAL from its last snapshot, and
every version that replay replaces is written again, the same bytes under the
same key. What a crash can take from this file (commits since the last
``sync``) is therefore always replayed from the WAL, which still holds every
record after that snapshot.

Reads: ``get`` goes through a bounded cache of decoded versions
(``cache_bytes``); ``newest_first`` walks the B+tree in chunks of a few
versions, each in its own read transaction, so a reader that stops early
(``history(limit=1)``) reads no more.
"""

from __future__ import annotations

import contextlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lmdb
import msgpack

from oribus.errors import DataCorrupted, Unavailable
from oribus.failpoints import failpoint
from oribus.shards.history.base import Meta, Older

FORMAT = b"1"
_FORMAT_KEY = b"\x00format"
_VERSION = struct.Struct(">Q")  # u64 big-endian: byte order is version order
_SEP = b"\x00"
# Address space reserved for the file, its largest size (it grows as written, not to this;
# a full map refuses the flush with Unavailable, and a reopen with a larger map goes on).
DEFAULT_MAP_BYTES = 1 << 38
_AUTO_FLUSH = 4096  # buffered versions that make ``put`` flush on its own (recovery replays)
_CHUNK = 8  # versions read per read transaction in ``newest_first``


def _record_key(key: str, version: int) -> bytes:
    return key.encode() + _SEP + _VERSION.pack(version)


class LmdbHistory:
    persistent = True

    def __init__(self, directory: Path, *, cache_bytes: int, map_bytes: int = DEFAULT_MAP_BYTES,
                 unsafe_no_fsync: bool = False) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            # sync=False: a commit does not fsync (``sync`` does, before a snapshot): the WAL
            # replays what a crash takes. readahead=False: random reads of old versions.
            self.env = lmdb.open(str(self.directory), map_size=map_bytes, subdir=True, sync=False,
                                 metasync=False, readahead=False, max_dbs=0, lock=True)
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
        self._puts: dict[tuple[str, int], Older] = {}  # written by ``put``, not yet flushed
        self._forget: dict[str, int] = {}  # key -> drop versions up to this one, at the next flush
        self._meta_seen: dict[tuple[Any, ...], Meta] = {}  # decoded metas of the last chunk read, shared
        self.counters = {"flushes": 0, "versions_written": 0, "versions_dropped": 0,
                         "reads": 0, "cache_hits": 0, "syncs": 0}

    # ---- writes -------------------------------------------------------------------

    def put(self, key: str, older: Older) -> None:
        ck = (key, older[0])
        self._puts[ck] = older
        if ck in self._cache:  # a version number written again after a lost WAL tail (unsafe_no_fsync)
            self._uncache(ck)
        if len(self._puts) >= _AUTO_FLUSH:
            self.flush()

    def forget_through(self, key: str, version: int) -> None:
        if version > self._forget.get(key, 0):
            self._forget[key] = version

    def flush(self) -> None:
        """Commit what ``put`` and ``forget_through`` buffered, in one LMDB transaction (no fsync)."""
        if not self._puts and not self._forget:
            return
        failpoint("history.before_flush")  # the WAL record is durable, this file lacks its versions
        puts, forget = self._puts, self._forget
        try:
            dropped = self._write(puts, forget)
        except lmdb.Error as e:
            # Nothing was committed: the buffers stay (and stay readable) for the next flush.
            raise Unavailable(f"history store {self.directory}: writing {len(puts)} versions failed: {e}") from e
        # (Cached versions below a key's kept range may stay until they age out: the store
        # never asks for a version outside that range.)
        self._puts, self._forget = {}, {}
        self.counters["flushes"] += 1
        self.counters["versions_written"] += len(puts)
        self.counters["versions_dropped"] += dropped

    def _write(self, puts: dict[tuple[str, int], Older], forget: dict[str, int]) -> int:
        dropped = 0
        with self.env.begin(write=True) as txn:
            for (key, version), (_, value, meta) in puts.items():
                txn.put(_record_key(key, version),
                        msgpack.packb([value, meta[0], meta[1], meta[2], meta[3]], use_bin_type=True))
            cursor = txn.cursor()
            for key, through in forget.items():
                prefix = key.encode() + _SEP
                if not cursor.set_range(prefix):
                    continue
                while True:
                    k = cursor.key()
                    if not k.startswith(prefix) or _VERSION.unpack(k[len(prefix):])[0] > through:
                        break
                    dropped += 1
                    if not cursor.delete():  # moves to the next record
                        break
        return dropped

    def sync(self) -> None:
        """fsync what was flushed (LMDB's ``env.sync(force=True)``); runs in a worker thread."""
        if not self._unsafe_no_fsync:
            try:
                self.env.sync(True)
            except lmdb.Error as e:
                raise Unavailable(f"history store {self.directory}: fsync failed: {e}") from e
            self.counters["syncs"] += 1

    def clear(self) -> None:
        self._puts, self._forget = {}, {}
        self._cache.clear()
        self._cache_size = 0
        with self.env.begin(write=True) as txn:
            txn.drop(self._db, delete=False)
            txn.put(_FORMAT_KEY, FORMAT)

    def close(self) -> None:
        """Flush, fsync and close. Idempotent."""
        if getattr(self, "_closed", False):
            return
        self.flush()
        self.sync()
        self.env.close()
        self._closed = True

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
        ck = (key, version)
        pending = self._puts.get(ck)
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
        self.flush()  # one place to read from: the file
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
        self.flush()
        prefix = key.encode() + _SEP
        with self.env.begin() as txn:
            cursor = txn.cursor()
            if not cursor.set_range(prefix + _VERSION.pack(lowest)):
                return None
            k = cursor.key()
        if not k.startswith(prefix) or len(k) != len(prefix) + _VERSION.size:
            return None
        return int(_VERSION.unpack(k[len(prefix):])[0])

    def view(self) -> LmdbView:
        """An LMDB read transaction over everything flushed now: later commits and retention
        deletes do not reach it (copy-on-write keeps its pages), so a watch replaying from it
        never loses a version it planned. Held open, it keeps those pages from being reused:
        the watcher closes it once its replay is done, or when it ends."""
        self.flush()
        return LmdbView(self.env.begin(), self._decode, self.directory)

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
    """``HistoryView`` over one LMDB read transaction (``LmdbHistory.view``)."""

    def __init__(self, txn: lmdb.Transaction, decode: Callable[[int, bytes], Older], directory: Path) -> None:
        self._txn: lmdb.Transaction | None = txn
        self._decode = decode
        self._directory = directory

    def _gone(self, why: object) -> Unavailable:
        # The shard closed (its environment with it) while a watch was replaying: the stream
        # stops with a retryable error, and the client resumes from the last versions it saw.
        return Unavailable(f"history store {self._directory} closed during a watch's replay ({why}); "
                           "resume from the last version seen of each key")

    def ascending(self, key: str, lowest: int, highest: int) -> Iterator[Older]:
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
