"""Offline repair of one shard directory: ``oribus repair``.

Cuts the shard's WAL back to its last provably intact record
(``wal/repair.py``), then brings the shard's MANIFEST (``manifest.py``) in
line: its high-water mark says how far the log must reach, and after a
repair the log legitimately ends earlier. Lowering the mark is what makes
the shard open again; it is done only here, where the records given up are
counted and named, so dropping records is always an explicit, reported act.

The report names the commit ids the dropped records carried (every
transaction record's body holds its commit id under ``"i"``, see
``txn.py``), so an operator can tell which acknowledged commits are gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from oribus.shards.config import SNAPSHOT_DIR, WAL_DIR
from oribus.shards.manifest import read_manifest, write_manifest
from oribus.shards.wal import latest_snapshot_lsn
from oribus.shards.wal.repair import WalRepair, repair_wal


@dataclass
class ShardRepair:
    """What ``repair_shard`` found and did in one shard directory."""

    shard_dir: Path
    wal: WalRepair
    # records the MANIFEST said were durable that no file holds any more (segments deleted)
    missing: int = 0
    actions: list[str] = field(default_factory=list)  # the WAL's, then the manifest's

    @property
    def intact(self) -> bool:
        return not self.actions

    @property
    def dropped(self) -> int:
        """Records given up: cut from the log, or already missing from it."""
        return self.wal.dropped + self.missing

    @property
    def dropped_commit_ids(self) -> list[str]:
        """Commit ids of the dropped records that could still be read, in log order, once each."""
        ids: dict[str, None] = {}
        for record in self.wal.found:
            if isinstance(record.body, dict) and isinstance(record.body.get("i"), str):
                ids[record.body["i"]] = None
        return list(ids)

    def summary(self) -> str:
        if self.intact:
            return "intact"
        ids = self.dropped_commit_ids
        unreadable = len(self.wal.unreadable) + self.missing
        return (
            f"kept {self.wal.kept} records (log ends at LSN {self.wal.last_lsn}), dropped {self.dropped}; "
            f"commit ids of the dropped records: {', '.join(ids) if ids else 'none readable'}"
            + (f"; {unreadable} dropped records could not be read" if unreadable else "")
        )

    def to_dict(self) -> dict:
        return {
            "shard_dir": str(self.shard_dir),
            "intact": self.intact,
            "kept": self.wal.kept,
            "last_lsn": self.wal.last_lsn,
            "dropped": self.dropped,
            "dropped_commit_ids": self.dropped_commit_ids,
            "unreadable_lsns": self.wal.unreadable,
            "missing": self.missing,
            "actions": self.actions,
        }


def repair_shard(shard_dir: str | Path) -> ShardRepair:
    """Repair the WAL below ``shard_dir`` and lower its MANIFEST's mark to what is left."""
    shard_dir = Path(shard_dir)
    wal = repair_wal(shard_dir / WAL_DIR)
    report = ShardRepair(shard_dir, wal, actions=list(wal.actions))
    manifest = read_manifest(shard_dir)
    if manifest is None:
        return report
    snapshot = latest_snapshot_lsn(shard_dir / SNAPSHOT_DIR) or 0
    reaches = max(wal.last_lsn, snapshot)
    if manifest.durable_lsn <= reaches:
        return report
    # Records cut by the WAL repair are counted there; the rest were already gone.
    report.missing = max(0, manifest.durable_lsn - (wal.last_lsn + wal.dropped))
    write_manifest(shard_dir, manifest.with_durable_lsn(reaches))
    report.actions.append(
        f"lowered the MANIFEST's durable mark from LSN {manifest.durable_lsn} to {reaches}: "
        f"the log and snapshot now end there"
        + (f" ({report.missing} records up to LSN {manifest.durable_lsn} were already missing)"
           if report.missing else "")
    )
    return report
