"""The processes oribus runs as: each puts the layers below together and owns their lifetime.

    embedded.py   ``EmbeddedEngine``: a bus and N shards in this process (``open_local``)
    up.py         ``UpHost``: ``oribus up`` — the engine, or shard processes, behind gRPC and HTTP
    bus.py        ``BusHost``: ``oribus bus`` — a bus in front of shard servers (cluster mode)
    shard.py      ``oribus shard`` — lock the data directory, claim the id, serve one shard
    lifecycle.py  what every host shares: ``Teardown`` (stop what was started, last first), the stop signal
"""
