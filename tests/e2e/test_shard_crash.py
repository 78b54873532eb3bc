"""kill -9 a shard server in the middle of two-phase traffic, restart it at the same address.

Layout: two ``oribus shard`` processes on fixed ports and an ``oribus bus``
over them. Tellers move money between an account on shard 0 and one on
shard 1 (every transfer is a two-phase commit) with ``run()``; an auditor
reads every account in a transaction and commits it read-only, so each
audit it counts was validated at one commit point. Shard 1 is killed with
SIGKILL while this runs, then restarted on the same port with the same data.

Checked:
* every acknowledged transfer is in the history of both its accounts, and
  every transfer in any history is in both of them, applied once, with its
  own amount (no partial commit, no double apply, no lost update);
* the total is the same in every validated audit and at the end;
* transactions left prepared by the crash resolve: no account stays locked,
  the shards report nothing prepared, and the tellers finish their work;
* sessions that read from the killed incarnation fail closed with
  SessionExpired on commit, every time, until they reset.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import time
from collections import Counter

import pytest
from conftest import keys_on_shard
from processes import bus, shard, two_shards_and_a_bus

import oribus
from oribus import OribusError, RetryPolicy, SessionExpired

PER_SHARD = 6
INITIAL = 1_000
TELLERS = 4
TRANSFERS = 40  # per teller; keeps every account's history under the 100 versions kept
POLICY = RetryPolicy(retries=200, base_delay=0.002, max_delay=0.1)


async def transfer(
    tx: oribus.Transaction,
    *,
    src: str,
    dst: str,
    amount: int,
    journal: dict[str, tuple[str, str, int]],
) -> str:
    """Move ``amount`` from ``src`` to ``dst``; every attempt is journaled by its commit id."""
    got = await tx.get_many([src, dst])
    journal[tx.commit_id] = (src, dst, amount)
    tx.put(src, got[src].value - amount)
    tx.put(dst, got[dst].value + amount)
    return tx.commit_id


async def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def test_kill_shard_during_two_phase_traffic(cluster, tmp_path):
    s0 = cluster.add(shard(tmp_path, 0, tmp_path / "shard-0", verbose=True)).start()
    s1 = cluster.add(shard(tmp_path, 1, tmp_path / "shard-1", verbose=True)).start()
    for s in (s0, s1):
        await asyncio.to_thread(s.wait_serving)
    b = cluster.add(bus(tmp_path, [s0.shard_address, s1.shard_address])).start()
    await asyncio.to_thread(b.wait_serving)

    left = keys_on_shard(0, "bank/acct", PER_SHARD)
    right = keys_on_shard(1, "bank/acct", PER_SHARD)
    accounts = left + right
    expected_total = INITIAL * len(accounts)

    admin = oribus.connect(b.address, agent="admin")
    seed = await admin.commit({a: INITIAL for a in accounts}, commit_id="seed")
    assert seed == {a: 1 for a in accounts}

    attempted: dict[str, tuple[str, str, int]] = {}  # commit id -> (from, to, amount)
    acked: dict[str, tuple[str, str, int]] = {}  # the transfers run() returned for
    errors: Counter[str] = Counter()
    audits: list[tuple[float, int]] = []  # (when, total) of validated audits
    stop_audit = asyncio.Event()
    crashed = asyncio.Event()

    async def teller(n: int) -> int:
        rng = random.Random(n)
        session = oribus.connect(b.address, agent=f"teller-{n}")
        done = 0
        try:
            while done < TRANSFERS:
                pair = [rng.choice(left), rng.choice(right)]
                rng.shuffle(pair)
                src, dst = pair
                amount = rng.randint(1, 50)

                move = functools.partial(
                    transfer, src=src, dst=dst, amount=amount, journal=attempted
                )
                try:
                    cid = await session.run(move, policy=POLICY)
                except OribusError as e:  # e.g. the shard stayed down longer than run() retries
                    errors[type(e).__name__] += 1
                    await asyncio.sleep(0.05)
                    continue
                acked[cid] = attempted[cid]
                done += 1
                if done == TRANSFERS * 3 // 4:
                    await crashed.wait()  # keep work for after the restart, however fast this ran
        finally:
            await session.close()
        return done

    async def auditor() -> None:
        session = oribus.connect(b.address, agent="auditor")
        try:
            while not stop_audit.is_set():
                tx = session.transaction()
                try:
                    got = await tx.get_many(accounts)
                    await tx.commit()  # read-only: validates every read at one commit point
                except OribusError as e:
                    errors[f"audit {type(e).__name__}"] += 1
                    await asyncio.sleep(0.02)
                    continue
                audits.append((time.monotonic(), sum(i.value for i in got.values())))
        finally:
            await session.close()

    tellers = [asyncio.create_task(teller(n)) for n in range(TELLERS)]
    audit = asyncio.create_task(auditor())
    prober = oribus.connect(b.address, agent="prober")
    probe_key = "bank-probe/note"
    # what the probing sessions read: one key per shard that no teller locks
    probed = [keys_on_shard(0, "bank-probe/read")[0], keys_on_shard(1, "bank-probe/read")[0]]
    try:

        async def enough_traffic() -> bool:
            return len(acked) >= 30 and len(audits) >= 1

        await wait_for(enough_traffic, 60, "traffic before the crash")

        # sessions that read from shard 1's first incarnation
        await prober.get_many(probed)
        in_flight = prober.session(agent="prober-tx").transaction()
        await in_flight.get(probed[1])
        in_flight.put(probe_key, "from a transaction")

        acked_before = len(acked)
        await asyncio.to_thread(s1.kill9)
        killed_at = time.monotonic()
        crashed.set()
        await asyncio.sleep(0.3)
        s1.start()
        await asyncio.to_thread(s1.wait_serving)
        restarted_at = time.monotonic()

        # the restarted shard serves reads again once what the crash left prepared is resolved
        reader = admin.session(agent="reader")

        async def readable() -> bool:
            try:
                await reader.get_many(accounts)
                return True
            except OribusError:
                return False

        await wait_for(readable, 30, "reads of every account after the restart", interval=0.2)

        # fail closed: the deliveries of shard 1's first incarnation are gone
        for _ in range(2):
            with pytest.raises(SessionExpired):
                await prober.commit({probe_key: "from the session"})
        with pytest.raises(SessionExpired):
            await in_flight.commit()
        await prober.reset_session()
        await prober.get_many(probed)
        assert (await prober.commit({probe_key: "after reset"}))[probe_key] == 1

        done = await asyncio.wait_for(asyncio.gather(*tellers), 90)
        assert done == [TRANSFERS] * TELLERS
        assert len(acked) > acked_before, "no transfer was acknowledged after the restart"
        await asyncio.sleep(0.2)
        stop_audit.set()
        await asyncio.wait_for(audit, 30)

        # nothing stays prepared on either shard (the bus resolves what the crash left)
        async def settled() -> bool:
            stats = await admin.stats()
            return all(s["prepared"] == 0 for s in stats["shards"])

        await wait_for(settled, 30, "no prepared transaction on any shard", interval=0.25)

        final = await admin.session(agent="final").get_many(accounts)
        histories = {a: await admin.history(a) for a in accounts}
    finally:
        for t in (*tellers, audit):
            t.cancel()
        await asyncio.gather(*tellers, audit, return_exceptions=True)
        for s in (prober, admin):
            await s.close()

    # ---- the total: at the end and in every validated audit ---------------------------------
    assert sum(i.value for i in final.values()) == expected_total
    wrong = [(round(t - killed_at, 2), total) for t, total in audits if total != expected_total]
    assert not wrong, (
        f"validated audits saw a partial transfer (seconds after the kill, total): {wrong}"
    )
    assert any(t < killed_at for t, _ in audits) and any(t > restarted_at for t, _ in audits)

    # ---- every transfer, from the histories ---------------------------------------------------
    places: dict[str, list[str]] = {}
    for acct, history in histories.items():
        assert len(history) == final[acct].version, f"{acct}: history incomplete, cannot check it"
        chain = list(reversed(history))  # oldest first
        assert chain[0].commit_id == "seed" and chain[0].value == INITIAL
        ids = [h.commit_id for h in chain]
        assert len(ids) == len(set(ids)), f"{acct}: a commit applied twice: {ids}"
        for prev, cur in zip(chain, chain[1:], strict=False):
            assert cur.version == prev.version + 1
            src, dst, amount = attempted[cur.commit_id]
            delta = -amount if acct == src else amount
            assert acct in (src, dst)
            assert cur.value - prev.value == delta, f"{acct} v{cur.version}: lost update"
            places.setdefault(cur.commit_id, []).append(acct)
    for cid, accts in places.items():
        src, dst, _ = attempted[cid]
        assert sorted(accts) == sorted([src, dst]), f"{cid} is partial: only in {accts}"
    missing = set(acked) - set(places)
    assert not missing, f"acknowledged transfers lost: {sorted(missing)}"

    recovered = re.findall(r"recovered (\d+) prepared", s1.log_tail(400))
    print(
        f"\nshard crash: {len(acked)} transfers acknowledged ({acked_before} before the kill), "
        f"{len(places)} applied, {len(audits)} validated audits, errors {dict(errors)}, "
        f"restarted shard recovered prepared transactions: {recovered or 'none'}"
    )


async def test_primary_crash_after_its_commit_decision_is_never_partial(cluster, tmp_path):
    """The primary makes COMMITTED durable and dies before answering; the client retries the id.

    Its retries reach the other participant while the primary is down. Whatever
    they do, the commit point is the primary's record: once it is back, both
    keys carry the commit (never only one of them), and the retried id reports
    success without applying twice.
    """
    s0, s1, b = await asyncio.to_thread(two_shards_and_a_bus, cluster, tmp_path, "txn.after_decide=kill")

    a = keys_on_shard(0, "zz-decided/a")[0]
    k = keys_on_shard(1, "aa-decided/b")[0]  # the smallest written key: shard 1 is the primary
    session = oribus.connect(b.address, agent="payer")
    try:
        with pytest.raises(oribus.Unavailable):
            await session.commit({a: "paid", k: "paid"}, commit_id="decided-1")
        assert await asyncio.to_thread(s1.wait_exit) == -9, "the failpoint did not fire"

        s1.env = {}
        s1.start()
        await asyncio.to_thread(s1.wait_serving)

        async def retried():
            try:
                return await session.commit({a: "paid", k: "paid"}, commit_id="decided-1")
            except oribus.Unavailable:
                return None  # the bus's connection to shard 1 may still be backing off

        assert await wait_for(retried, 30, "the retried commit", interval=0.2) == {a: 1, k: 1}
        reader = session.session(agent="reader")
        items = await reader.get_many([a, k])
        assert (items[a].value, items[k].value) == ("paid", "paid"), f"partial commit: {items}"
        for key in (a, k):
            assert [h.commit_id for h in await session.history(key)] == ["decided-1"]
    finally:
        await session.close()
