"""The checker of the crash tests: reopen a data directory and hold it to its journal.

Usage (as a child process of the crash sweep)::

    python tests/crash/recovery_check.py DATA_DIR JOURNAL SHARDS

prints one JSON object, ``{"violations": [...], "facts": {...}}``, and exits 0
when it could run the checks (violations or not). It is also imported by the
tests, which call ``check_recovery`` in their own event loop.

What is checked, against the journal written by ``workload.py``:

(a) durability: every acknowledged commit (``ok``) is present — each key it
    wrote has a history entry at the acknowledged version carrying its
    commit id, with the value it wrote (a value embedding the commit id, a
    delete, or the value of the rollback's target version);
(b) atomicity: every invoked commit is on all of its keys or on none of
    them; a commit refused for certain (``fail`` with ``definite``) is on
    none; no commit is applied twice to a key, and no history entry carries
    a commit id that was never invoked;
(c) per key, the kept history versions are consecutive with no gaps (and
    start at version 1 while the history limit is not reached), the oldest
    version the shard's store says it keeps is the oldest ``history`` reads
    (no kept version is unreadable behind a gap), and the current value is the
    newest history entry;
(d) recovery leaves no transaction prepared, reopening a second time gives
    exactly the same state (recovery is deterministic), and afterwards a
    new commit spanning every shard works and is still there after a third
    reopen.

``check_expired_session`` is the extra check that a session from before the
crash, presenting its old tokens, gets SessionExpired.

With an age limit (``HISTORY_MAX_AGE_ENV``: the workload's shards ran the age
rule's compaction, specs/engine.md "Retention") the checker reopens without
one, so that it sees what recovery kept and nothing drops meanwhile, and three
checks allow for what the age rule may have dropped before the crash: a key's
kept run may start above version 1 ((c)); an acknowledged version below the
oldest one kept is not lost if its commit was invoked at least the max age
before the check began (the workload died before that: a younger one cannot
have been dropped — a loose bound, which catches only a compaction that drops
versions far younger than the max age) ((a)); and a
commit missing from a key is not partial if that key's kept run starts above
version 1, so the version it wrote there may have been one of the dropped ((b)).
Every version from the oldest kept to the current one must still be there, and
every acknowledged version at or above the oldest kept.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from workload import ENGINE_OPTIONS, KEYS  # noqa: E402

import oribus  # noqa: E402
from oribus.contract import CommitRequest  # noqa: E402
from oribus.hosts.embedded import EmbeddedEngine, EngineConfig  # noqa: E402
from oribus.meta.slots import StaticSlotMap  # noqa: E402
from oribus.types import SessionRef, encode_value  # noqa: E402

HISTORY_LIMIT = EngineConfig(data_dir=Path(".")).history_limit
# The workload's age limit (seconds), or None: its shards dropped versions older than this.
MAX_AGE: float | None = ENGINE_OPTIONS.get("history_max_age")

# One history entry as the checker compares it: (version, value, deleted, agent,
# session id, commit id, commit time). All of it must survive a reopen unchanged;
# even the time, which is recorded in the WAL record, not read from the clock.
EntryTuple = tuple[int, Any, bool, str, str, str, float]
State = dict[str, list[EntryTuple]]


@dataclass
class Journal:
    """The events of one workload run, by commit id."""

    invoked: dict[str, dict] = field(default_factory=dict)  # id -> invoke event
    outcome: dict[str, dict] = field(default_factory=dict)  # id -> ok / fail event
    done: bool = False  # the workload ended and closed the engine

    @property
    def acknowledged(self) -> dict[str, dict]:
        return {cid: ev for cid, ev in self.outcome.items() if ev["ev"] == "ok"}


def load_journal(path: str | Path) -> Journal:
    """Parse a journal; a line cut short by the kill (no newline) would be ignored."""
    journal = Journal()
    raw = Path(path).read_bytes().decode()
    lines = raw.split("\n")
    if lines and lines[-1]:
        lines = lines[:-1]  # incomplete last line (one os.write per line makes this rare)
    for line in filter(None, lines):
        ev = json.loads(line)
        kind = ev["ev"]
        if kind == "invoke":
            if ev["id"] in journal.invoked:
                raise ValueError(f"commit id {ev['id']} invoked twice in {path}")
            journal.invoked[ev["id"]] = ev
        elif kind in ("ok", "fail"):
            journal.outcome[ev["id"]] = ev
        elif kind == "done":
            journal.done = True
    return journal


def engine_config(data_dir: str | Path, shards: int) -> EngineConfig:
    """The configuration the workload used (so recovery runs exactly as it would for it).

    Only the read wait is shorter: a key that recovery left locked is a
    violation to report, not something to wait five seconds for, key by key.
    """
    options = {k: v for k, v in ENGINE_OPTIONS.items() if k not in ("history_max_age", "shard_overrides")}
    overrides = {**ENGINE_OPTIONS.get("shard_overrides", {}), "read_wait_seconds": 0.2}
    return EngineConfig(data_dir=Path(data_dir), shards=shards, shard_overrides=overrides, **options)


async def dump_state(engine: EmbeddedEngine, keys: list[str]) -> tuple[State, dict[str, Any]]:
    """Every key's full history (oldest first) and its current item, through the public API.

    A key that cannot be read (e.g. still locked by a transaction recovery
    left unresolved) is reported as current ``("unreadable", error code)``.
    """
    reader = oribus.AsyncSession(engine.bus, "crash-checker")
    state: State = {}
    current: dict[str, Any] = {}
    for key in keys:
        history = await reader.history(key)
        state[key] = [
            (v.version, v.value, v.deleted, v.agent, v.session, v.commit_id, v.committed_at)
            for v in reversed(history)
        ]
        try:
            item = await reader.get(key)
        except oribus.OribusError as e:
            current[key] = ("unreadable", e.code)
        else:
            current[key] = (item.version, item.value)
    return state, current


def check_journal(journal: Journal, state: State, current: dict[str, Any],
                  died_by: float | None = None) -> list[str]:
    """Checks (a), (b) and (c) of the module docstring. Returns the violations found.
    ``died_by``: the workload had died by then (wall clock): no compaction of it ran later."""
    bad: list[str] = []
    aged = MAX_AGE is not None
    oldest = {key: entries[0][0] for key, entries in state.items() if entries}
    # where each commit id landed: id -> {key: [versions]}
    landed: dict[str, dict[str, list[int]]] = {}
    by_version: dict[str, dict[int, EntryTuple]] = {}
    for key, entries in state.items():
        by_version[key] = {e[0]: e for e in entries}
        for e in entries:
            landed.setdefault(e[5], {}).setdefault(key, []).append(e[0])

    # (c) consecutive versions, current value is the newest entry
    for key, entries in state.items():
        versions = [e[0] for e in entries]
        if versions and versions != list(range(versions[0], versions[0] + len(versions))):
            bad.append(f"(c) {key}: history versions are not consecutive: {versions}")
        if versions and len(versions) < HISTORY_LIMIT and versions[0] != 1 and not aged:
            bad.append(f"(c) {key}: history starts at version {versions[0]}, not 1: {versions}")
        cur_version, cur_value = current[key]
        if cur_version == "unreadable":
            bad.append(f"(c) {key} cannot be read after recovery: {cur_value}")
            continue
        if not entries:
            if (cur_version, cur_value) != (0, None):
                bad.append(f"(c) {key}: no history but reads as version {cur_version} = {cur_value!r}")
            continue
        newest = entries[-1]
        want_value = None if newest[2] else newest[1]
        if (cur_version, cur_value) != (newest[0], want_value):
            bad.append(
                f"(c) {key}: current is version {cur_version} = {cur_value!r}, newest history "
                f"entry is version {newest[0]} = {want_value!r}"
            )

    # (b) no phantom commits, none applied twice, all keys or none
    for cid, where in landed.items():
        if cid not in journal.invoked:
            bad.append(f"(b) history entries carry commit id {cid!r}, which was never invoked: {where}")
            continue
        for key, versions in where.items():
            if len(versions) > 1:
                bad.append(f"(b) commit {cid} applied {len(versions)} times to {key}: versions {versions}")
    for cid, inv in journal.invoked.items():
        keys = set(inv["keys"])
        on = set(landed.get(cid, {}))
        if on - keys:
            bad.append(f"(b) commit {cid} wrote keys it never asked for: {sorted(on - keys)}")
        # the age rule may have dropped its version on keys whose kept run starts above 1
        maybe_dropped = {k for k in keys - on if oldest.get(k, 1) > 1} if aged else set()
        if on and on | maybe_dropped != keys:
            bad.append(
                f"(b) partial commit {cid} ({inv['kind']}): present on {sorted(on)}, "
                f"missing on {sorted(keys - on)}"
            )
        out = journal.outcome.get(cid)
        if out is not None and out["ev"] == "fail" and out["definite"] and on:
            bad.append(f"(b) commit {cid} was refused ({out['code']}) but is present on {sorted(on)}")

    # (a) every acknowledged commit is present with what it wrote
    for cid, ok in journal.acknowledged.items():
        inv = journal.invoked[cid]
        if set(ok["versions"]) != set(inv["keys"]):
            bad.append(f"(a) commit {cid} acknowledged versions for {sorted(ok['versions'])}, "
                       f"invoked for {inv['keys']}")
        for key, version in ok["versions"].items():
            entry = by_version.get(key, {}).get(version)
            if entry is None and aged and version < oldest.get(key, 0):
                assert MAX_AGE is not None and died_by is not None
                if inv["t"] <= died_by - MAX_AGE:
                    continue  # old enough for the age rule to have dropped it
                bad.append(f"(a) acknowledged commit {cid} ({inv['kind']}) on {key} v{version} is gone "
                           f"below the oldest version kept ({oldest[key]}), but it was invoked "
                           f"{died_by - inv['t']:.3f}s before the workload's end: younger than the max "
                           f"age {MAX_AGE}s")
                continue
            if entry is None or entry[5] != cid:
                found = "nothing" if entry is None else f"commit {entry[5]}"
                bad.append(
                    f"(a) acknowledged commit {cid} ({inv['kind']}) is lost: {key} holds {found} "
                    f"at version {version}"
                )
                continue
            problem = _wrong_value(inv, key, entry, by_version.get(key, {}))
            if problem:
                bad.append(f"(a) commit {cid} ({inv['kind']}) on {key} v{version}: {problem}")
    return bad


def _wrong_value(inv: dict, key: str, entry: EntryTuple, versions: dict[int, EntryTuple]) -> str | None:
    """Why ``entry`` does not hold what the commit ``inv`` wrote to ``key`` (None if it does)."""
    _, value, deleted, *_ = entry
    kind = inv["kind"]
    if kind == "delete":
        return None if deleted and value is None else f"expected a delete, found {value!r}"
    if kind == "rollback":
        target = inv["rollback"][key]
        if target == 0:
            return None if deleted else f"rollback to version 0 should delete, found {value!r}"
        old = versions.get(target)
        if old is None:
            return None  # the target is no longer in the kept history: nothing to compare
        if (old[1], old[2]) != (value, deleted):
            return f"rollback to v{target} holds {value!r}/deleted={deleted}, v{target} was {old[1]!r}/{old[2]}"
        return None
    if deleted or not isinstance(value, dict) or value.get("c") != inv["id"]:
        return f"value {value!r} does not embed the commit id"
    return None


async def _prepared_count(engine: EmbeddedEngine) -> int:
    stats = await engine.bus.stats()
    return sum(s["prepared"] for s in stats["shards"])


async def _stored_keys(engine: EmbeddedEngine) -> int:
    stats = await engine.bus.stats()
    return sum(s["keys"] for s in stats["shards"])


async def check_recovery(data_dir: str | Path, journal_path: str | Path, shards: int) -> tuple[list[str], dict]:
    """Reopen ``data_dir`` three times and run every check. Returns (violations, facts)."""
    journal = load_journal(journal_path)
    config = engine_config(data_dir, shards)
    bad: list[str] = []
    facts: dict[str, Any] = {
        "invoked": len(journal.invoked),
        "acknowledged": len(journal.acknowledged),
        "done": journal.done,
    }

    died_by = time.time()
    engine = await EmbeddedEngine.open(config)
    try:
        if (n := await _prepared_count(engine)) != 0:
            bad.append(f"(d) {n} transactions are still prepared after recovery")
        first, current = await dump_state(engine, KEYS)
        bad += check_journal(journal, first, current, died_by)
        bad += _check_kept_readable(engine, first)
        live = sum(1 for entries in first.values() if entries)
        if (n := await _stored_keys(engine)) != live:
            bad.append(f"(b) the shards hold {n} keys, only {live} of the workload's keys have history")
    finally:
        await engine.close()

    engine = await EmbeddedEngine.open(config)
    try:
        if (n := await _prepared_count(engine)) != 0:
            bad.append(f"(d) {n} transactions are prepared after the second reopen")
        second, _ = await dump_state(engine, KEYS)
        if second != first:
            diff = sorted(k for k in KEYS if first[k] != second[k])
            bad.append(f"(d) reopening again changed the state of {diff}")
        bad += await _check_new_commit(engine, shards)
    finally:
        await engine.close()

    engine = await EmbeddedEngine.open(config)
    try:
        third, _ = await dump_state(engine, KEYS)
        probe_keys = _one_key_per_shard(shards)
        for key in probe_keys:
            newest = third[key][-1] if third[key] else None
            if newest is None or newest[5] != "after-recovery":
                bad.append(f"(d) the commit made after recovery is lost from {key} after a clean reopen")
    finally:
        await engine.close()
    return bad, facts


def _check_kept_readable(engine: EmbeddedEngine, state: State) -> list[str]:
    """(c): every version from the oldest one a shard's store keeps to the current is readable."""
    bad = []
    slot_map = StaticSlotMap(len(engine.shards))
    for key, entries in state.items():
        kept = engine.shards[slot_map.shard_for(key)].store.oldest_version(key)
        if entries and kept != entries[0][0]:
            bad.append(f"(c) {key}: the store keeps versions from {kept} on, but history reads only from "
                       f"{entries[0][0]} on: a kept version is unreadable")
    return bad


def _one_key_per_shard(shards: int) -> list[str]:
    slot_map = StaticSlotMap(shards)
    found: dict[int, str] = {}
    for key in KEYS:
        found.setdefault(slot_map.shard_for(key), key)
    return [found[s] for s in sorted(found)]


async def _check_new_commit(engine: EmbeddedEngine, shards: int) -> list[str]:
    """A commit spanning every shard succeeds after recovery and is readable at once."""
    keys = _one_key_per_shard(shards)
    session = oribus.AsyncSession(engine.bus, "after-recovery")
    bad = []
    try:
        before = await session.get_many(keys)
        versions = await session.commit({k: {"c": "after-recovery"} for k in keys}, commit_id="after-recovery")
        for key in keys:
            if versions.get(key) != before[key].version + 1:
                bad.append(f"(d) the commit after recovery gave {key} version {versions.get(key)}, "
                           f"expected {before[key].version + 1}")
            item = await session.get(key)
            if item.value != {"c": "after-recovery"}:
                bad.append(f"(d) the commit after recovery is not readable on {key}: {item!r}")
    except oribus.OribusError as e:
        bad.append(f"(d) a new commit after recovery failed: {e!r}")
    return bad


async def check_expired_session(data_dir: str | Path, journal_path: str | Path, shards: int) -> list[str]:
    """A session from before the crash, presenting its tokens, cannot commit.

    Uses the last acknowledged commit of a session that had tokens. Returns
    the violations found (empty when the commit was refused with SessionExpired
    and wrote nothing).
    """
    journal = load_journal(journal_path)
    last = next((ev for ev in reversed(list(journal.acknowledged.values())) if ev["tokens"]), None)
    if last is None:
        return ["the journal has no acknowledged commit with session tokens to replay"]
    tokens = {int(shard): tuple(tok) for shard, tok in last["tokens"].items()}
    key = next(iter(last["versions"]))
    request = CommitRequest(
        session=SessionRef(*last["session"]),
        commit_id="stale-session-probe",
        writes={key: encode_value({"c": "stale-session-probe"})},
        tokens=tokens,
    )
    engine = await EmbeddedEngine.open(engine_config(data_dir, shards))
    try:
        try:
            await engine.bus.commit(request)
        except oribus.SessionExpired:
            pass
        except oribus.OribusError as e:
            return [f"a pre-crash session's commit failed with {e!r}, not SessionExpired"]
        else:
            return [f"a pre-crash session {last['session']} committed to {key} with its old tokens {tokens}"]
        history = await oribus.AsyncSession(engine.bus, "crash-checker").history(key)
        if any(v.commit_id == "stale-session-probe" for v in history):
            return [f"the refused pre-crash commit is visible on {key}"]
    finally:
        await engine.close()
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("journal", type=Path)
    parser.add_argument("shards", type=int)
    args = parser.parse_args(argv)
    violations, facts = asyncio.run(check_recovery(args.data_dir, args.journal, args.shards))
    print(json.dumps({"violations": violations, "facts": facts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
