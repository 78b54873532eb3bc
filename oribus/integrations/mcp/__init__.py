"""``oribus mcp``: the bus as a Model Context Protocol server (extra ``oribus[mcp]``).

An MCP host (a chat application, an IDE, an agent framework) gives its model the
bus's tools: ``read`` and ``read_many`` (each read is a delivery, as for any
oribus agent), ``commit`` (checked by ORI against what the session was shown;
a refused commit says which keys changed, their current values and who wrote
them), ``history``, ``rollback``, ``changes`` (a watch the model polls) and
``list``; and a resource per key, ``oribus://key/{key}``.

    server.py     the tools and the resource on an ``MCPServer``
    sessions.py   one oribus session per MCP session, and its watches
    results.py    what a tool answers: structured content and the same in words
    run.py        the transports (stdio, streamable HTTP)
    options.py    ``oribus mcp``'s command-line options (no SDK import)

Built on the official ``mcp`` SDK; imports of it stay inside this package, so
``import oribus`` works without the extra.
"""
