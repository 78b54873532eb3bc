"""``oribus proxy``: an HTTP proxy between agents and their LLM provider that records
the bus keys an agent's prompts and answers refer to as deliveries to its session, so
what an agent knows from its conversation is checked at its commits like what it read.

``server.py`` forwards and orders (``ProxyServer``), ``detect.py`` finds references
(``KeyIndex``, sans-IO), ``recorder.py`` keeps the index fed and records deliveries
(``IndexFeed``, ``DeliveryRecorder``), failing a session closed when it cannot record
what the agent saw. ``running`` puts the three together around a block, ``serve`` until
a stop event (``oribus proxy``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable

from oribus.client.session import AsyncSession
from oribus.integrations.proxy.detect import KeyIndex, Ref
from oribus.integrations.proxy.recorder import LOST_PREFIX, DeliveryRecorder, IndexFeed, lost_key
from oribus.integrations.proxy.server import ProxyConfig, ProxyServer, load_key_map

__all__ = ["DeliveryRecorder", "IndexFeed", "KeyIndex", "ProxyConfig", "ProxyServer", "Ref", "load_key_map",
           "lost_key", "running", "serve"]

log = logging.getLogger("oribus.proxy")


@contextlib.asynccontextmanager
async def running(bus: AsyncSession, config: ProxyConfig, prefixes: Iterable[str] = ("",), *,
                  index_wait: float = 5.0) -> AsyncIterator[ProxyServer]:
    """The proxy on ``bus`` (any session: ``oribus.connect`` or ``oribus.open_local``),
    serving while the block runs; its key index has scanned ``prefixes`` first (waiting at
    most ``index_wait`` seconds: an unreachable bus does not keep the proxy from serving).

    Example::

        async with oribus.connect("127.0.0.1:7700", agent="oribus-proxy") as bus, \
                running(bus, ProxyConfig("https://api.openai.com", port=7790)) as proxy:
            ...  # agents use base_url="http://127.0.0.1:7790/v1" and the X-Oribus-Agent header
    """
    index = KeyIndex(ignored_prefixes=(LOST_PREFIX, ".sbus/"))
    feed = IndexFeed(bus, index, prefixes)
    recorder = DeliveryRecorder(bus, timeout=config.record_timeout)
    await feed.start(wait=index_wait)
    try:
        async with ProxyServer(config, index, recorder) as proxy:
            yield proxy
    finally:
        await recorder.close()
        await feed.close()


async def serve(bus: AsyncSession, config: ProxyConfig, prefixes: Iterable[str] = ("",), *,
                stop: asyncio.Event | None = None) -> None:
    """Run the proxy on ``bus`` until ``stop`` is set (``oribus proxy``)."""
    async with running(bus, config, prefixes) as proxy:
        log.info("oribus proxy on http://%s:%d -> %s (%d keys indexed)", config.host, proxy.port,
                 config.upstream, len(proxy.index))
        print(f"oribus proxy listening on http://{config.host}:{proxy.port} -> {config.upstream}", flush=True)
        await (stop or asyncio.Event()).wait()
