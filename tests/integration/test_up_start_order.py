"""What ``oribus up`` serves once its gRPC health service says SERVING: the HTTP gateway too.

Supervisors and tests wait for SERVING and then use either port, so the gateway must be
listening before the gRPC server starts (it was started after, and a client that came in
between had its HTTP connection refused).
"""

from __future__ import annotations

import asyncio
import socket

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from oribus.gateway import GatewayConfig, HttpGateway
from oribus.hosts.up import UpHost


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _serving(address: str) -> bool:
    # a channel of its own each time: one that failed to connect backs off for a second
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.2)
        except grpc.aio.AioRpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_http_port_listens_before_grpc_says_serving(data_dir, monkeypatch):
    real_start = HttpGateway.start

    async def slow_start(self: HttpGateway) -> None:  # widen the window a late gateway leaves
        await asyncio.sleep(0.5)
        await real_start(self)

    monkeypatch.setattr(HttpGateway, "start", slow_start)
    grpc_port, http_port = _free_port(), _free_port()
    cluster = UpHost(data_dir, listen=f"127.0.0.1:{grpc_port}",
                           http=GatewayConfig(listen=f"127.0.0.1:{http_port}"))
    starting = asyncio.create_task(cluster.start())
    try:
        while not await _serving(f"127.0.0.1:{grpc_port}"):
            await asyncio.sleep(0.01)
        _, writer = await asyncio.open_connection("127.0.0.1", http_port)  # refused before the fix
        writer.close()
        await starting
    finally:
        if not starting.done():
            starting.cancel()
        await asyncio.gather(starting, return_exceptions=True)
        await cluster.stop()
