"""Adapters that meet agent frameworks where they already are, each behind an optional extra.

Every adapter talks to a bus through the public SDK only (``oribus.connect``,
``oribus.open_local`` and the sessions they return), never through the bus, the
shards or a transport (tests/unit/test_layering.py):

    integrations/mcp/     ``oribus mcp``: a Model Context Protocol server (extra ``oribus[mcp]``)
"""
