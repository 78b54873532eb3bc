"""The cluster's auth data in etcd: read, followed and written (specs/auth.md §3, "Cluster mode").

The layout under ``/oribus/<cluster>/auth/`` and what a snapshot of it means are
``oribus.auth.published``'s; this module only moves the bytes, through the cluster's
``EtcdMeta``:

* ``read`` / ``follow``: every key under ``auth/`` at one revision, and again after each
  etcd watch event (at least every ``poll_seconds`` if the watch breaks) — what a bus
  hands to ``Authority.apply_published``. A revocation or a policy edit therefore reaches
  every bus of the cluster within a watch round trip.
* ``push``: config, policy and verification keys replaced in one transaction (keys etcd
  holds that the directory no longer has are deleted in it: that is how a retired key
  leaves the cluster); the directory's revocations added first, in batches, never one
  removed (``oribus.auth.published``: a push must not lift a revocation made in etcd).
* ``revoke``: one put of ``revoked/<jti>``, merged with what etcd holds for that id (a
  revocation for good stays for good; otherwise the later ``until`` wins); the ids whose
  ``until`` has passed by more than the tokens' leeway are deleted in the same transaction
  (their tokens are refused as expired anyway).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from oribus.auth.published import CONFIG, KEYS, PREFIX, REVOKED, Push, parse_until
from oribus.auth.tokens import LEEWAY_SECONDS
from oribus.errors import InvalidRequest
from oribus.meta.etcd import EtcdMeta

# etcd refuses a transaction of more than 128 operations (its --max-txn-ops default)
TXN_OPS = 100


class EtcdAuthStore:
    """The auth data of the cluster ``meta`` names; ``meta`` stays the caller's to close."""

    def __init__(self, meta: EtcdMeta) -> None:
        self.meta = meta

    @property
    def where(self) -> str:
        return f"{self.meta.prefix}{PREFIX}"

    async def read(self) -> dict[str, bytes]:
        return await self.meta.read_prefix(PREFIX)

    def follow(self) -> AsyncIterator[dict[str, bytes]]:
        return self.meta.follow_prefix(PREFIX)

    async def push(self, push: Push) -> dict[str, int]:
        """Store ``push`` (``oribus.auth.published.dir_push``); counts of what was written."""
        items = sorted(push.revoked.items())
        for i in range(0, len(items), TXN_OPS):
            await self.meta.write_prefix(PREFIX, dict(items[i:i + TXN_OPS]))
        held = await self.read()
        stale = [n for n in held if (n.startswith(KEYS) or n == CONFIG) and n not in push.replace]
        if len(push.replace) + len(stale) > TXN_OPS:
            raise InvalidRequest(f"{len(push.replace) + len(stale)} keys and files to publish at once: at most "
                                 f"{TXN_OPS} (retire verification keys that no token uses)")
        await self.meta.write_prefix(PREFIX, push.replace, stale)
        return {"keys": sum(n.startswith(KEYS) for n in push.replace), "removed": len(stale),
                "revoked": len(items)}

    async def revoke(self, token_id: str, until: int, now: float) -> int:
        """Revoke ``token_id`` in etcd until ``until`` (0: for good); returns the ``until``
        stored. InvalidRequest if it is not a token id, or the cluster has no auth data."""
        parse_until(token_id, str(until).encode())  # the same checks a bus makes when it reads it
        held = await self.read()
        if not any(n.startswith(KEYS) for n in held):
            raise InvalidRequest(f"no auth data under {self.where}: `oribus auth push --dir D --etcd ...` first")
        revoked: dict[str, int] = {}
        for name, raw in held.items():
            if name.startswith(REVOKED):
                try:
                    revoked[name[len(REVOKED):]] = parse_until(name[len(REVOKED):], raw)
                except InvalidRequest:
                    continue  # a malformed entry is rewritten below if it is this id, else left to the operator
        before = revoked.get(token_id)
        stored = 0 if not until or before == 0 else max(until, before or 0)
        expired = [REVOKED + j for j, u in revoked.items() if 0 < u and u + LEEWAY_SECONDS < now and j != token_id][:TXN_OPS - 1]
        await self.meta.write_prefix(PREFIX, {REVOKED + token_id: str(stored).encode()}, expired)
        return stored
