"""Retry policy shared by the async and sync clients: which errors, how long to wait.

Two kinds of failure are retried, on two budgets:

* a **conflict** (or an expired session) means the transaction read something stale: a
  fresh transaction re-reads and may succeed. These are counted: ``retries`` attempts.
* **Unavailable** means a shard or the bus could not be reached, or asked to be left alone
  for a while (``details["retry_after"]``, e.g. a restarted shard in its restart grace). It
  lasts as long as the cause: a shard process restarting, or a replica group electing a new
  primary, which takes up to twice the primary lease's TTL. These are retried for a time,
  ``unavailable_for`` seconds since the first of a run of them, however many attempts that
  takes, so ``run()`` carries a fleet through a failover.

Where the server says how long to wait (``retry_after``), the client waits that long (capped
at ``MAX_RETRY_AFTER``, with a little jitter so a fleet does not return in one wave) instead
of its own backoff.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from oribus.errors import Conflict, OribusError, SessionExpired, Unavailable

MAX_RETRY_AFTER = 5.0  # longest wait a server's retry_after can impose, seconds


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 20  # attempts after the first, for conflicts and other retryable errors
    base_delay: float = 0.001  # first backoff, seconds
    max_delay: float = 0.1  # cap of the exponential backoff
    unavailable_for: float = 30.0  # how long a run of Unavailable is retried, seconds
    unavailable_max_delay: float = 0.5  # cap of the backoff between Unavailable attempts

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return random.uniform(0, min(self.max_delay, self.base_delay * (2 ** min(attempt, 16))))

    def delay_after(self, error: BaseException, attempt: int) -> float:
        """How long to wait after ``error``, the ``attempt``-th retry of its kind: the
        server's ``retry_after`` if it gave one, else jittered exponential backoff."""
        after = retry_after(error)
        if after is not None:
            return min(after, MAX_RETRY_AFTER) * random.uniform(1.0, 1.1)
        if isinstance(error, Unavailable):
            cap = self.unavailable_max_delay
            return random.uniform(0, min(cap, self.base_delay * (2 ** min(attempt, 16))))
        return self.delay(attempt)

    def retry_transaction(self, error: BaseException) -> bool:
        """May a fresh transaction (which re-reads everything) succeed after ``error``?"""
        if isinstance(error, Conflict | SessionExpired):
            return True
        return isinstance(error, OribusError) and error.retryable


def retry_after(error: BaseException) -> float | None:
    """The wait a server asked for in ``error`` (``details["retry_after"]``), if any."""
    details = getattr(error, "details", None)
    if not isinstance(details, dict):
        return None
    value = details.get("retry_after")
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


class Backoff:
    """One retry loop's budget under a policy: ``after(error)`` is the wait before the next
    attempt, or None when the loop must give up and raise ``error``."""

    def __init__(self, policy: RetryPolicy, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self.attempt = 0  # retries counted against policy.retries
        self._unavailable = 0  # retries in the current run of Unavailable
        self._unavailable_since: float | None = None

    def after(self, error: BaseException) -> float | None:
        if not self.policy.retry_transaction(error):
            return None
        if isinstance(error, Unavailable):
            now = self._clock()
            if self._unavailable_since is None:
                self._unavailable_since = now
            if now - self._unavailable_since >= self.policy.unavailable_for:
                return None
            self._unavailable += 1
            return self.policy.delay_after(error, self._unavailable)
        self._unavailable_since, self._unavailable = None, 0
        if self.attempt >= self.policy.retries:
            return None
        self.attempt += 1
        return self.policy.delay_after(error, self.attempt - 1)
