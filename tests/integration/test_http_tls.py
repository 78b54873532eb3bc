"""HTTPS on the gateway (``--tls-dir``, ``--http-mtls``; specs/auth.md §2): the same CA as
gRPC; a client certificate optional, or required with ``mtls``; plain HTTP refused."""

from __future__ import annotations

import ssl

import aiohttp
import pytest

from oribus.certs import init_certs
from oribus.errors import InvalidRequest
from oribus.gateway import GatewayConfig
from oribus.hosts.up import UpHost
from oribus.tls import TlsConfig, client_ssl_context


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    init_certs(d)
    return d


async def start(tmp_path, certs, mtls: bool) -> UpHost:
    tls = TlsConfig.from_dir(certs)
    host = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=1, tls=tls,
                  http=GatewayConfig(listen="127.0.0.1:0", tls=tls, mtls=mtls))
    await host.start()
    return host


def ca_only(certs) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    return ctx


async def status(url: str, ctx: ssl.SSLContext | bool) -> int:
    async with aiohttp.ClientSession() as http, http.get(url, ssl=ctx) as r:
        return r.status


@pytest.mark.parametrize("mtls", [False, True])
async def test_https_with_optional_or_required_client_certificates(tmp_path, certs, mtls):
    host = await start(tmp_path, certs, mtls)
    try:
        gw = host.gateway
        assert gw.url.startswith("https://")
        url = f"{gw.url}/v1/keys/k?agent=a"
        with_cert = client_ssl_context(TlsConfig.from_dir(certs))
        assert await status(url, with_cert) == 200
        if mtls:
            with pytest.raises(aiohttp.ClientError):
                await status(url, ca_only(certs))
        else:
            assert await status(url, ca_only(certs)) == 200
        with pytest.raises(aiohttp.ClientError):  # plain HTTP to an HTTPS port
            await status(url.replace("https://", "http://"), False)
    finally:
        await host.stop()


async def test_mtls_without_a_tls_directory_is_refused(tmp_path):
    host = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=1,
                  http=GatewayConfig(listen="127.0.0.1:0", mtls=True))
    with pytest.raises(InvalidRequest, match="--http-mtls needs --tls-dir"):
        await host.start()
    await host.stop()
