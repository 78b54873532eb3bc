"""Agent identities from client certificates (specs/auth.md §2): on a bus run with mutual
TLS and ``--auth``, a certificate ``CN=agent:NAME, OU=role:R`` (``oribus certs agent``) is
the agent's identity without a token, over gRPC and over the stream transport; the rules
apply to it as to a token; the deployment's own client certificate is no agent and its
calls still need a token; a certificate naming roles the policy does not have is refused."""

from __future__ import annotations

import time

import pytest

import oribus
from oribus.auth import Authority
from oribus.auth.keys import AuthDir, load_signing_key
from oribus.auth.tokens import issue
from oribus.certs import init_certs, issue_agent_cert
from oribus.cli import main
from oribus.errors import InvalidRequest, PermissionDenied, Unauthenticated
from oribus.hosts.up import UpHost
from oribus.tls import TlsConfig

POLICY = """
roles:
  team-a:
    read: ["team/a/*"]
    write: ["team/a/*"]
"""


@pytest.fixture
async def bus(tmp_path):
    certs = tmp_path / "tls"
    init_certs(certs)
    issue_agent_cert(certs, "a1", ["team-a"])
    issue_agent_cert(certs, "ghost", ["no-such-role"])
    main(["auth", "init", "--dir", str(tmp_path / "auth")])
    d = AuthDir(tmp_path / "auth")
    d.policy.write_text(POLICY)
    host = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=1, tls=TlsConfig.from_dir(certs),
                  authority=Authority(d.root))
    await host.start()
    try:
        yield host, certs, d
    finally:
        await host.stop()


def agent_tls(certs, agent: str) -> TlsConfig:
    return TlsConfig(ca=certs / "ca.crt", cert=certs / f"agent-{agent}.crt", key=certs / f"agent-{agent}.key")


@pytest.mark.parametrize("transport", ["grpc", "auto"])
async def test_an_agent_certificate_is_an_identity(bus, transport):
    host, certs, _ = bus
    async with oribus.connect(host.address, agent="a1", tls=agent_tls(certs, "a1"), transport=transport) as a1:
        await a1.put("team/a/x", 1)
        assert (await a1.get("team/a/x")).value == 1
        with pytest.raises(PermissionDenied):
            await a1.put("team/b/x", 1)
        if transport == "auto":
            assert a1._bus.using == "stream"  # noqa: SLF001
    async with oribus.connect(host.address, agent="a2", tls=agent_tls(certs, "a1"), transport=transport) as liar:
        with pytest.raises(PermissionDenied, match="may not act for agent 'a2'"):
            await liar.get("team/a/x")


@pytest.mark.parametrize("transport", ["grpc", "auto"])
async def test_other_certificates_need_a_token(bus, transport):
    host, certs, d = bus
    async with oribus.connect(host.address, agent="a1", tls=certs, transport=transport, token="") as plain:
        with pytest.raises(Unauthenticated, match="missing"):
            await plain.get("team/a/x")
    kid, key = load_signing_key(d)
    tok = issue(key, kid, agent="a1", roles=["team-a"], now=time.time())
    async with oribus.connect(host.address, agent="a1", tls=certs, transport=transport, token=tok) as a1:
        await a1.get("team/a/x")
    async with oribus.connect(host.address, agent="ghost", tls=agent_tls(certs, "ghost"), transport=transport) as g:
        with pytest.raises(Unauthenticated, match="not in the policy"):
            await g.get("team/a/x")


def test_the_agent_certificate_names_the_agent_and_its_roles(tmp_path):
    from cryptography import x509

    from oribus.auth.credential import agent_of_pem

    init_certs(tmp_path)
    issue_agent_cert(tmp_path, "planner", ["writer", "reader"])
    pem = (tmp_path / "agent-planner.crt").read_bytes()
    assert agent_of_pem(pem) == ("planner", ("writer", "reader"))
    assert agent_of_pem((tmp_path / "client.crt").read_bytes()) is None
    assert x509.load_pem_x509_certificate(pem).issuer == x509.load_pem_x509_certificate(
        (tmp_path / "ca.crt").read_bytes()).subject
    with pytest.raises(InvalidRequest, match="refusing to overwrite"):
        issue_agent_cert(tmp_path, "planner", ["writer"])
    with pytest.raises(InvalidRequest, match="at least one role"):
        issue_agent_cert(tmp_path, "x", [])


async def test_an_agent_certificate_is_an_identity_over_https(tmp_path):
    import aiohttp

    from oribus.gateway import GatewayConfig
    from oribus.tls import client_ssl_context

    certs = tmp_path / "tls"
    init_certs(certs)
    issue_agent_cert(certs, "a1", ["team-a"])
    main(["auth", "init", "--dir", str(tmp_path / "auth")])
    (tmp_path / "auth" / "policy.yaml").write_text(POLICY)
    tls = TlsConfig.from_dir(certs)
    host = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=1, tls=tls,
                  http=GatewayConfig(listen="127.0.0.1:0", tls=tls), authority=Authority(tmp_path / "auth"))
    await host.start()
    try:
        url = host.gateway.url
        as_a1, plain = client_ssl_context(agent_tls(certs, "a1")), client_ssl_context(tls)
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/v1/commit", ssl=as_a1,
                                 json={"agent": "a1", "writes": {"team/a/x": 1}}) as r:
                assert r.status == 200, await r.text()
            async with http.get(f"{url}/v1/keys/team/b/x?agent=a1", ssl=as_a1) as r:
                assert r.status == 403
            async with http.get(f"{url}/v1/keys/team/a/x?agent=a1", ssl=plain) as r:
                assert r.status == 401  # the deployment's own client certificate is no agent
    finally:
        await host.stop()
