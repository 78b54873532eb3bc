"""The register clients of a simulated run: rollbacks, session scope, forgets.

They run beside the list-append clients (``oribus.checker.run_list_append``) and record
into the same history, so the checker sees rollbacks and session-scope commits too.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import oribus.client.session as client_session
from oribus.checker import Recorder
from oribus.checker.listappend import record_failure
from oribus.client.session import AsyncSession, Transaction
from oribus.errors import OribusError, SessionExpired
from oribus.sim.config import SimConfig


async def register_client(
    session: AsyncSession, recorder: Recorder, process: str, keys: list[str], rng: random.Random,
    config: SimConfig, done: asyncio.Event,
) -> None:
    """Registers (``w`` ops, unique values) next to the list-append keys, written three ways:

    * a transaction that reads the key and writes a new value (transaction scope);
    * a rollback: pick an older version from the key's history, then a transaction that
      reads the key and rolls it back (recorded as a write of the restored value);
    * in session scope: ``get`` then ``commit`` — checked against every delivery the
      session still has, so first (sometimes) ``forget`` the other keys.
    """
    counter = 0
    while not done.is_set():
        key = rng.choice(keys)
        r = rng.random()
        try:
            if r < config.rollback_rate:
                await _rollback(session, recorder, process, key, rng)
            elif r < config.rollback_rate + config.session_rate:
                counter += 1
                if rng.random() < config.forget_rate:
                    await session.forget([k for k in keys if k != key])
                await _session_write(session, recorder, process, key, _value(process, counter))
            else:
                counter += 1
                await _txn_write(session, recorder, process, key, _value(process, counter))
        except OribusError:
            pass  # a history or forget call failed before anything was recorded
        await asyncio.sleep(rng.uniform(0.0, 0.01))


def _value(process: str, counter: int) -> str:
    return f"{process}-{counter}"


async def _read_then_write(session: AsyncSession, recorder: Recorder, process: str, key: str, value: Any,
                           stage: Callable[[Transaction], None]) -> None:
    """A transaction that reads ``key``, then ``stage``s a change that leaves it holding ``value``."""
    tx = session.transaction()
    tid = recorder.invoke(process, list(session.session_ref), [["r", key, None], ["w", key, value]])
    try:
        item = await tx.get(key)
        stage(tx)
        versions = await tx.commit()
    except OribusError as e:
        record_failure(recorder, tid, e, tx.sent, tx.commit_id)
        if isinstance(e, SessionExpired):
            await session.reset_session()
        return
    recorder.ok(tid, [["r", key, item.value, item.version], ["w", key, value, versions.get(key)]], tx.commit_id)


async def _txn_write(session: AsyncSession, recorder: Recorder, process: str, key: str, value: Any) -> None:
    await _read_then_write(session, recorder, process, key, value, lambda tx: tx.put(key, value))


async def _rollback(session: AsyncSession, recorder: Recorder, process: str, key: str, rng: random.Random) -> None:
    versions = [v for v in await session.history(key) if not v.deleted and v.value is not None]
    if len(versions) < 2:
        return
    target = rng.choice(versions[1:])  # not the newest: a rollback that changes something
    await _read_then_write(session, recorder, process, key, target.value,
                           lambda tx: tx.rollback(key, target.version))


async def _session_write(session: AsyncSession, recorder: Recorder, process: str, key: str, value: Any) -> None:
    commit_id = client_session.new_commit_id()
    tid = recorder.invoke(process, list(session.session_ref), [["r", key, None], ["w", key, value]])
    sent = False
    try:
        item = await session.get(key)
        sent = True
        versions = await session.commit({key: value}, commit_id=commit_id)
    except OribusError as e:
        record_failure(recorder, tid, e, sent, commit_id)
        if isinstance(e, SessionExpired):
            await session.reset_session()
        return
    recorder.ok(tid, [["r", key, item.value, item.version], ["w", key, value, versions.get(key)]], commit_id)
