"""One shard's write-ahead log and snapshots.

A file per job:

    record.py     the record frame codec (byte layout in its docstring)
    segment.py    segment files: naming, header, listing, atomic creation
    reader.py     the recovery scan and its three outcomes
    writer.py     ``Wal``: appends and asyncio group commit
    snapshot.py   atomic snapshot files
    repair.py     offline repair of a damaged log

Record types are the caller's: the WAL stores the type as an opaque byte
(1..255) and hands it back on replay.
"""

from oribus.shards.wal.reader import Damage, ScanResult, recover, scan_log
from oribus.shards.wal.record import (
    HEADER_SIZE,
    MAX_BODY_BYTES,
    Decoded,
    FrameStatus,
    decode_record,
    encode_record,
    iter_records,
)
from oribus.shards.wal.repair import DroppedRecord, WalRepair, repair_wal
from oribus.shards.wal.segment import (
    SEGMENT_HEADER_SIZE,
    SEGMENT_MAGIC,
    Segment,
    list_segments,
    parse_segment_name,
    segment_name,
)
from oribus.shards.wal.snapshot import (
    latest_snapshot_lsn,
    load_latest_snapshot,
    snapshot_name,
    write_snapshot,
)
from oribus.shards.wal.writer import Wal, WalConfig

__all__ = [
    "HEADER_SIZE",
    "MAX_BODY_BYTES",
    "SEGMENT_HEADER_SIZE",
    "SEGMENT_MAGIC",
    "Damage",
    "Decoded",
    "DroppedRecord",
    "FrameStatus",
    "ScanResult",
    "Segment",
    "Wal",
    "WalConfig",
    "WalRepair",
    "decode_record",
    "encode_record",
    "iter_records",
    "latest_snapshot_lsn",
    "list_segments",
    "load_latest_snapshot",
    "parse_segment_name",
    "recover",
    "repair_wal",
    "scan_log",
    "segment_name",
    "snapshot_name",
    "write_snapshot",
]
