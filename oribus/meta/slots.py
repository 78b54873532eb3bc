"""Keys map to a fixed number of slots by hash; slots map to shards (metadata).

slot(key) = CRC-32C(UTF-8 key) mod SLOTS. The slot count never changes for a
cluster; moving a slot to another shard is a metadata change only.
"""

from __future__ import annotations

import crc32c

SLOTS = 4096


def slot_of(key: str, slots: int = SLOTS) -> int:
    """The key's slot: CRC-32C of its UTF-8 bytes, mod the slot count."""
    return crc32c.crc32c(key.encode("utf-8")) % slots


class StaticSlotMap:
    """The embedded default: N shards, each owning one contiguous range of slots."""

    def __init__(self, shard_count: int, slots: int = SLOTS) -> None:
        if not 1 <= shard_count <= slots:
            raise ValueError(f"shard_count must be 1..{slots}")
        self.shard_count = shard_count
        self.slots = slots
        self._owner = [s * shard_count // slots for s in range(slots)]

    @property
    def shard_ids(self) -> list[int]:
        return list(range(self.shard_count))

    def shard_for(self, key: str) -> int:
        return self._owner[slot_of(key, self.slots)]
