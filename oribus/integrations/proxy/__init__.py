"""``oribus proxy``: an HTTP proxy between agents and their LLM provider that records
the bus keys an agent's prompts and answers refer to as deliveries to its session, so
what an agent knows from its conversation is checked at its commits like what it read.

``server.py`` forwards and orders (``ProxyServer``), ``detect.py`` finds references
(``KeyIndex``, sans-IO), ``recorder.py`` keeps the index fed and records deliveries
(``IndexFeed``, ``DeliveryRecorder``), failing a session closed when it cannot record
what the agent saw. ``serve`` runs the three together (``oribus proxy``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from oribus.client.session import AsyncSession
from oribus.integrations.proxy.detect import KeyIndex, Ref
from oribus.integrations.proxy.recorder import LOST_PREFIX, DeliveryRecorder, IndexFeed, lost_key
from oribus.integrations.proxy.server import ProxyConfig, ProxyServer, load_key_map

__all__ = ["DeliveryRecorder", "IndexFeed", "KeyIndex", "ProxyConfig", "ProxyServer", "Ref", "load_key_map",
           "lost_key", "serve"]

log = logging.getLogger("oribus.proxy")


async def serve(bus: AsyncSession, config: ProxyConfig, prefixes: Iterable[str] = ("",), *,
                stop: asyncio.Event | None = None) -> None:
    """Run the proxy on ``bus`` until ``stop`` is set (or the task is cancelled)."""
    index = KeyIndex(ignored_prefixes=(LOST_PREFIX, ".sbus/"))
    feed = IndexFeed(bus, index, prefixes)
    recorder = DeliveryRecorder(bus, timeout=config.record_timeout)
    await feed.start(wait=5.0)
    try:
        async with ProxyServer(config, index, recorder) as proxy:
            log.info("oribus proxy on http://%s:%d -> %s (%d keys indexed)", config.host, proxy.port,
                     config.upstream, len(index))
            print(f"oribus proxy listening on http://{config.host}:{proxy.port} -> {config.upstream}", flush=True)
            await (stop or asyncio.Event()).wait()
    finally:
        await recorder.close()
        await feed.close()
