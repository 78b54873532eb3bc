"""``oribus certs init``: the CA signs both certificates, with the right names, usages and key modes."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from oribus.certs import FILES, init_certs
from oribus.errors import InvalidRequest

HOSTS = ["*.oribus-shard.default.svc.cluster.local", "oribus-bus", "10.1.2.3", "fd00::7"]


def _cert(path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    written = init_certs(d, HOSTS, days=30)
    assert sorted(p.name for p in written) == sorted(FILES)
    return d


def test_the_ca_signs_the_server_and_client_certificates(certs):
    ca = _cert(certs / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca.verify_directly_issued_by(ca)  # self-signed
    for name in ("server.crt", "client.crt"):
        leaf = _cert(certs / name)
        leaf.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_the_server_certificate_verifies_for_every_name_it_lists(certs):
    store = Store([_cert(certs / "ca.crt")])
    server = _cert(certs / "server.crt")
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
             x509.IPAddress(ipaddress.ip_address("::1")), x509.DNSName("oribus-bus"),
             x509.DNSName("oribus-shard-0.oribus-shard.default.svc.cluster.local"),  # by the wildcard
             x509.IPAddress(ipaddress.ip_address("10.1.2.3")), x509.IPAddress(ipaddress.ip_address("fd00::7"))]
    for name in names:
        PolicyBuilder().store(store).build_server_verifier(name).verify(server, [])
    with pytest.raises(Exception, match="(?i)subject|name"):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("elsewhere.example")).verify(server, [])


def test_sans_and_extended_key_usages(certs):
    server, client = _cert(certs / "server.crt"), _cert(certs / "client.crt")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", *HOSTS[:2]]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address(a)
                                                       for a in ("127.0.0.1", "::1", "10.1.2.3", "fd00::7")]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH]
    assert list(client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "oribus-client"


def test_keys_match_their_certificates_and_are_private(certs):
    for name in ("ca", "server", "client"):
        key_path = certs / f"{name}.key"
        assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert key.public_key() == _cert(certs / f"{name}.crt").public_key()
    assert stat.S_IMODE((certs / "ca.crt").stat().st_mode) == 0o644


def test_validity_is_the_requested_number_of_days(certs):
    server = _cert(certs / "server.crt")
    days = (server.not_valid_after_utc - server.not_valid_before_utc).days
    assert days == 30  # 30 days plus the few minutes backdated for clock skew


def test_refuses_to_overwrite_unless_forced(tmp_path):
    init_certs(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in FILES}
    with pytest.raises(InvalidRequest, match=r"refusing to overwrite .*ca\.crt.*--force"):
        init_certs(tmp_path)
    assert {f: (tmp_path / f).read_bytes() for f in FILES} == before
    (tmp_path / "ca.crt").unlink()  # even one existing file is refused
    with pytest.raises(InvalidRequest, match="server.key"):
        init_certs(tmp_path)
    init_certs(tmp_path, force=True)
    assert (tmp_path / "ca.key").read_bytes() != before["ca.key"]
    assert stat.S_IMODE((tmp_path / "server.key").stat().st_mode) == 0o600


@pytest.mark.parametrize("hosts, days", [(["two words"], 1), ([""], 1), ([], 0)])
def test_bad_arguments_are_refused(tmp_path, hosts, days):
    with pytest.raises(InvalidRequest):
        init_certs(tmp_path, hosts, days=days)
    assert not any(tmp_path.iterdir())
