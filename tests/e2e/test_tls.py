"""Mutual TLS with real processes: an mTLS cluster serves traffic; clients without a valid
certificate are refused with an error that names TLS.

Certificates come from ``oribus certs init`` run through the CLI. ``oribus up
--processes --tls-dir`` puts mTLS on every listener (the bus and each shard
process) and on the bus's shard clients, so a commit across both shards
working at all proves bus↔shard mTLS.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import grpc
import pytest
from conftest import keys_on_shard
from processes import Cluster, bus, run_cli, shard, up

import oribus
from oribus import Unavailable

NAMES_TLS = re.compile(r"TLS|SSL|handshake", re.IGNORECASE)
TIMEOUT = 5.0  # a refused handshake fails at once; this only bounds a hang


def certs_init(directory: Path) -> Path:
    r = run_cli("certs", "init", "--dir", str(directory), "--hosts", "oribus-bus,10.9.8.7")
    assert r.returncode == 0, r.stderr
    written = [line.removeprefix("wrote ") for line in r.stdout.splitlines() if line.startswith("wrote ")]
    assert sorted(Path(p).name for p in written) == sorted(
        ["ca.crt", "ca.key", "server.crt", "server.key", "client.crt", "client.key"])
    return directory


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    return certs_init(tmp_path_factory.mktemp("tls") / "certs")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> Path:
    """A second, unrelated CA and its certificates."""
    return certs_init(tmp_path_factory.mktemp("tls") / "other")


@pytest.fixture(scope="module")
def tls_up(tmp_path_factory, certs):
    """``oribus up --processes --tls-dir``: bus and two shard processes, all mTLS."""
    root = tmp_path_factory.mktemp("tls-up")
    c = Cluster()
    server = c.add(up(root, root / "data", processes=True))
    server.args += ["--tls-dir", str(certs)]
    server.tls_dir = certs
    try:
        server.start().wait_serving()
        yield server
    finally:
        c.stop()


def refused(address: str, **connect) -> Unavailable:
    """The error a client gets on its first call."""
    with oribus.Client(address, agent="intruder", timeout=TIMEOUT, **connect) as c:
        with pytest.raises(Unavailable) as info:
            c.get("tls/secret")
    return info.value


def test_certs_init_refuses_to_overwrite(certs):
    r = run_cli("certs", "init", "--dir", str(certs))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert json.loads(r.stderr.strip().splitlines()[-1])["error"] == "InvalidRequest"
    assert "--force" in r.stderr


def test_mtls_cluster_serves_reads_and_commits_across_shards(tls_up, certs):
    # every listener of ``up`` was started with the certificates: the shard processes too
    assert len(tls_up.children) == 2
    for pid in tls_up.children:
        assert f"--tls-dir\0{certs}" in Path(f"/proc/{pid}/cmdline").read_text()
    a, b = keys_on_shard(0, "tls/x")[0], keys_on_shard(1, "tls/y")[0]
    with oribus.Client(tls_up.address, agent="planner", tls=certs, timeout=TIMEOUT) as c:
        assert c.put(a, {"n": 1}) == 1
        assert c.get(a).value == {"n": 1}
        assert c.get(b).version == 0
        # reads on both shards, writes on both: a two-phase commit, bus→shards over mTLS
        assert c.commit({a: {"n": 2}, b: {"n": 2}}) == {a: 2, b: 1}
        assert c.get(b).value == {"n": 2}
        assert [v.version for v in c.history(a)] == [2, 1]
    # the CLI client too
    r = run_cli("get", a, "--addr", tls_up.address, "--tls-dir", str(certs))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"key": a, "value": {"n": 2}, "version": 2}


def test_a_plain_client_is_refused_with_an_error_naming_tls(tls_up):
    err = refused(tls_up.address)
    assert NAMES_TLS.search(err.message), err.message
    assert "requires TLS" in err.message and tls_up.address in err.message
    r = run_cli("get", "tls/secret", "--addr", tls_up.address)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    reply = json.loads(r.stderr.strip().splitlines()[-1])
    assert reply["error"] == "Unavailable" and "requires TLS" in reply["message"]


def test_a_client_of_another_ca_is_refused(tls_up, certs, other_ca, tmp_path):
    # entirely the other CA's files: it does not trust the bus, and the bus does not trust it
    err = refused(tls_up.address, tls=other_ca)
    assert NAMES_TLS.search(err.message) and "TLS handshake" in err.message, err.message
    # trusting our CA but presenting the other CA's certificate: the bus refuses it
    for f, src in (("ca.crt", certs), ("client.crt", other_ca), ("client.key", other_ca)):
        shutil.copy(src / f, tmp_path / f)
    err = refused(tls_up.address, tls=tmp_path)
    assert "TLS handshake" in err.message and "did not accept this client's certificate" in err.message, err.message
    # trusting our CA and presenting no certificate at all
    no_cert = grpc.ssl_channel_credentials(root_certificates=(certs / "ca.crt").read_bytes())
    err = refused(tls_up.address, credentials=no_cert)
    assert "TLS handshake" in err.message and "did not accept" in err.message, err.message


def test_a_tls_shard_refuses_a_plain_bus_and_serves_a_tls_one(cluster, tmp_path, certs):
    s = cluster.add(shard(tmp_path, 0, tmp_path / "shard-0"))
    s.args += ["--tls-dir", str(certs)]
    s.tls_dir = certs
    s.start().wait_serving()

    plain = cluster.add(bus(tmp_path, [s.shard_address]))
    plain.start().wait_serving()
    with oribus.Client(plain.address, agent="a", timeout=TIMEOUT) as c:
        with pytest.raises(Unavailable) as info:
            c.get("tls/k")
    # the bus's shard client could not reach the shard; the error names the shard (the stream
    # address the bus calls it at) and TLS
    assert s.stream_address in info.value.message and "requires TLS" in info.value.message, info.value.message

    secure = bus(tmp_path, [s.shard_address])
    secure.name = "bus-tls"
    secure.args += ["--tls-dir", str(certs)]
    secure.args[secure.args.index("--data-dir") + 1] = str(tmp_path / "bus-tls-data")
    secure.tls_dir = certs
    cluster.add(secure).start().wait_serving()
    with oribus.Client(secure.address, agent="a", tls=certs, timeout=TIMEOUT) as c:
        assert c.put("tls/k", 1) == 1
        assert c.get("tls/k").value == 1


@pytest.mark.parametrize("command", ["shard", "up"])
def test_a_server_without_its_certificate_refuses_to_start(tmp_path, certs, command):
    tls = tmp_path / "incomplete"
    tls.mkdir()
    shutil.copy(certs / "ca.crt", tls / "ca.crt")
    args = (["shard", "--id", "0", "--data-dir", str(tmp_path / "s")] if command == "shard"
            else ["up", "--data-dir", str(tmp_path / "d"), "--listen", "127.0.0.1:0", "--no-http"])
    r = run_cli(*args, "--tls-dir", str(tls))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    reply = json.loads(r.stderr.strip().splitlines()[-1])
    assert reply["error"] == "InvalidRequest"
    assert f"cannot read the server certificate {tls / 'server.crt'}" in reply["message"]
