"""Adapters that meet agent frameworks where they already are, each behind an optional extra.

Every adapter talks to a bus through the public SDK only (``oribus``, ``oribus.client``,
``oribus.errors``, ``oribus.types``, ``oribus.contract``: ``oribus.connect``,
``oribus.open_local`` and the sessions they return), never through the bus, the shards or
a transport: an integration is a client like any other (tests/unit/test_layering.py;
specs/ARCHITECTURE.md, "Which layer may import which"):

    integrations/mcp/         ``oribus mcp``: a Model Context Protocol server (extra ``oribus[mcp]``)
    integrations/langgraph/   ``OribusSaver`` (checkpointer) and ``OribusStore`` (extra ``oribus[langgraph]``)
    integrations/proxy/       ``oribus proxy``: an HTTP proxy between agents and their LLM provider that
                              records the keys their prompts and answers refer to as deliveries (no extra)
"""
