"""The shard manifest: who a shard directory belongs to and how far its log must reach.

A WAL directory that is missing, or holds fewer records than were once
acknowledged, looks exactly like a new shard to the recovery scan. The
manifest is what tells "empty" apart from "lost": a small JSON file in the
shard's own directory, ``<shard dir>/MANIFEST``::

    {"format": 1, "shard": 0, "durable_lsn": 200}

    format       1; any other value is refused (a newer oribus wrote it)
    shard        the shard id this directory holds data for
    durable_lsn  a high-water mark: every record up to this LSN was fsynced
                 (in the WAL or a snapshot), so the log must reach at least
                 this far when the shard opens

A member of a replica group (``oribus.shards.replica``) keeps three more fields there,
fsynced before it acts on them (``specs/replication.md`` §2, §5, §7)::

    member       the member id r of (shard, r) this directory belongs to
    voter        false: a learner (its data was lost; it counts in no majority yet)
    term         the highest term it promised: it refuses appends of lower terms

An unreplicated shard writes none of them.

``durable_lsn`` is a lower bound, not the log's end: it is written when the
shard is created or recovered, after each snapshot, when the WAL starts a
new segment and at a clean close, never per commit. With ``unsafe_no_fsync``
nothing is known durable, so the mark is not raised. It only goes up, except
when ``oribus repair`` drops records (an explicit, reported act) or an
operator opens a shard whose data is lost with ``unsafe_allow_empty``.

Written atomically (``MANIFEST.tmp``, fsync, rename, fsync the directory),
so a crash leaves the old or the new manifest, never half of one. A
manifest that does not parse raises ``DataCorrupted`` naming the file: a
damaged manifest must not pass for "no manifest", which means a new shard.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path

from oribus.errors import DataCorrupted
from oribus.failpoints import failpoint
from oribus.shards.wal.segment import fsync_directory, write_all

MANIFEST_FILE = "MANIFEST"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ShardManifest:
    shard_id: int  # the shard this directory holds data for
    durable_lsn: int = 0  # the log (with the snapshot) reaches at least this LSN
    # The restart grace the read leases of this shard's earlier lives may need (PROTOCOL.md
    # §5.8): the largest read_lease_seconds + 2 * clock_skew_seconds a life ran with that
    # may still have a lease out. 0 in a manifest written before it was kept.
    grace_seconds: float = 0.0
    # A replica group's member (None: an unreplicated shard): its id, voter flag, promised term.
    member: int | None = None
    voter: bool = True
    promised_term: int = 0

    def with_member(self, member: int, voter: bool, promised_term: int) -> ShardManifest:
        return replace(self, member=member, voter=voter, promised_term=promised_term)

    def with_durable_lsn(self, lsn: int) -> ShardManifest:
        return replace(self, durable_lsn=lsn)

    def with_grace(self, seconds: float) -> ShardManifest:
        return replace(self, grace_seconds=seconds)

    def to_json(self) -> dict:
        out: dict = {"format": MANIFEST_FORMAT, "shard": self.shard_id, "durable_lsn": self.durable_lsn,
                     "grace": self.grace_seconds}
        if self.member is not None:
            out.update(member=self.member, voter=self.voter, term=self.promised_term)
        return out


def manifest_path(shard_dir: str | os.PathLike) -> Path:
    return Path(shard_dir) / MANIFEST_FILE


def read_manifest(shard_dir: str | os.PathLike) -> ShardManifest | None:
    """The manifest of ``shard_dir`` (None: there is none); ``DataCorrupted`` if it is damaged."""
    path = manifest_path(shard_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        have = json.loads(raw)
        if not isinstance(have, dict) or have.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"unknown format in {have!r}")
        shard, lsn, grace = have["shard"], have["durable_lsn"], have.get("grace", 0.0)
        if type(shard) is not int or type(lsn) is not int or shard < 0 or lsn < 0:
            raise ValueError(f"bad shard or durable_lsn in {have!r}")
        if type(grace) not in (int, float) or not 0 <= grace < float("inf"):
            raise ValueError(f"bad grace in {have!r}")
        member, voter, term = have.get("member"), have.get("voter", True), have.get("term", 0)
        if member is not None and (type(member) is not int or member < 0 or type(voter) is not bool
                                   or type(term) is not int or term < 0):
            raise ValueError(f"bad member, voter or term in {have!r}")
    except (ValueError, KeyError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise DataCorrupted(f"shard manifest {path} is unreadable: {e}", path=str(path)) from e
    return ShardManifest(shard, lsn, float(grace), member, voter if member is not None else True,
                         term if member is not None else 0)


def write_manifest(shard_dir: str | os.PathLike, manifest: ShardManifest, *, fsync: bool = True) -> None:
    """Replace the manifest of ``shard_dir`` atomically (the directory is created if needed)."""
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    path = manifest_path(shard_dir)
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, json.dumps(manifest.to_json()).encode())
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    failpoint("manifest.before_rename")
    os.replace(temp, path)
    if fsync:
        fsync_directory(shard_dir)
