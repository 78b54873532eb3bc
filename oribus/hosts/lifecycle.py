"""What every oribus process host shares: how it learns to stop."""

from __future__ import annotations

import asyncio


def stop_signal_event() -> asyncio.Event:
    """An event set on SIGINT or SIGTERM. Install it before starting anything, so a
    signal that arrives during start-up still leads to a graceful stop."""
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop
