"""A bus's access rules in cluster mode: loaded from etcd and followed there (specs/auth.md §3).

``oribus bus --etcd E --auth D`` (and ``oribus up --replicas N --auth D``, whose bus follows
its groups through etcd) starts an ``AuthFollower``:

* at start it reads the cluster's ``auth/`` prefix (``oribus.meta.auth_store``). If auth
  data has been published there (``oribus auth push``), the bus enforces it and ``D`` is
  not read (it need not exist on the bus's machine); if that data does not parse, the bus
  does not start (it names the part): a bus never serves on rules it could not read. If
  nothing is published, the bus enforces ``D`` as without etcd.
* then it follows the prefix for as long as the bus runs, handing every snapshot to
  ``Authority.apply_published``: a revocation, a rotation or a policy edit made in etcd
  applies on every bus of the cluster within a watch round trip, without a restart. A
  bus still on ``D`` switches to etcd at the first push. A snapshot that does not parse
  keeps the last good rules in force (logged at ERROR, ``oribus_auth_stale{part}``);
  etcd unreachable keeps them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from oribus.auth import Authority
from oribus.auth.published import parse_snapshot
from oribus.errors import InvalidRequest
from oribus.meta.auth_store import EtcdAuthStore

log = logging.getLogger("oribus.auth")

RETRY_SECONDS = 2.0  # after an unexpected error in following etcd, before following again


class AuthFollower:
    """``authority = await AuthFollower(store, D).start()``; ``await stop()``. ``authority``:
    one already loaded from ``D`` (``oribus up`` builds it before it starts anything), which
    the follower switches to etcd's data when there is some."""

    def __init__(self, store: EtcdAuthStore, directory: str | Path | None,
                 authority: Authority | None = None) -> None:
        self.store = store
        self.directory = directory
        self.authority = authority
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Authority:
        snapshot = await self.store.read()
        published = parse_snapshot(snapshot)
        if published.present:
            if published.errors:
                raise InvalidRequest(f"--auth: the auth data under {self.store.where} is not usable: " + "; ".join(
                    f"{part}: {why}" for part, why in published.errors.items()))
            if self.authority is None:
                self.authority = Authority.from_published(snapshot)
            else:
                self.authority.apply_published(snapshot, parsed=published)
        elif self.authority is None:
            if self.directory is None:
                raise InvalidRequest(f"--auth: no auth data under {self.store.where} and no directory")
            try:
                self.authority = Authority(self.directory)
            except InvalidRequest as e:
                raise InvalidRequest(f"{e.message}; nor is any auth data published under {self.store.where} "
                                     f"(`oribus auth push --dir D --etcd ...`)") from None
        log.warning("auth: enforcing the rules of %s; following %s for changes", self.authority.source,
                    self.store.where)
        self._task = asyncio.get_running_loop().create_task(self._follow(self.authority))
        return self.authority

    async def _follow(self, authority: Authority) -> None:
        while True:  # for as long as the bus runs: an error ends one watch, not the following
            try:
                async for snapshot in self.store.follow():
                    authority.apply_published(snapshot)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the rules in force stay; follow again
                log.exception("auth: following the auth data in etcd failed; the last good rules stay, "
                              "following again in %.0f s", RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
