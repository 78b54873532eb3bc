"""Certificates for mutual TLS: one private CA, a server and a client certificate.

``oribus certs init --dir D`` writes six PEM files (keys 0600)::

    ca.crt  ca.key          the CA; it signs both certificates below, and every
                            listener and client trusts only certificates it signed
    server.crt server.key   presented by every gRPC listener (bus and shards);
                            SANs: localhost, 127.0.0.1, ::1 and each --hosts entry
                            (DNS names, wildcards like *.svc.cluster.local, IPs);
                            extended key usage serverAuth
    client.crt client.key   presented by every gRPC client (SDK, CLI, the bus
                            towards its shards); CN oribus-client, EKU clientAuth

``oribus certs agent --dir D --agent NAME --role R [--role ...]`` adds an agent's own
client certificate, ``agent-NAME.crt`` / ``agent-NAME.key``, signed by the same CA: subject
``CN=agent:NAME`` with one ``OU=role:R`` per role, EKU clientAuth. A bus run with ``--auth``
takes such a certificate as that agent's identity without a token (specs/auth.md §2).

Keys are ECDSA P-256 in unencrypted PKCS#8 (what gRPC's BoringSSL reads).
The CA is meant for one deployment: whoever holds ``ca.key`` can mint
certificates every listener accepts, so it need not be shipped to servers.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from oribus.errors import InvalidRequest
from oribus.tls import CA_CERT, CA_KEY, CLIENT_CERT, CLIENT_KEY, SERVER_CERT, SERVER_KEY

FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CLIENT_CERT, CLIENT_KEY)

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")  # always in the server certificate
DEFAULT_DAYS = 365
CLIENT_COMMON_NAME = "oribus-client"
SERVER_COMMON_NAME = "oribus-server"
# backdate validity a little, so a peer whose clock lags slightly still accepts a fresh cert
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class _Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def san_entry(host: str) -> x509.GeneralName:
    """``host`` as a subjectAltName: an IPAddress if it parses as one, else a DNSName."""
    host = host.strip()
    if not host or any(c.isspace() for c in host) or "," in host:
        raise InvalidRequest(f"not a host name or IP address: {host!r}")
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return x509.DNSName(host.lower())


def _name(common_name: str, units: Iterable[str] = ()) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "oribus"),
        *(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, u) for u in units),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _issue(
    subject: str,
    issuer: _Issued | None,
    days: int,
    *,
    ca: bool = False,
    eku: list[x509.ObjectIdentifier] | None = None,
    sans: list[x509.GeneralName] | None = None,
    units: Iterable[str] = (),
) -> _Issued:
    """A certificate for a fresh key; self-signed when ``issuer`` is None (the CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    signer = issuer.key if issuer is not None else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject, units))
        .issuer_name(issuer.cert.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return _Issued(builder.sign(signer, hashes.SHA256()), key)


def _cert_pem(issued: _Issued) -> bytes:
    return issued.cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(issued: _Issued) -> bytes:
    return issued.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` with ``mode`` from the start (a key is never readable by others, even briefly)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; a reused tmp may have had another mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def init_certs(
    directory: Path | str,
    hosts: Iterable[str] = (),
    *,
    days: int = DEFAULT_DAYS,
    force: bool = False,
) -> list[Path]:
    """Create a CA and a server and client certificate in ``directory``; the paths written.

    ``hosts`` are added to the server certificate's SANs after localhost,
    127.0.0.1 and ::1. Existing files are refused (InvalidRequest naming
    them) unless ``force``: a silently replaced CA would lock every peer
    holding the old one out.
    """
    directory = Path(directory)
    if days < 1:
        raise InvalidRequest(f"--days must be at least 1, not {days}")
    sans: list[x509.GeneralName] = []
    for h in (*DEFAULT_HOSTS, *hosts):
        entry = san_entry(h)
        if entry not in sans:
            sans.append(entry)
    existing = [directory / f for f in FILES if (directory / f).exists()]
    if existing and not force:
        raise InvalidRequest(
            f"refusing to overwrite {', '.join(str(p) for p in existing)} (use --force to replace them)"
        )
    directory.mkdir(parents=True, exist_ok=True)

    ca = _issue("oribus CA", None, days, ca=True)
    server = _issue(SERVER_COMMON_NAME, ca, days, eku=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans)
    client = _issue(CLIENT_COMMON_NAME, ca, days, eku=[ExtendedKeyUsageOID.CLIENT_AUTH])

    written = []
    for issued, cert_name, key_name in (
        (ca, CA_CERT, CA_KEY), (server, SERVER_CERT, SERVER_KEY), (client, CLIENT_CERT, CLIENT_KEY)
    ):
        _write(directory / key_name, _key_pem(issued), 0o600)
        _write(directory / cert_name, _cert_pem(issued), 0o644)
        written += [directory / cert_name, directory / key_name]
    return written


AGENT_PREFIX = "agent:"  # the CN of an agent's certificate: agent:NAME
ROLE_PREFIX = "role:"  # each of its OUs: role:R


def issue_agent_cert(directory: Path | str, agent: str, roles: Iterable[str], *, days: int = DEFAULT_DAYS,
                     force: bool = False) -> list[Path]:
    """``agent-NAME.crt`` and ``.key`` in ``directory``, signed by its ``ca.crt`` / ``ca.key``."""
    directory = Path(directory)
    roles = list(roles)
    if not agent or "/" in agent or len(agent) > 200 or not roles or not all(roles):
        raise InvalidRequest("an agent certificate needs an agent name (no '/') and at least one role")
    try:
        ca_cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"cannot read the CA in {directory} (oribus certs init): {e}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise InvalidRequest(f"{directory / CA_KEY} is not the ECDSA key `oribus certs init` writes")
    cert_path, key_path = directory / f"agent-{agent}.crt", directory / f"agent-{agent}.key"
    existing = [p for p in (cert_path, key_path) if p.exists()]
    if existing and not force:
        raise InvalidRequest(f"refusing to overwrite {', '.join(map(str, existing))} (use --force to replace them)")
    issued = _issue(AGENT_PREFIX + agent, _Issued(ca_cert, ca_key), days, eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
                    units=[ROLE_PREFIX + r for r in roles])
    _write(key_path, _key_pem(issued), 0o600)
    _write(cert_path, _cert_pem(issued), 0o644)
    return [cert_path, key_path]
