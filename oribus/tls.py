"""TLS settings of gRPC and stream listeners and clients (the files ``oribus certs init`` writes).

With TLS every gRPC listener (bus, shards) presents ``server.crt`` and, by
default, requires mutual TLS: a client must present a certificate signed by
``ca.crt``. Every gRPC client (SDK, CLI, the bus towards its shards) checks
the server's certificate against ``ca.crt`` and presents ``client.crt``.
The HTTP gateway is not covered: it stays plain HTTP.

Bad settings fail early and name the file: a listener whose certificate is
missing refuses to start, rather than starting and failing every handshake.
A handshake that fails at run time reaches the caller as Unavailable whose
message names TLS (``explain_failure``): gRPC itself only says "Socket closed"
or "Ssl handshake failed".
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from oribus.errors import InvalidRequest, Unavailable

# the files of a certificate directory (written by ``oribus certs init``, see oribus.certs)
CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.crt", "server.key"
CLIENT_CERT, CLIENT_KEY = "client.crt", "client.key"


@dataclass(frozen=True)
class TlsConfig:
    """Where the PEM files are. ``TlsConfig.from_dir(d)`` for a ``certs init`` directory."""

    ca: Path  # the CA certificate: peers' certificates must be signed by it
    cert: Path  # what a listener presents (server.crt)
    key: Path  # its private key
    client_cert: Path | None = None  # what a client presents; None: ``cert``
    client_key: Path | None = None  # its private key; None: ``key``
    # the name a client checks in the server's certificate instead of the target's host
    # (e.g. when connecting by an address the certificate does not list)
    ssl_target_name_override: str | None = None

    @classmethod
    def from_dir(cls, directory: Path | str, *, ssl_target_name_override: str | None = None) -> TlsConfig:
        """The files ``oribus certs init --dir directory`` wrote. A client needs only
        ca.crt, client.crt and client.key; a listener ca.crt, server.crt and server.key."""
        d = Path(directory)
        return cls(ca=d / CA_CERT, cert=d / SERVER_CERT, key=d / SERVER_KEY,
                   client_cert=d / CLIENT_CERT, client_key=d / CLIENT_KEY,
                   ssl_target_name_override=ssl_target_name_override)

    @classmethod
    def of(cls, tls: TlsConfig | Path | str | None) -> TlsConfig | None:
        """Accept a TlsConfig, a ``certs init`` directory, or None (no TLS)."""
        if tls is None or isinstance(tls, TlsConfig):
            return tls
        if isinstance(tls, str | Path):
            return cls.from_dir(tls)
        raise InvalidRequest(f"tls must be a TlsConfig or a directory, not {type(tls).__name__}")

    @property
    def directory(self) -> Path | None:
        """The ``certs init`` directory these files are, if they are one (what ``--tls-dir``
        passes to a child process); None for files laid out otherwise."""
        d = self.cert.parent
        same = TlsConfig.from_dir(d, ssl_target_name_override=self.ssl_target_name_override)
        return d if same == self else None

    def channel_options(self) -> list[tuple[str, str]]:
        """Extra gRPC channel options of a client (the target name override, if any)."""
        if self.ssl_target_name_override:
            return [("grpc.ssl_target_name_override", self.ssl_target_name_override)]
        return []


def _read(path: Path, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise InvalidRequest(f"TLS: cannot read the {what} {path}: {e.strerror or e}") from None
    if b"-----BEGIN " not in data:
        raise InvalidRequest(f"TLS: the {what} {path} is not PEM")
    return data


def _load_pair(cert_path: Path, key_path: Path, what: str) -> tuple[bytes, bytes]:
    """The PEM bytes of a certificate and its key, checked to parse and to belong together."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert_pem = _read(cert_path, f"{what} certificate")
    key_pem = _read(key_path, f"{what} key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise InvalidRequest(f"TLS: the {what} certificate {cert_path} does not parse: {e}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"TLS: the {what} key {key_path} does not parse: {e}") from None
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise InvalidRequest(f"TLS: the {what} key {key_path} does not belong to {cert_path}")
    return cert_pem, key_pem


def server_credentials(cfg: TlsConfig, require_client_cert: bool = True) -> grpc.ServerCredentials:
    """What a gRPC listener serves with: ``cfg.cert``; with ``require_client_cert``
    (the default) only clients presenting a certificate signed by ``cfg.ca`` get in."""
    ca = _read(cfg.ca, "CA certificate")
    cert_pem, key_pem = _load_pair(cfg.cert, cfg.key, "server")
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)], root_certificates=ca, require_client_auth=require_client_cert
    )


def channel_credentials(cfg: TlsConfig) -> grpc.ChannelCredentials:
    """What a gRPC client connects with: trust ``cfg.ca``, present the client certificate."""
    ca = _read(cfg.ca, "CA certificate")
    cert_pem, key_pem = _load_pair(cfg.client_cert or cfg.cert, cfg.client_key or cfg.key, "client")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key_pem, certificate_chain=cert_pem)


def server_ssl_context(cfg: TlsConfig, require_client_cert: bool = True) -> ssl.SSLContext:
    """The same as ``server_credentials`` for a listener of the ``ssl`` module (the stream
    transport, ``oribus.rpc.stream_server``): ``cfg.cert``, and with ``require_client_cert``
    only clients presenting a certificate signed by ``cfg.ca``."""
    ca = _read(cfg.ca, "CA certificate")
    _load_pair(cfg.cert, cfg.key, "server")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.cert, cfg.key)
    ctx.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
    ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def client_ssl_context(cfg: TlsConfig) -> ssl.SSLContext:
    """The same as ``channel_credentials`` for a client of the ``ssl`` module: trust
    ``cfg.ca`` (and check the server's name), present the client certificate."""
    ca = _read(cfg.ca, "CA certificate")
    cert, key = cfg.client_cert or cfg.cert, cfg.client_key or cfg.key
    _load_pair(cert, key, "client")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the server's certificate and name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
    ctx.load_cert_chain(cert, key)
    return ctx


# What gRPC's terse connection errors mean on a TLS channel: (fragment of the error text,
# explanation), first match wins. Seen with grpcio 1.85 (BoringSSL).
_TLS_FAILURES = (
    ("wrong_version_number", "the server does not speak TLS"),
    ("hostname verification", "the server's certificate does not name {host} "
                              "(add it with certs init --hosts, or set ssl_target_name_override)"),
    ("certificate_verify_failed", "the server's certificate is not signed by our CA (ca.crt)"),
    # TLS 1.3: the server checks the client's certificate after the client thinks the
    # handshake is done, so a refused certificate shows up as the server hanging up
    ("socket closed", "the server closed the connection: it did not accept this client's certificate "
                      "(is client.crt signed by the server's CA?)"),
    ("connection reset", "the server reset the connection: it did not accept this client's certificate "
                         "(is client.crt signed by the server's CA?)"),
    ("end of tcp stream", "the server closed the connection: it did not accept this client's certificate "
                          "(is client.crt signed by the server's CA?)"),
    ("ssl", "TLS error"), ("tls", "TLS error"), ("handshake", "TLS error"), ("tsi_", "TLS error"),
    ("certificate", "TLS error"), ("verification", "TLS error"),
)
# ... and on a plain channel, that the server hung up on our plaintext (it speaks TLS)
_HUNG_UP_SIGNS = ("socket closed", "connection reset", "end of tcp stream", "broken pipe")


def explain_failure(error: Unavailable, target: str, *, secure: bool,
                    server_name: str | None = None) -> Unavailable:
    """Name TLS in a failure to connect that looks like a failed handshake.

    A TLS client whose handshake fails (its certificate refused, or the
    server's not signed by our CA) and a plain client hung up on by a TLS
    listener both get only a terse transport error from gRPC; say what it
    most likely means. Other failures (connection refused, a stream broken
    after it was established, timeouts) pass unchanged. ``server_name``: the
    name checked in the server's certificate, if not the target's host.
    """
    text = error.message.lower()
    if "failed to connect" not in text or "connection refused" in text:
        return error
    if secure:
        host = server_name or target.rsplit(":", 1)[0]
        for fragment, meaning in _TLS_FAILURES:
            if fragment in text:
                return Unavailable(f"TLS handshake with {target} failed: {meaning.format(host=host)} "
                                   f"({error.message})", **error.details)
        return error
    if any(s in text for s in _HUNG_UP_SIGNS):
        return Unavailable(
            f"connection to {target} was closed by the server before any call: it most likely requires "
            f"TLS; connect with tls=<directory of `oribus certs init`> (command line: --tls-dir DIR) "
            f"({error.message})", **error.details
        )
    return error
