"""The auth directory and its keys (specs/auth.md §3).

Layout of ``D`` (``oribus auth init --dir D``)::

    D/signing.key        the Ed25519 private key tokens are signed with: PKCS#8 PEM, mode 0600.
                         Only ``oribus auth token`` reads it; a bus never needs it.
    D/keys/<kid>.pub     every verification key a bus accepts: SubjectPublicKeyInfo PEM. The
                         signing key's public half is one of them; after ``rotate`` the old
                         ones stay, so tokens they signed keep verifying until ``retire``.
    D/policy.yaml        the roles (``policy.py``)
    D/config.yaml        ``issuer`` (the ``iss`` claim) and ``default_ttl`` (``24h``)
    D/revoked            revoked token ids (``revocation.py``)

A key id (``kid``) is the first 16 hex digits of the SHA-256 of the raw 32-byte public
key: the same key always has the same id, and the file name says which key it is.
Writes go to a temporary file renamed into place, so a bus that reloads the directory
never reads half a file.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from oribus.auth.tokens import DEFAULT_ISSUER, DEFAULT_TTL_SECONDS, parse_ttl
from oribus.errors import InvalidRequest

SIGNING_KEY = "signing.key"
KEYS_DIR = "keys"
POLICY = "policy.yaml"
CONFIG = "config.yaml"
REVOKED = "revoked"
_KID = re.compile(r"^[0-9a-f]{16}$")


@dataclass(frozen=True)
class AuthDir:
    """The paths of one auth directory."""

    root: Path

    @property
    def signing_key(self) -> Path:
        return self.root / SIGNING_KEY

    @property
    def keys(self) -> Path:
        return self.root / KEYS_DIR

    @property
    def policy(self) -> Path:
        return self.root / POLICY

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def revoked(self) -> Path:
        return self.root / REVOKED

    def public_key_path(self, kid: str) -> Path:
        return self.keys / f"{kid}.pub"


def parse_config(text: str | None, source: str = CONFIG) -> dict[str, Any]:
    """``config.yaml``'s text (None: no file): ``issuer`` and ``default_ttl`` (seconds), with
    their defaults; InvalidRequest naming ``source`` for anything else."""
    try:
        data = (yaml.safe_load(text) if text is not None else None) or {}
    except yaml.YAMLError as e:
        raise InvalidRequest(f"{source} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or set(data) - {"issuer", "default_ttl"}:
        raise InvalidRequest(f"{source}: the fields are issuer and default_ttl")
    issuer = data.get("issuer", DEFAULT_ISSUER)
    if not isinstance(issuer, str) or not issuer:
        raise InvalidRequest(f"{source}: issuer must be a non-empty string")
    ttl = data.get("default_ttl", DEFAULT_TTL_SECONDS)
    return {"issuer": issuer, "default_ttl": parse_ttl(str(ttl))}


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """``data`` at ``path`` by a rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def new_signing_key(d: AuthDir) -> str:
    """A fresh signing key in ``d`` (replacing the current one) with its public half in
    ``keys/``; returns its kid. Older public keys stay (rotation)."""
    d.keys.mkdir(parents=True, exist_ok=True)
    private = Ed25519PrivateKey.generate()
    kid = key_id(private.public_key())
    pem_public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    write_atomically(d.public_key_path(kid), pem_public)
    pem_private = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    write_atomically(d.signing_key, pem_private, 0o600)
    return kid


def load_signing_key(d: AuthDir) -> tuple[str, Ed25519PrivateKey]:
    """(kid, private key) of ``d``; InvalidRequest naming the file if it is missing or bad."""
    try:
        key = serialization.load_pem_private_key(d.signing_key.read_bytes(), password=None)
    except FileNotFoundError:
        raise InvalidRequest(f"no signing key at {d.signing_key} (run `oribus auth init --dir {d.root}`)") from None
    except ValueError as e:
        raise InvalidRequest(f"{d.signing_key} is not a PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidRequest(f"{d.signing_key} is not an Ed25519 key")
    return key_id(key.public_key()), key


def load_verification_keys(d: AuthDir) -> dict[str, Ed25519PublicKey]:
    """kid -> public key for every ``keys/<kid>.pub``. A file that does not parse, is not
    Ed25519 or whose name is not its key's id raises InvalidRequest naming it: the caller
    keeps the keys it had (fail closed)."""
    out: dict[str, Ed25519PublicKey] = {}
    if not d.keys.is_dir():
        raise InvalidRequest(f"no verification keys: {d.keys} is not a directory")
    for path in sorted(d.keys.glob("*.pub")):
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except ValueError as e:
            raise InvalidRequest(f"{path} is not a PEM public key: {e}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise InvalidRequest(f"{path} is not an Ed25519 key")
        kid = key_id(key)
        if path.stem != kid:
            raise InvalidRequest(f"{path}: the file is named {path.stem} but holds the key {kid}")
        out[kid] = key
    if not out:
        raise InvalidRequest(f"no verification keys in {d.keys}")
    return out


def retire_key(d: AuthDir, kid: str) -> None:
    """Remove a verification key: tokens it signed stop verifying on every bus that follows
    ``d``. The current signing key cannot be retired (rotate first)."""
    if not _KID.match(kid):
        raise InvalidRequest(f"{kid!r} is not a key id (16 hex digits)")
    path = d.public_key_path(kid)
    if not path.exists():
        raise InvalidRequest(f"no key {kid} in {d.keys}")
    if d.signing_key.exists() and load_signing_key(d)[0] == kid:
        raise InvalidRequest(f"{kid} is the current signing key: `oribus auth rotate` first")
    path.unlink()
