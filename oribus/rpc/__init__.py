"""The transports of both services (``oribus.v1.Bus``, ``oribus.v1.Shard``): gRPC for both, and
the stream transport (length-prefixed msgpack over TCP or TLS) from the bus to its shards.

    wire.py          service names, frames, msgpack, the encodings both services use
    bus_codec.py     ``BUS_OPS``: the bus's operations and their encodings
    shard_codec.py   ``SHARD_OPS``: the shard's operations, ``FENCE`` (the epoch on a call)
    grpc_status.py   errors ↔ gRPC status codes, both ways
    mux_client.py    ``MuxClient``: many calls batched over one bidi stream; ``RemoteWatch``
    mux_server.py    ``mux_handlers``, ``GrpcListener``: the server end, with health checks
    bus_client.py    ``RemoteBus``: a ``BusService`` over gRPC (behind ``oribus.connect``)
    bus_server.py    ``BusServer``: a ``Bus`` behind gRPC
    frames.py        the stream transport's frames (length prefix, hello, limits): sans-IO
    stream_client.py ``StreamClient``: many calls batched over one connection; ``StreamWatch``
    stream_server.py ``StreamListener``: the server end, one write per loop turn
    shard_client.py  ``StreamShardClient`` / ``GrpcShardClient``: a ``ShardService`` over
                     either; ``shard_client`` picks one
    shard_server.py  ``ShardServer``: a ``Shard`` behind both, epoch-fenced

The client half (wire, codecs, mux client, bus client, frames, stream client) imports no
server module; the shapes are documented in ``specs/wire.md``.
"""
