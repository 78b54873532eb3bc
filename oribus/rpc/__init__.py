"""The gRPC transport of both services (``oribus.v1.Bus``, ``oribus.v1.Shard``).

    wire.py          service names, frames, msgpack, the encodings both services use
    bus_codec.py     ``BUS_OPS``: the bus's operations and their encodings
    shard_codec.py   ``SHARD_OPS``: the shard's operations, ``FENCE`` (the epoch on a call)
    grpc_status.py   errors ↔ gRPC status codes, both ways
    mux_client.py    ``MuxClient``: many calls batched over one bidi stream; ``RemoteWatch``
    mux_server.py    ``mux_handlers``, ``GrpcListener``: the server end, with health checks
    bus_client.py    ``RemoteBus``: a ``BusService`` over gRPC (behind ``oribus.connect``)
    bus_server.py    ``BusServer``: a ``Bus`` behind gRPC
    shard_client.py  ``GrpcShardClient``: a ``ShardService`` over gRPC
    shard_server.py  ``ShardServer``: a ``Shard`` behind gRPC, epoch-fenced

The client half (wire, codecs, mux client, bus client) imports no server module; the
shapes are documented in ``specs/wire.md``.
"""
