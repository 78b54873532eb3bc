"""Exec probe: the standard gRPC health check (grpc.health.v1.Health/Check) over mutual TLS.

Kubelet's built-in gRPC probe cannot present a client certificate, and with
``--tls-dir`` every oribus gRPC listener requires one. The prod overlay mounts
this file from a ConfigMap and runs it with the image's Python::

    python grpc-health-check.py --port 7801 --tls-dir /etc/oribus/tls [--service oribus.v1.Shard]

It connects to 127.0.0.1, presents ``client.crt``, checks the server's
certificate against ``ca.crt`` under the name ``localhost`` (which every
``oribus certs init`` server certificate carries), and exits 0 if the service
is SERVING, 1 otherwise, printing the reason.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(port: int, tls_dir: Path, service: str, server_name: str, timeout: float) -> tuple[bool, str]:
    """(serving, what was seen) for one health check of ``service`` on 127.0.0.1:``port``."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=(tls_dir / "ca.crt").read_bytes(),
        private_key=(tls_dir / "client.key").read_bytes(),
        certificate_chain=(tls_dir / "client.crt").read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", server_name)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as e:
            return False, f"{e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True, help="the gRPC port on 127.0.0.1")
    p.add_argument("--tls-dir", type=Path, required=True, help="ca.crt, client.crt, client.key")
    p.add_argument("--service", default="", help='the health service name ("" = the whole server)')
    p.add_argument("--server-name", default="localhost", help="a name the server certificate lists")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds for the whole check")
    args = p.parse_args(argv)
    try:
        serving, seen = check(args.port, args.tls_dir, args.service, args.server_name, args.timeout)
    except OSError as e:  # a certificate file is missing or unreadable
        serving, seen = False, str(e)
    print(f"{args.service or '(server)'}: {seen}", file=sys.stdout if serving else sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
