"""What checking a credential costs a bus (specs/auth.md §2: "measured before it ships").

Three figures, each in microseconds of CPU per call (``time.process_time``: robust to other
work on the machine), over ``--n`` calls:

* ``verify``: a full check of a fresh token — parse, the EdDSA signature (Ed25519 through
  ``cryptography``), the claims — what the first call of a connection pays;
* ``authenticate (cached)``: ``Authority.authenticate`` of a token already verified — a
  SHA-256 and a dictionary lookup — what every later call pays;
* ``decide``: one access decision for one key against a policy of ``--roles`` roles (the
  reference, and what names the rule of a refusal);
* ``access``: the same decision on the bus's hot path, through the identity's compiled grants
  (``Authority.access(...).allows``: a set lookup and one ``str.startswith``);
* ``guard_step``: everything ``GuardedBus`` adds to an agent step (read two keys, commit a
  write of one, in the session the identity owns): the two calls through the guard over a
  bus that answers at once, less the same two calls on that bus alone (compare with the
  server's CPU per step in ``auth_overhead.py``).

Usage::

    .venv/bin/python benchmarks/auth_verify.py [--n 5000] [--roles 20]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from oribus.auth import Authority, Operation  # noqa: E402
from oribus.auth.credential import CREDENTIAL  # noqa: E402
from oribus.auth.keys import AuthDir, load_signing_key, new_signing_key  # noqa: E402
from oribus.auth.tokens import issue, verify  # noqa: E402
from oribus.bus.guarded import GuardedBus  # noqa: E402
from oribus.contract import CommitRequest  # noqa: E402
from oribus.types import SessionRef  # noqa: E402


def per_call_us(fn, n: int) -> float:
    t0 = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - t0) / n * 1e6


class _AnsweringBus:
    """A bus that answers at once: what is left to time is the guard in front of it."""

    class sessions:  # noqa: N801 - the attribute GuardedBus reads
        journal = None

    async def read(self, *args: object, **kw: object) -> None:
        return None

    async def commit(self, *args: object, **kw: object) -> None:
        return None


def guard_step_us(authority: Authority, token: str, prefix: str, n: int) -> float:
    """CPU µs GuardedBus adds to one agent step (two calls), over ``n`` steps."""
    guard = GuardedBus(_AnsweringBus(), authority)  # type: ignore[arg-type]
    CREDENTIAL.set(token)
    session = SessionRef("bench", "s")
    keys = [prefix + "a", prefix + "b"]
    req = CommitRequest(session=session, commit_id="c", writes={keys[0]: b"1"})

    def run(coro: Any) -> None:  # neither call waits: one step of each coroutine runs it whole
        try:
            coro.send(None)
        except StopIteration:
            return
        raise AssertionError("the guard waited")

    bare = _AnsweringBus()

    def step() -> None:
        run(guard.read(session, keys))
        run(guard.commit(req))

    def bare_step() -> None:  # what the same two calls cost without the guard
        run(bare.read(session, keys))
        run(bare.commit(req))

    step()  # the session claimed
    return per_call_us(step, n) - per_call_us(bare_step, n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--roles", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="auth-bench-") as tmp:
        d = AuthDir(Path(tmp))
        new_signing_key(d)
        roles = "\n".join(f"  r{i}:\n    read: [\"team/{i}/*\", \"shared/{i}\"]\n    write: [\"team/{i}/*\"]"
                          for i in range(args.roles))
        d.policy.write_text(f"roles:\n{roles}\n")
        kid, key = load_signing_key(d)
        last = f"r{args.roles - 1}"
        token = issue(key, kid, agent="bench", roles=[last], now=time.time(), ttl=3600)
        authority = Authority(d.root, reload_every=3600)
        identity = authority.authenticate(token)
        keys = {kid: key.public_key()}
        now = time.time()
        results = {
            "verify_us": per_call_us(lambda: verify(token, keys, now=now, roles=authority.policy.roles), args.n),
            "authenticate_cached_us": per_call_us(lambda: authority.authenticate(token), args.n * 10),
            # the worst case: the granting role is the last one, the key under its prefix
            "decide_us": per_call_us(
                lambda: authority.decide(identity, Operation.WRITE, f"team/{args.roles - 1}/x"), args.n * 10),
            "access_us": per_call_us(
                lambda: authority.access(identity, Operation.WRITE).allows(f"team/{args.roles - 1}/x"), args.n * 10),
            "guard_step_us": guard_step_us(authority, token, f"team/{args.roles - 1}/", args.n * 10),
        }
    print(json.dumps({k: round(v, 2) for k, v in results.items()}))


if __name__ == "__main__":
    main()
