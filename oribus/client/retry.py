"""Retry policy shared by the async and sync clients: which errors, how long to wait."""

from __future__ import annotations

import random
from dataclasses import dataclass

from oribus.errors import Conflict, OribusError, SessionExpired


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 20  # attempts after the first
    base_delay: float = 0.001  # first backoff, seconds
    max_delay: float = 0.1  # cap of the exponential backoff

    def delay(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return random.uniform(0, min(self.max_delay, self.base_delay * (2 ** min(attempt, 16))))

    def retry_transaction(self, error: BaseException) -> bool:
        """May a fresh transaction (which re-reads everything) succeed after ``error``?"""
        if isinstance(error, Conflict | SessionExpired):
            return True
        return isinstance(error, OribusError) and error.retryable
