"""The catch-up frame (oribus/shards/replica/catchup.py): a primary reads it out piece by piece,
a learner routes the pieces — the snapshot file to memory, the history file to disk."""

from __future__ import annotations

import tempfile

import pytest

from oribus.errors import DataCorrupted
from oribus.shards.replica.catchup import CatchupReceiver, CatchupSource, pack_catchup

SNAPSHOT = b"ORISNAP1" + bytes(range(256)) * 3
HISTORY = bytes(reversed(range(256))) * 40


def source() -> CatchupSource:
    f = tempfile.TemporaryFile()
    f.write(HISTORY)
    f.flush()
    return CatchupSource(SNAPSHOT, f)


@pytest.mark.parametrize("step", [1, 5, 16, 17, 800, 1 << 20])
def test_the_source_reads_out_the_frame_and_the_receiver_splits_it(tmp_path, step):
    src = source()
    frame = pack_catchup(SNAPSHOT, HISTORY)
    assert len(src) == len(frame)
    receiver = CatchupReceiver(tmp_path / "history" / "data.mdb.incoming")
    for offset in range(0, len(src), step):
        piece = src[offset:offset + step]
        assert piece == frame[offset:offset + step]
        receiver.feed(piece)
        assert receiver.length == min(offset + step, len(frame))
    src.close()
    assert receiver.carries_history
    snapshot, spilled = receiver.finish()
    assert snapshot == SNAPSHOT
    assert spilled == tmp_path / "history" / "data.mdb.incoming"
    assert spilled.read_bytes() == HISTORY


def test_a_plain_snapshot_stays_in_memory(tmp_path):
    receiver = CatchupReceiver(tmp_path / "spill")
    for i in range(0, len(SNAPSHOT), 100):
        receiver.feed(SNAPSHOT[i:i + 100])
    assert not receiver.carries_history
    assert receiver.finish() == (SNAPSHOT, None)
    assert not (tmp_path / "spill").exists()


@pytest.mark.parametrize("cut", [4, 12, 20, len(SNAPSHOT)])
def test_a_frame_cut_short_is_refused(tmp_path, cut):
    receiver = CatchupReceiver(tmp_path / "spill")
    receiver.feed(pack_catchup(SNAPSHOT, HISTORY)[:cut])
    with pytest.raises(DataCorrupted):
        receiver.finish()
    receiver.discard()
    assert not (tmp_path / "spill").exists()


@pytest.mark.parametrize("where", ["flipped", "cut", "longer"])
def test_a_history_file_damaged_in_transit_is_refused(tmp_path, where):
    """LMDB keeps no checksum in its file: the frame's length and CRC-32C are what catch it."""
    frame = bytearray(pack_catchup(SNAPSHOT, HISTORY))
    if where == "flipped":
        frame[-100] ^= 0x01
    elif where == "cut":
        del frame[-1]
    else:
        frame += b"\x00"
    receiver = CatchupReceiver(tmp_path / "spill")
    receiver.feed(bytes(frame))
    with pytest.raises(DataCorrupted, match="history file arrived as"):
        receiver.finish()
    receiver.discard()
    assert not (tmp_path / "spill").exists()
