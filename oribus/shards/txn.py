"""Transaction records of a participant: an explicit state machine.

::

              prepare                 decide/finish(commit)
    (none) ───────────▶ PREPARED ─────────────────────────▶ COMMITTED
       │                    │
       │ one-phase commit   │ decide/finish(abort), expiry
       ├───────────────────────────────────────────────────▶ COMMITTED
       │                    ▼
       └──────────────▶ ABORTED   (an abort of an unknown transaction leaves
          abort              a tombstone, so a late prepare votes NO)

COMMITTED and ABORTED are final. Every transition goes through
``Txn.transition``, which refuses the others.

WAL record types written by the participant (bodies are msgpack maps):

    PREPARE          {"i": txn id, "s": [agent, session id], "p": primary shard,
                      "ps": [participant shards], "w": [[key, version, value, deleted], ...],
                      "r": [read-locked keys], "t": commit time}
    COMMIT_ONE_PHASE {"i", "s", "w", "t"}            validated, locked and applied in one step
    COMMIT           {"i"}                            a PREPARED transaction committed
    ABORT            {"i"}                            a PREPARED (or unknown) transaction aborted
    RELEASE          {"i"}                            the primary may forget a kept decision

(Type 255, ``TERM_START``, belongs to replica groups: ``oribus.shards.wal.record``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from oribus.messages import TxnState, Write
from oribus.types import SessionRef


class RecordType(IntEnum):
    PREPARE = 1
    COMMIT_ONE_PHASE = 2
    COMMIT = 3
    ABORT = 4
    RELEASE = 5  # a kept decision every participant applied (appended, not waited for)


_VALID: dict[TxnState | None, frozenset[TxnState]] = {
    None: frozenset({TxnState.PREPARED, TxnState.COMMITTED, TxnState.ABORTED}),
    TxnState.PREPARED: frozenset({TxnState.COMMITTED, TxnState.ABORTED}),
    TxnState.COMMITTED: frozenset(),
    TxnState.ABORTED: frozenset(),
}


class InvalidTransition(RuntimeError):
    """A transaction was asked to move between states the protocol forbids."""


def is_transition_valid(old: TxnState | None, new: TxnState) -> bool:
    return new in _VALID[old]


@dataclass(slots=True)
class Txn:
    txn_id: str
    session: SessionRef
    state: TxnState | None = None
    primary: int = 0
    participants: tuple[int, ...] = ()
    writes: dict[str, Write] = field(default_factory=dict)
    read_keys: tuple[str, ...] = ()
    committed_at: float = 0.0
    prepared_at: float = 0.0  # monotonic clock of this shard
    one_phase: bool = False  # a one-phase commit waiting for its fsync (never snapshotted)

    def transition(self, new: TxnState) -> None:
        if not is_transition_valid(self.state, new):
            raise InvalidTransition(f"transaction {self.txn_id}: {self.state} -> {new} is not allowed")
        self.state = new

    @property
    def resolved(self) -> bool:
        return self.state in (TxnState.COMMITTED, TxnState.ABORTED)

    @property
    def versions(self) -> dict[str, int]:
        return {k: w.version for k, w in self.writes.items()}

    def drop_values(self) -> None:
        """Once resolved, keep what retries and recovery need (versions), not the values:
        applied, they live in the store; aborted, nowhere. (Issue 20: the participant keeps
        the last ``max_resolved_txns`` outcomes, which would otherwise hold their values in
        memory, the versions an on-disk history store took out of it included.)"""
        if any(w.value is not None for w in self.writes.values()):
            self.writes = {k: Write(w.version, None, w.deleted) for k, w in self.writes.items()}

    # ---- WAL and snapshot forms ------------------------------------------------

    def prepare_body(self) -> dict:
        return {
            "i": self.txn_id,
            "s": list(self.session),
            "p": self.primary,
            "ps": list(self.participants),
            "w": [[k, w.version, w.value, w.deleted] for k, w in self.writes.items()],
            "r": list(self.read_keys),
            "t": self.committed_at,
        }

    def one_phase_body(self) -> dict:
        return {
            "i": self.txn_id,
            "s": list(self.session),
            "w": [[k, w.version, w.value, w.deleted] for k, w in self.writes.items()],
            "t": self.committed_at,
        }

    @classmethod
    def from_body(cls, body: dict, state: TxnState | None = None) -> Txn:
        return cls(
            txn_id=body["i"],
            session=SessionRef(*body["s"]),
            state=state,
            primary=body.get("p", 0),
            participants=tuple(body.get("ps", ())),
            writes={k: Write(v, val, d) for k, v, val, d in body.get("w", ())},
            read_keys=tuple(body.get("r", ())),
            committed_at=body.get("t", 0.0),
        )

    def snapshot_form(self, released: bool = True) -> list:
        if self.state is TxnState.PREPARED:
            return [self.state.value, self.prepare_body()]
        # resolved transactions keep only what idempotent retries and recovery need
        assert self.state is not None, f"transaction {self.txn_id} is snapshotted before it has a state"
        body = {
            "i": self.txn_id,
            "s": list(self.session),
            "p": self.primary,
            "ps": list(self.participants),
            "w": [[k, w.version, None, w.deleted] for k, w in self.writes.items()],
            "rel": released,  # False: an unreleased decision of this shard (see Participant.decisions)
        }
        return [self.state.value, body]
