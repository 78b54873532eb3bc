"""TlsConfig: credentials from a ``certs init`` directory, and clear errors for bad files."""

from __future__ import annotations

import shutil

import grpc
import pytest

from oribus.certs import init_certs
from oribus.errors import InvalidRequest, Unavailable
from oribus.tls import TlsConfig, channel_credentials, explain_failure, server_credentials


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    init_certs(d)
    return d


def test_credentials_from_a_directory(certs):
    cfg = TlsConfig.from_dir(certs)
    assert isinstance(server_credentials(cfg), grpc.ServerCredentials)
    assert isinstance(channel_credentials(cfg), grpc.ChannelCredentials)
    assert cfg.directory == certs
    assert TlsConfig.of(str(certs)) == cfg and TlsConfig.of(None) is None
    assert TlsConfig(cfg.ca, cfg.cert, cfg.key).directory is None  # not the directory layout


def test_a_client_needs_only_the_ca_and_its_own_pair(certs, tmp_path):
    for f in ("ca.crt", "client.crt", "client.key"):
        shutil.copy(certs / f, tmp_path / f)
    channel_credentials(TlsConfig.from_dir(tmp_path))
    with pytest.raises(InvalidRequest, match=f"server certificate {tmp_path / 'server.crt'}"):
        server_credentials(TlsConfig.from_dir(tmp_path))


@pytest.mark.parametrize("missing, what", [("ca.crt", "CA certificate"), ("server.key", "server key")])
def test_a_missing_file_is_named(certs, tmp_path, missing, what):
    for f in certs.iterdir():
        if f.name != missing:
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(InvalidRequest, match=f"TLS: cannot read the {what} {tmp_path / missing}"):
        server_credentials(TlsConfig.from_dir(tmp_path))


def test_a_key_of_another_certificate_is_refused(certs, tmp_path):
    for f in certs.iterdir():
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(certs / "client.key", tmp_path / "server.key")
    with pytest.raises(InvalidRequest, match="does not belong to"):
        server_credentials(TlsConfig.from_dir(tmp_path))
    (tmp_path / "client.crt").write_text("not a certificate")
    with pytest.raises(InvalidRequest, match="is not PEM"):
        channel_credentials(TlsConfig.from_dir(tmp_path))


GRPC = "connection failed: failed to connect to all addresses; last error: {}"


@pytest.mark.parametrize("secure, raw, expected", [
    (True, "UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed", "did not accept this client's certificate"),
    (True, "UNKNOWN: Tls handshake failed (TSI_PROTOCOL_FAILURE): CERTIFICATE_VERIFY_FAILED",
     "not signed by our CA"),
    (True, "UNKNOWN: Tls handshake failed: WRONG_VERSION_NUMBER", "does not speak TLS"),
    (True, "UNKNOWN: Custom verification check failed: Hostname Verification Check failed.",
     "does not name 127.0.0.1"),
    (False, "UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed", "most likely requires TLS"),
])
def test_handshake_failures_name_tls(secure, raw, expected):
    err = explain_failure(Unavailable(GRPC.format(raw)), "127.0.0.1:1", secure=secure)
    assert expected in err.message and raw in err.message
    assert isinstance(err, Unavailable)


@pytest.mark.parametrize("secure", [True, False])
def test_other_failures_pass_unchanged(secure):
    refused = Unavailable(GRPC.format("UNKNOWN: Failed to connect to remote host: Connection refused"))
    assert explain_failure(refused, "h:1", secure=secure) is refused
    broken = Unavailable("connection failed: Socket closed")  # an established stream broke
    assert explain_failure(broken, "h:1", secure=secure) is broken
