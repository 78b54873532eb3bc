"""Small asyncio helpers the layers share."""

from __future__ import annotations

import asyncio


def take_outcome(fut: asyncio.Future) -> None:
    """A done callback for a future whose waiters may all be gone (cancelled, timed out) when
    it fails: its error is taken here, so asyncio does not log "exception was never
    retrieved". Waiters still there re-raise it as usual."""
    if not fut.cancelled():
        fut.exception()
