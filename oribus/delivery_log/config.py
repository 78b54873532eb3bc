"""Configuration of one shard's delivery log."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DeliveryLogConfig:
    """Limits of a :class:`~oribus.delivery_log.DeliveryLog`.

    Every bound is enforced with a clear error or an explicit expiry, never by
    silently dropping deliveries (specs/PROTOCOL.md, "Sessions: scopes and
    failing closed").
    """

    # Seconds a session may stay idle (no record, read-set check, advance,
    # forget, reset or touch) before its record is expired; a commit that
    # presents the expired incarnation then fails with SessionExpired.
    ttl_seconds: float = 3600.0
    # Most distinct keys one session may have delivered on this shard; a read
    # of one more new key raises LimitExceeded (re-reading a logged key never
    # fails, and advance() after a commit may go past it by the commit's keys).
    max_entries_per_session: int = 100_000
    # Most session records this shard keeps; creating one more first expires
    # idle sessions and raises LimitExceeded if none could be expired.
    max_sessions: int = 100_000

    def __post_init__(self) -> None:
        if not self.ttl_seconds > 0:
            raise ValueError(f"ttl_seconds must be > 0, got {self.ttl_seconds!r}")
        if self.max_entries_per_session < 1:
            raise ValueError(
                f"max_entries_per_session must be >= 1, got {self.max_entries_per_session!r}"
            )
        if self.max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {self.max_sessions!r}")
