"""The append side of the WAL: buffered appends and asyncio group commit.

Lifecycle::

    wal = Wal.open(directory, WalConfig(), replay_from_lsn=snapshot_lsn + 1,
                   on_record=apply)          # recovery scan, then ready to append
    lsn = wal.append(RECORD_COMMIT, body)    # synchronous: buffered in memory
    await wal.sync(lsn)                      # returns once lsn is on disk and fsynced
    ...
    await wal.close()

Group commit
------------
``append`` only encodes the record and adds it to an in-memory buffer; it
never touches the disk. ``sync`` makes records durable. At most one flush is
in flight: it takes the whole buffer, and in the WAL's own flush thread
(``FlushThread``) writes it with one ``os.write`` and makes it durable with
one ``os.fdatasync``. Every
``sync`` that arrives while a flush runs waits for that flush and then, if
its record was appended too late to be part of it, starts the next one,
which takes everything appended in the meantime. So under load one fsync
covers all the records appended while the previous fsync ran, and the
number of fsyncs tracks the disk's latency rather than the request rate::

    appends:  a1 a2 a3      a4 a5 a6 a7 a8        a9
    flushes:  [write+fsync a1..a3]  [write+fsync a4..a8]  [write+fsync a9]

``durable_lsn`` only moves forward after the fsync returns, and ``sync``
returns only once ``durable_lsn`` covers the requested LSN, so a caller that
acknowledges after ``sync`` never acknowledges a record a power failure
could take away (unless ``unsafe_no_fsync`` is set).

Segments roll over at batch boundaries: before a batch is written, if the
active segment exceeds ``segment_bytes`` (or ``roll()`` asked for it), the
old file is fsynced and closed and a new one is created (``segment.py``).

Replica groups
--------------
What a replicated shard (``oribus.shards.replica``) needs of its log:

* ``on_batch(first_lsn, frames)``: called in the flush thread with every batch of
  encoded frames a flush takes, just before it is written (so a primary ships a batch
  while its own fsync runs; it counts itself only at ``durable_lsn``). The batches are
  exactly the group-commit batches, in LSN order.
* ``append_frames(data)``: a follower buffers frames received from its primary, checked
  with the recovery scan's code (``record.split_frames``: CRC, type, LSN ``last_lsn + 1``
  on) and written byte for byte; ``sync`` then makes them durable as any append.
* ``await truncate_after(lsn)``: cut the records after ``lsn`` (a divergent tail that was
  never committed): later segments are deleted, the one holding ``lsn + 1`` is truncated
  there, both fsynced with the directory.
* ``read_frames(from_lsn, max_bytes, cursor=)``: the frames from ``from_lsn`` on as they are on
  disk (a primary's catch-up of a lagging member); ``first_lsn`` is the oldest LSN the
  log still holds (older ones are only in a snapshot).

Failure
-------
If a write or fsync fails, every waiter receives ``Unavailable`` (chained to
the OSError) and the WAL is failed for good: every later ``append`` and
``sync`` raises the same error. After a failed fsync the kernel may have
dropped the dirty pages and a retried fsync can report success without the
data being on disk (PostgreSQL "fsyncgate", 2018), and a partial write
leaves an unknown tail; a WAL that failed to write must never acknowledge
anything again. The shard has to be reopened, which runs recovery.

Failpoints (``oribus.failpoints``): ``wal.before_append`` before a record is
encoded; ``wal.after_append`` right after a batch is written (before its
fsync); ``wal.before_fsync`` and ``wal.after_fsync`` around the fsync (hit
even when ``unsafe_no_fsync`` skips it, so crash tests see the same points).

Why a thread of its own rather than the loop's default executor: the hand-off
is on the path of every commit (each group of commits waits for one flush), and
a queue and one ``call_soon_threadsafe`` per flush cost less than the
executor's futures, work items and wrapping, on a thread whose caches stay
warm (``benchmarks/wal_handoff.py``: CPU per flush, both hand-offs).

Metrics (``oribus.metrics``): with a ``metrics_label`` (the shard sets its id),
every batch observes ``oribus_wal_batch_records`` and every fsync
``oribus_wal_fsync_seconds`` under ``shard=<label>``. They are observed in the
flush worker thread without a lock: ``_io_lock`` already makes this WAL's
batches one at a time, so each histogram child has one writer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from oribus.errors import DataCorrupted, Unavailable
from oribus.failpoints import failpoint
from oribus.metrics import WAL_BATCH_RECORDS, WAL_FSYNC_SECONDS
from oribus.shards.wal.reader import recover, scan_log
from oribus.shards.wal.record import (
    HEADER_SIZE,
    encode_record,
    frame_lsn,
    iter_records,
    split_frames,
)
from oribus.shards.wal.segment import (
    SEGMENT_HEADER_SIZE,
    Segment,
    create_segment,
    fsync_directory,
    remove_temp_segments,
    write_all,
)

log = logging.getLogger("oribus.wal")


@dataclass
class WalConfig:
    """Settings of one shard's WAL."""

    segment_bytes: int = 64 << 20  # roll to a new segment when the current one exceeds this
    unsafe_no_fsync: bool = False  # skip fsync: acknowledged commits can be lost on power failure


def _missing_records(directory: Path, where: str, expected: int, found: int) -> DataCorrupted:
    return DataCorrupted(
        f"WAL in {directory} is missing records {found + 1}..{expected}: {where}, but every record "
        f"up to LSN {expected} was durable",
        path=str(directory), expected_lsn=expected, found_lsn=found, reason=where,
    )


class FrameCursor(NamedTuple):
    """Where frame ``lsn`` begins on disk: segment ``seq``, byte ``offset`` (``read_frames``)."""

    seq: int
    offset: int
    lsn: int


class FrameRead(NamedTuple):
    """What ``read_frames`` returns."""

    data: bytes  # the frames, as on disk
    last_lsn: int  # the last LSN in ``data`` (from_lsn - 1: none)
    cursor: FrameCursor | None  # where the next read continues


def _offset_of(data: bytes, lsn: int) -> int:
    """The offset of frame ``lsn`` in a segment file's bytes (the end of its intact frames if
    it holds no such frame)."""
    offset = SEGMENT_HEADER_SIZE
    for record_lsn, _rtype, _body, end in iter_records(data, SEGMENT_HEADER_SIZE, decode_from_lsn=1 << 64):
        if record_lsn >= lsn:
            break
        offset = end
    return offset


def _fdatasync(fd: int) -> None:
    # Looked up on every call so tests can replace os.fdatasync; platforms
    # without fdatasync (macOS) fall back to fsync.
    sync = getattr(os, "fdatasync", None) or os.fsync
    sync(fd)


class FlushThread:
    """The thread that runs one WAL's flushes, one at a time, handing each result back to the
    event loop that asked for it (``submit`` returns an asyncio future). ``stop()`` runs what
    was submitted, then ends the thread; idempotent."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._stopped = False

    def submit(self, fn: Callable[[], None]) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._jobs.put((fn, fut, loop))
        return fut

    def stop(self, wait: bool = True) -> None:
        if not self._stopped:
            self._stopped = True
            self._jobs.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut, loop = job
            error = None
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - handed to the waiters
                error = e
            try:
                loop.call_soon_threadsafe(_settle, fut, error)
            except RuntimeError:  # the loop is closed: nobody waits any more
                pass


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


DurableCallback = Callable[[BaseException | None], None]


class GroupCommit:
    """Group commit, shared by the WAL and its simulated twin (``oribus.sim.disk``): at
    most one flush in flight, taking every record buffered so far; ``sync`` waits for
    flushes until its record is durable, starting the next one when it came too late;
    ``when_durable`` does the same for a callback, without a task or a future per caller.
    A subclass keeps ``_last_lsn``, ``_durable_lsn``, ``_flush`` and ``_failed`` and
    provides ``_check_usable`` and ``_start_flush``."""

    _last_lsn: int
    _durable_lsn: int
    _flush: asyncio.Future[None] | None
    _failed: Unavailable | None
    _durable_waiters: collections.deque[tuple[int, DurableCallback]] | None = None

    @property
    def last_lsn(self) -> int:
        """Highest LSN appended (0 if none)."""
        return self._last_lsn

    @property
    def durable_lsn(self) -> int:
        """Highest LSN known fsynced (with ``unsafe_no_fsync``: known written)."""
        return self._durable_lsn

    def _sync_target(self, lsn: int | None) -> int:
        self._check_usable()
        target = self._last_lsn if lsn is None else lsn
        if target > self._last_lsn:
            raise ValueError(f"cannot sync LSN {target}: last appended LSN is {self._last_lsn}")
        return target

    async def sync(self, lsn: int | None = None) -> None:
        """Return once every record up to ``lsn`` (default: ``last_lsn``) is written and fsynced.

        Raises ``Unavailable`` if the WAL failed to write (now or earlier). A cancelled
        caller cancels only its own wait, never the flush other callers depend on.
        """
        target = self._sync_target(lsn)
        if self._durable_lsn >= target:
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.when_durable(target, lambda error: _settle(done, error))
        await done

    def when_durable(self, lsn: int, callback: DurableCallback) -> None:
        """Call ``callback(None)`` once every record up to ``lsn`` is written and fsynced, or
        ``callback(error)`` once the WAL cannot make it so (the error ``sync`` would raise).

        Raises at once, without calling back, a failed or closed WAL or an LSN not appended.
        Callbacks run on the event loop, from the completion of the flush that made them
        durable, in the order they were registered (one registered after a higher LSN waits
        for that one's flush: register right after ``append``). One flush calls back every
        record it covered: no task, no shield, no future per waiter.
        """
        target = self._sync_target(lsn)
        waiters = self._durable_waiters
        if waiters is None:
            waiters = self._durable_waiters = collections.deque()
        waiters.append((target, callback))
        if len(waiters) == 1:  # the others are armed already: the next completion sees this one
            self._arm_durable_waiters()

    def _arm_durable_waiters(self) -> None:
        """Have the flush in flight, or a new one, call back the waiters when it completes."""
        try:
            self._check_usable()
            flush = self._flush
            if flush is None or flush.done():
                flush = self._start_flush()
        except Exception as e:  # noqa: BLE001 - handed to the waiters
            self._fail_durable_waiters(e)
            return
        flush.add_done_callback(self._call_durable_waiters)

    def _call_durable_waiters(self, flush: asyncio.Future[None]) -> None:
        waiters = self._durable_waiters
        if not waiters:
            return
        if self._failed is not None:
            self._fail_durable_waiters(self._failed)
            return
        durable = self._durable_lsn
        while waiters and waiters[0][0] <= durable:
            _, callback = waiters.popleft()
            try:
                callback(None)
            except Exception:  # one caller's failure must not strand the others
                log.exception("a WAL durability callback failed")
        if waiters:  # appended after that flush took the buffer: the next one has them
            self._arm_durable_waiters()

    def _fail_durable_waiters(self, error: BaseException) -> None:
        waiters, self._durable_waiters = self._durable_waiters, None
        for _, callback in waiters or ():
            try:
                callback(error)
            except Exception:  # one caller's failure must not strand the others
                log.exception("a WAL durability callback failed")

    def _check_usable(self) -> None:
        raise NotImplementedError

    def _start_flush(self) -> asyncio.Future[None]:
        raise NotImplementedError


class Wal(GroupCommit):
    """One shard's write-ahead log (the append side; recovery runs in ``open``).

    Example::

        wal = Wal.open("/var/lib/oribus/shard-3/wal", on_record=state.apply)
        lsn = wal.append(1, {"k": "key-1", "v": 7})
        await wal.sync(lsn)        # durable from here on
        await wal.close()

    ``append`` and ``sync`` are meant to be called from one event loop; the
    disk work runs in the WAL's flush thread (``FlushThread``).
    """

    def __init__(
        self,
        directory: Path,
        config: WalConfig,
        segments: list[Segment],
        last_lsn: int,
        *,
        metrics_label: str = "",
    ) -> None:
        """Use ``Wal.open``: it runs recovery and prepares the active segment."""
        # _buffer_lock makes "assign the next LSN and buffer its frame" atomic
        # with respect to a flush taking the buffer. _io_lock serialises flushes
        # (the async one in a worker thread, sync_now on the caller's thread)
        # so batches reach the file in LSN order. _segments_lock guards the
        # segment list shared by rollover and remove_segments_before.
        self._buffer_lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._segments_lock = threading.Lock()

        self._directory = directory
        self._config = config
        self._fsync = not config.unsafe_no_fsync
        self._segments = list(segments)  # log order; the last one is active
        self._next_seq = segments[-1].seq + 1
        self._fd: int | None = os.open(segments[-1].path, os.O_WRONLY | os.O_APPEND)
        self._active_size = os.fstat(self._fd).st_size
        self._roll_requested = False
        # Called with the last LSN of a segment once it is fsynced and its successor exists
        # (from the flush worker thread): the shard raises its manifest's high-water mark.
        self.on_new_segment: Callable[[int], None] | None = None
        # Called (flush thread) with (first LSN, frames) of every batch a flush takes, before
        # it is written: a replicated primary ships it (module docstring, "Replica groups").
        self.on_batch: Callable[[int, list[bytes]], None] | None = None

        self._buffer: list[bytes] = []  # encoded frames not yet written, in LSN order
        self._last_lsn = last_lsn  # highest LSN appended
        self._written_lsn = last_lsn  # highest LSN handed to os.write
        self._durable_lsn = last_lsn  # highest LSN known fsynced

        self._flush: asyncio.Future[None] | None = None  # the flush in flight
        self._flusher: FlushThread | None = None  # started by the first flush, stopped by close()
        self._failed: Unavailable | None = None
        self._closed = False

        self._fsyncs = 0
        self._fsync_seconds = 0.0
        self._last_fsync_seconds = 0.0
        self._records = 0
        self._bytes = 0
        self._batches = 0
        # no label (a WAL outside a shard: tests, tools): not exported at all
        self._fsync_histogram = WAL_FSYNC_SECONDS.labels(shard=metrics_label) if metrics_label else None
        self._batch_histogram = WAL_BATCH_RECORDS.labels(shard=metrics_label) if metrics_label else None

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        config: WalConfig | None = None,
        *,
        replay_from_lsn: int = 1,
        on_record: Callable[[int, int, Any], None] | None = None,
        metrics_label: str = "",
        require_lsn: int = 0,
    ) -> Wal:
        """Open (or create) the WAL in ``directory``, replaying it through ``on_record``.

        Runs the recovery scan (``reader.py``): ``on_record(lsn, rtype, body)``
        is called for every intact record with ``lsn >= replay_from_lsn``, in
        order; a torn tail is truncated; damage anywhere else raises
        ``DataCorrupted`` without touching the files. Then the last segment
        is opened for appending, or a first one is created whose first LSN is
        ``max(replay_from_lsn, last + 1)``. When a snapshot covers more than
        the log holds (``replay_from_lsn > last + 1``), the old segments are
        all covered by it and are deleted, so the log stays gap-free.
        ``metrics_label`` is the ``shard`` label of its metrics ("" exports none).

        ``require_lsn``: the log is known to have held every record up to this
        LSN (the shard manifest's high-water mark; ``replay_from_lsn - 1`` is
        covered by the snapshot). If it ends below that, segment files were
        lost: ``DataCorrupted`` (details ``expected_lsn``, ``found_lsn``) is
        raised before any segment is created or deleted.
        """
        if replay_from_lsn < 1:
            raise ValueError(f"replay_from_lsn must be >= 1, got {replay_from_lsn}")
        config = config or WalConfig()
        fsync = not config.unsafe_no_fsync
        directory = Path(directory)
        if require_lsn > replay_from_lsn - 1 and not directory.is_dir():
            raise _missing_records(directory, "the WAL directory is missing", require_lsn,
                                   replay_from_lsn - 1)
        directory.mkdir(parents=True, exist_ok=True)
        for path in remove_temp_segments(directory):
            log.info("removed interrupted segment creation %s", path)

        result = recover(
            directory, replay_from_lsn=replay_from_lsn, on_record=on_record, fsync=fsync
        )
        segments, last_lsn = result.segments, result.last_lsn
        reaches = max(last_lsn, replay_from_lsn - 1)
        if reaches < require_lsn:
            where = (
                f"the last segment {segments[-1].name} ends at LSN {last_lsn}"
                if segments else "it holds no WAL segment"
            )
            raise _missing_records(directory, where, require_lsn, reaches)
        next_seq = segments[-1].seq + 1 if segments else 0
        if segments and replay_from_lsn > last_lsn + 1:
            log.warning(
                "WAL in %s ends at LSN %d but the snapshot covers up to LSN %d: "
                "removing %d segments it makes obsolete",
                directory,
                last_lsn,
                replay_from_lsn - 1,
                len(segments),
            )
            for segment in segments:
                os.unlink(segment.path)
            if fsync:
                fsync_directory(directory)
            segments = []
        if not segments:
            last_lsn = max(replay_from_lsn - 1, last_lsn)
            segments = [create_segment(directory, next_seq, last_lsn + 1, fsync=fsync)]
        wal = cls(directory, config, segments, last_lsn, metrics_label=metrics_label)
        if fsync and wal._fd is not None:
            # The records just replayed may only be in the page cache (the last
            # process died before fsyncing them); new records will depend on
            # them, so make them durable before anything else is acknowledged.
            os.fsync(wal._fd)
        return wal

    # -- state -----------------------------------------------------------------

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def segments(self) -> list[Segment]:
        """The segment files of the log, oldest first; the last one is active."""
        with self._segments_lock:
            return list(self._segments)

    @property
    def stats(self) -> dict[str, float]:
        """Counters since open: fsyncs, records and bytes written, batches; fsync timing."""
        fsyncs = self._fsyncs
        return {
            "fsyncs": fsyncs,  # data fsyncs of batches (rollover fsyncs not counted)
            "records": self._records,  # records written to disk
            "bytes": self._bytes,  # frame bytes written to disk
            "batches": self._batches,  # os.write calls of batches
            "last_fsync_seconds": self._last_fsync_seconds,
            "avg_fsync_seconds": self._fsync_seconds / fsyncs if fsyncs else 0.0,
            "avg_records_per_fsync": self._records / fsyncs if fsyncs else 0.0,
        }

    # -- appending -------------------------------------------------------------

    def append(self, rtype: int, body: Any) -> int:
        """Encode a record and buffer it in memory; returns its LSN.

        Nothing is written until ``sync`` (or ``sync_now``). ``rtype`` is
        the caller's record type, 1..255.
        """
        self._check_usable()
        failpoint("wal.before_append")
        with self._buffer_lock:
            lsn = self._last_lsn + 1
            self._buffer.append(encode_record(rtype, lsn, body))
            self._last_lsn = lsn
        return lsn

    def append_frames(self, data: bytes) -> list[tuple[int, int]]:
        """Buffer frames received from a replica group's primary, unchanged; returns their
        ``(lsn, rtype)``. They must be intact and numbered ``last_lsn + 1`` on
        (``record.split_frames``, the recovery scan's checks): ``ValueError`` otherwise, and
        nothing is buffered. ``sync`` makes them durable."""
        self._check_usable()
        with self._buffer_lock:
            first = self._last_lsn + 1
            frames = split_frames(data, first, decode_bodies=False)
            if not frames:
                return []
            view = memoryview(data)
            self._buffer.extend(bytes(view[f.start:f.end]) for f in frames)
            self._last_lsn = frames[-1].lsn
        return [(f.lsn, f.rtype) for f in frames]

    def replay(self, from_lsn: int, on_record: Callable[[int, int, Any], None] | None) -> int:
        """Hand every record from ``from_lsn`` to the last written to ``on_record`` again (a
        replica group's new primary recovers its shard from its open log); ``DataCorrupted``
        on damage. Returns how many were replayed."""
        result = scan_log(self.segments, replay_from_lsn=from_lsn, on_record=on_record)
        if result.damage is not None and not (result.damage.torn and result.last_lsn >= self._written_lsn):
            raise result.damage.to_error()
        return result.replayed

    @property
    def first_lsn(self) -> int:
        """The oldest LSN the log holds, or would hold next (older ones only in a snapshot)."""
        with self._segments_lock:
            return self._segments[0].first_lsn

    def read_frames(self, from_lsn: int, max_bytes: int = 1 << 20, upto_lsn: int | None = None,
                    cursor: FrameCursor | None = None) -> FrameRead:
        """The frames with LSN ``from_lsn`` .. ``upto_lsn`` (default: the last written) as
        they are on disk, at most about ``max_bytes`` (at least one frame), with the last LSN
        included (``from_lsn - 1``: none) and a cursor to the frame after it. Passing the
        previous read's cursor continues there without scanning the segment again (a
        lagging member is read through once, not once per batch). ``ValueError`` if
        ``from_lsn`` is below ``first_lsn``. Blocking file reads: call it off the event loop."""
        upto = self._written_lsn if upto_lsn is None else min(upto_lsn, self._written_lsn)
        segments = self.segments
        if from_lsn < segments[0].first_lsn:
            raise ValueError(f"LSN {from_lsn} is below the log's first LSN {segments[0].first_lsn}")
        if from_lsn > upto:
            return FrameRead(b"", from_lsn - 1, cursor)
        index = 0
        while index + 1 < len(segments) and segments[index + 1].first_lsn <= from_lsn:
            index += 1
        offset = None
        if cursor is not None and cursor.lsn == from_lsn and cursor.seq == segments[index].seq:
            offset = cursor.offset
        parts: list[bytes] = []
        size = 0
        last = from_lsn - 1
        while index < len(segments):
            segment = segments[index]
            with open(segment.path, "rb") as f:
                if offset is None:
                    offset = _offset_of(f.read(), last + 1)
                f.seek(offset)
                want = max(max_bytes - size, 1 << 16)
                chunk = f.read(want)
                if len(chunk) >= HEADER_SIZE:  # a first frame larger than the read: read all of it
                    whole = HEADER_SIZE + int.from_bytes(chunk[:4], "little")
                    if whole > len(chunk):
                        chunk += f.read(whole - len(chunk))
            taken = 0
            full = False
            for lsn, _rtype, _body, end in iter_records(chunk, 0, decode_from_lsn=1 << 64):
                if lsn != last + 1 or lsn > upto or (size and size + end - taken > max_bytes):
                    full = True
                    break
                size += end - taken
                taken = end
                last = lsn
            parts.append(chunk[:taken])
            offset += taken
            if full or last >= upto or len(chunk) >= want or index + 1 == len(segments):
                break
            index += 1
            offset = SEGMENT_HEADER_SIZE
        assert offset is not None  # the loop ran: from_lsn lies in segments[index]
        return FrameRead(b"".join(parts), last, FrameCursor(segments[index].seq, offset, last + 1))

    async def truncate_after(self, lsn: int) -> int:
        """Remove every record after ``lsn`` (a divergent tail a replica group never
        committed), durably; returns how many were removed. ``lsn`` may not be below
        ``first_lsn - 1``. Waiters for removed records are failed with ``Unavailable``."""
        self._check_usable()
        if lsn >= self._last_lsn:
            return 0
        if lsn < self.first_lsn - 1:
            raise ValueError(f"cannot truncate after LSN {lsn}: the log starts at {self.first_lsn}")
        flush = self._flush
        if flush is not None and not flush.done():
            await asyncio.wait({flush})
        removed = self._last_lsn - lsn
        await self._flush_thread().submit(lambda: self._truncate(lsn))
        waiters = self._durable_waiters
        if waiters:
            keep = collections.deque(w for w in waiters if w[0] <= lsn)
            gone = [w for w in waiters if w[0] > lsn]
            self._durable_waiters = keep
            for _, callback in gone:
                try:
                    callback(Unavailable(f"record above LSN {lsn} was truncated", path=str(self._directory)))
                except Exception:
                    log.exception("a WAL durability callback failed")
        return removed

    def _truncate(self, lsn: int) -> None:
        with self._io_lock:
            if self._failed is not None:
                raise self._failed
            with self._buffer_lock:
                self._buffer = [f for f in self._buffer if frame_lsn(f) <= lsn]
                if lsn >= self._written_lsn:
                    self._last_lsn = lsn
                    return
                self._buffer = []  # every buffered frame is above the written ones
                self._last_lsn = lsn
            try:
                self._truncate_files(lsn)
            except Exception as e:
                error = Unavailable(f"wal truncation failed: {e!r}", path=str(self._directory))
                self._failed = error
                raise error from e

    def _truncate_files(self, lsn: int) -> None:
        with self._segments_lock:
            index = 0
            while index + 1 < len(self._segments) and self._segments[index + 1].first_lsn <= lsn + 1:
                index += 1
            doomed = self._segments[index + 1:]
            keep = self._segments[index]
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for segment in reversed(doomed):  # last first: a crash leaves a gap-free prefix
            os.unlink(segment.path)
        data = keep.path.read_bytes()
        cut = SEGMENT_HEADER_SIZE
        for record_lsn, _rtype, _body, end in iter_records(data, SEGMENT_HEADER_SIZE, decode_from_lsn=1 << 64):
            if record_lsn > lsn:
                break
            cut = end
        fd = os.open(keep.path, os.O_WRONLY | os.O_APPEND)
        os.ftruncate(fd, cut)
        if self._fsync:
            os.fsync(fd)
            fsync_directory(self._directory)
        self._fd = fd
        with self._segments_lock:
            self._segments = self._segments[: index + 1]
        self._next_seq = keep.seq + 1
        self._active_size = cut
        self._written_lsn = lsn
        self._durable_lsn = lsn  # what is left is fsynced (just now, if it was not yet)

    def sync_now(self) -> None:
        """Write and fsync everything buffered, on the calling thread.

        Waits for a flush in flight first, so records still reach the file in
        LSN order.
        """
        self._check_usable()
        self._drain()

    def roll(self) -> None:
        """Start a new segment at the next batch (a no-op if the active one is empty)."""
        self._roll_requested = True

    def remove_segments_before(self, lsn: int) -> int:
        """Delete segment files whose records all have LSNs below ``lsn``.

        Call after a snapshot covering ``lsn - 1`` is durable. Only a prefix
        of the log is removed and never the active segment; the directory is
        fsynced. Returns how many files were removed.
        """
        if self._closed:
            raise Unavailable("wal is closed", path=str(self._directory))
        removed = 0
        with self._segments_lock:
            # Segment i holds LSNs first_lsn(i) .. first_lsn(i+1) - 1.
            while len(self._segments) > 1 and self._segments[1].first_lsn <= lsn:
                os.unlink(self._segments[0].path)
                del self._segments[0]
                removed += 1
        if removed and self._fsync:
            fsync_directory(self._directory)
        return removed

    # -- lifecycle -------------------------------------------------------------

    async def close(self) -> None:
        """Flush, fsync and close. Idempotent.

        Raises ``Unavailable`` if the final flush fails; a WAL that had
        already failed just releases its file.
        """
        if self._closed:
            return
        self._closed = True  # refuse new appends and syncs from here on
        try:
            flush = self._flush
            if flush is not None and not flush.done():
                await asyncio.wait({flush})
            if self._failed is None and self._buffer:
                await self._flush_thread().submit(self._drain)
        finally:
            if self._flusher is not None:
                self._flusher.stop()
                self._flusher = None
            self._release()

    async def __aenter__(self) -> Wal:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return (
            f"<Wal {str(self._directory)!r} last_lsn={self._last_lsn} "
            f"durable_lsn={self._durable_lsn}{' failed' if self._failed else ''}"
            f"{' closed' if self._closed else ''}>"
        )

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            warnings.warn(f"unclosed Wal in {self._directory}", ResourceWarning, stacklevel=1)
            if self._flusher is not None:
                self._flusher.stop(wait=False)
            self._release()

    # -- internals -------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._closed:
            raise Unavailable("wal is closed", path=str(self._directory))

    def _flush_thread(self) -> FlushThread:
        if self._flusher is None:
            self._flusher = FlushThread(f"wal-flush {self._directory.parent.name}")
        return self._flusher

    def _start_flush(self) -> asyncio.Future[None]:
        flush = self._flush_thread().submit(self._drain)
        self._flush = flush
        flush.add_done_callback(self._flush_done)
        return flush

    def _flush_done(self, flush: asyncio.Future[None]) -> None:
        if self._flush is flush:
            self._flush = None
        if not flush.cancelled():
            flush.exception()  # waiters re-raise it; don't warn "never retrieved"

    def _drain(self) -> None:
        """Write and fsync the whole buffer as one batch (runs in a worker thread)."""
        with self._io_lock:
            if self._failed is not None:
                raise self._failed
            with self._buffer_lock:
                frames, self._buffer = self._buffer, []
                last_lsn = self._last_lsn
            if not frames:
                return
            if self.on_batch is not None:
                self.on_batch(last_lsn - len(frames) + 1, frames)
            try:
                self._write_batch(frames, last_lsn)
            except Exception as e:
                error = Unavailable(f"wal write failed: {e!r}", path=str(self._directory))
                self._failed = error
                raise error from e

    def _write_batch(self, frames: list[bytes], last_lsn: int) -> None:
        if self._fd is None:
            raise OSError("wal file is closed")
        if self._roll_requested or self._active_size > self._config.segment_bytes:
            if self._active_size > SEGMENT_HEADER_SIZE:  # never leave an empty segment behind
                self._roll_segment(self._written_lsn + 1)
            self._roll_requested = False
        data = b"".join(frames)
        write_all(self._fd, data)
        self._active_size += len(data)
        self._written_lsn = last_lsn
        failpoint("wal.after_append")
        failpoint("wal.before_fsync")
        if self._fsync:
            started = time.perf_counter()
            _fdatasync(self._fd)
            elapsed = time.perf_counter() - started
            self._fsyncs += 1
            self._fsync_seconds += elapsed
            self._last_fsync_seconds = elapsed
            if self._fsync_histogram is not None:
                self._fsync_histogram.observe(elapsed)
        failpoint("wal.after_fsync")
        self._durable_lsn = last_lsn
        self._records += len(frames)
        self._bytes += len(data)
        self._batches += 1
        if self._batch_histogram is not None:
            self._batch_histogram.observe(len(frames))

    def _roll_segment(self, first_lsn: int) -> None:
        """Close the active segment (fsynced) and start a new one at ``first_lsn``."""
        assert self._fd is not None
        if self._fsync:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        segment = create_segment(self._directory, self._next_seq, first_lsn, fsync=self._fsync)
        self._fd = os.open(segment.path, os.O_WRONLY | os.O_APPEND)
        with self._segments_lock:
            self._segments.append(segment)
        self._next_seq += 1
        self._active_size = SEGMENT_HEADER_SIZE
        if self.on_new_segment is not None:
            self.on_new_segment(first_lsn - 1)

    def _release(self) -> None:
        """Close the active file; waits for a flush running in a worker thread."""
        with self._io_lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
