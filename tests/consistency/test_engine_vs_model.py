"""The embedded engine against the reference model of the ORI rule (hypothesis stateful).

Many sessions (one strict) read, commit with expected versions and explicit
read entries, run transactions that interleave with other sessions' commits,
roll back, forget, reset — and the whole engine restarts, cleanly or as a
crash that drops the process's open files. After every step the engine's
state must equal the model's, and every outcome (new versions, or the exact
list of offending keys, or SessionExpired / InvalidRequest) must be the one the
model predicts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from model import Model, ModelSession, ModelTxn, Outcome

import oribus
from oribus.meta.slots import StaticSlotMap
from oribus.testing.interleave import crash as crash_engine

SHARDS = 3
HISTORY = 4
KEYS = [f"team/k{i}" for i in range(6)]
SESSIONS = ["alice", "bob", "strict"]

keys = st.sampled_from(KEYS)
key_lists = st.lists(keys, min_size=1, max_size=3, unique=True)
values = st.one_of(st.integers(-5, 100), st.text(max_size=4), st.none(), st.lists(st.integers(-(2**63), 2**63 - 1), max_size=2))
sessions = st.sampled_from(SESSIONS)


def crash(bus: oribus.SyncSession) -> None:
    """Stop the engine the way a killed process would: no flush, files just closed
    (and so the data directory locks dropped, as the kernel drops a dead process's flocks)."""
    engine = bus._inner._owner

    async def _crash() -> None:
        crash_engine(engine)

    bus._portal.call(_crash())
    bus._closed = True
    bus._portal.stop()


class EngineVsModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="oribus-model-"))
        self.model = Model(StaticSlotMap(SHARDS).shard_for, HISTORY)
        self.txns: list[tuple[ModelTxn, oribus.SyncTransaction]] = []
        self.session_ids = {name: f"{name}-run" for name in SESSIONS}
        self._open()
        for name in SESSIONS:
            self.model.sessions[name] = ModelSession(strict=(name == "strict"))

    def _open(self, tokens: dict[str, dict] | None = None) -> None:
        self.bus = oribus.open_local_sync(
            self.dir, shards=SHARDS, agent="root", history_limit=HISTORY, snapshot_every_records=25
        )
        self.s = {}
        for name in SESSIONS:
            sess = self.bus.session(agent=name, session_id=self.session_ids[name], strict=(name == "strict"))
            if tokens:  # the client side of a session survives the server's restart
                sess._inner._tokens.update(tokens[name])
            self.s[name] = sess

    def teardown(self) -> None:
        if not self.bus._closed:
            self.bus.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- helpers --------------------------------------------------------------------

    def _expect(self, predicted: Outcome, call) -> None:
        try:
            got = call()
        except oribus.Conflict as e:
            assert predicted.kind == "conflict", f"engine: Conflict {e.stale}; model: {predicted}"
            assert sorted(e.stale) == predicted.stale, f"engine {sorted(e.stale)} != model {predicted.stale}"
            return
        except oribus.SessionExpired:
            assert predicted.kind == "expired", f"engine: SessionExpired; model: {predicted}"
            return
        except oribus.InvalidRequest as e:
            assert predicted.kind == "invalid", f"engine: InvalidRequest {e}; model: {predicted}"
            return
        assert predicted.kind == "ok", f"engine committed {got}; model: {predicted}"
        assert got == predicted.versions

    # ---- rules ---------------------------------------------------------------------

    @rule(name=sessions, ks=key_lists)
    def read(self, name, ks):
        got = self.s[name].get_many(ks)
        want = self.model.read(name, ks)
        assert {k: (i.value, i.version) for k, i in got.items()} == want

    @rule(
        name=sessions,
        writes=st.dictionaries(keys, values, max_size=3),
        expect=st.dictionaries(keys, st.integers(0, 6), max_size=2),
        explicit=st.dictionaries(keys, st.integers(0, 6), max_size=2),
        correct=st.booleans(),
    )
    def commit(self, name, writes, expect, explicit, correct):
        if correct:  # mostly-right expectations exercise the success path too
            expect = {k: self.model.version(k) for k in expect}
            explicit = {k: self.model.version(k) for k in explicit}
        predicted = self.model.commit(name, writes, expect, explicit)
        self._expect(predicted, lambda: self.s[name].commit(writes, expect=expect, read_set=explicit))

    @rule(name=sessions, key=keys, delete=st.booleans(), value=values)
    def put(self, name, key, delete, value):
        predicted = self.model.commit(name, {key: None if delete else value})
        call = (lambda: {key: self.s[name].delete(key)}) if delete else (lambda: {key: self.s[name].put(key, value)})
        self._expect(predicted, call)

    @rule(name=sessions, to=st.dictionaries(keys, st.integers(0, 8), min_size=1, max_size=2))
    def rollback(self, name, to):
        predicted = self.model.commit(name, {}, rollback=to)
        self._expect(predicted, lambda: self.s[name].rollback(to))

    @rule(name=sessions, ks=key_lists)
    def forget(self, name, ks):
        self.s[name].forget(ks)
        self.model.forget(name, ks)

    @rule(name=sessions)
    def reset(self, name):
        self.s[name].reset_session()
        self.model.reset(name)

    @precondition(lambda self: len(self.txns) < 3)
    @rule(name=sessions)
    def begin(self, name):
        self.txns.append((ModelTxn(name), self.s[name].transaction()))

    @precondition(lambda self: self.txns)
    @rule(i=st.integers(0, 2), ks=key_lists)
    def txn_read(self, i, ks):
        mt, tx = self.txns[i % len(self.txns)]
        got = tx.get_many(ks)
        want = self.model.read(mt.session, ks, txn=mt)
        assert {k: (it.value, it.version) for k, it in got.items()} == want

    @precondition(lambda self: self.txns)
    @rule(i=st.integers(0, 2), key=keys, value=values)
    def txn_write(self, i, key, value):
        mt, tx = self.txns[i % len(self.txns)]
        tx.put(key, value)
        mt.writes[key] = value

    @precondition(lambda self: self.txns)
    @rule(i=st.integers(0, 2))
    def txn_commit(self, i):
        mt, tx = self.txns.pop(i % len(self.txns))
        self._expect(self.model.commit_txn(mt), tx.commit)

    @rule(clean=st.booleans())
    def restart(self, clean):
        tokens = {name: dict(self.s[name]._inner._tokens) for name in SESSIONS}
        txn_tokens = [dict(tx._inner._tokens) for _, tx in self.txns]
        if clean:
            self.bus.close()
        else:
            crash(self.bus)
        self.model.restart([mt for mt, _ in self.txns])
        self._open(tokens)
        # open transactions keep their client-side state and continue on the new engine
        reopened = []
        for (mt, old), toks in zip(self.txns, txn_tokens, strict=True):
            tx = self.s[mt.session].transaction()
            inner = tx._inner
            inner._tokens.update(toks)
            inner._since.update(old._inner._since)
            inner._reads.update(old._inner._reads)
            for k, v in old._inner._writes.items():
                inner._writes[k] = v
            reopened.append((mt, tx))
        self.txns = reopened

    # ---- invariants -------------------------------------------------------------------

    @invariant()
    def state_matches_model(self):
        for k in KEYS:
            hist = self.bus.history(k)
            want = self.model.kept(k)[::-1]
            assert [(h.version, h.value) for h in hist] == want, k
            if hist:  # versions consecutive, newest first
                assert [h.version for h in hist] == list(range(hist[0].version, hist[0].version - len(hist), -1))


EngineVsModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("ORIBUS_MODEL_EXAMPLES", "150")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_engine_matches_model = EngineVsModel.TestCase
