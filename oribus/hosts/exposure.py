"""Whether a server is reachable from other machines, and the warning when it is without
``--auth`` (specs/auth.md §1: a bus without auth keeps today's behaviour for local
development, and says so loudly when it listens on an address other than loopback).
"""

from __future__ import annotations

import ipaddress
import logging

log = logging.getLogger("oribus.auth")


def is_loopback(address: str) -> bool:
    """Whether ``HOST:PORT`` (or ``unix:PATH``) is reachable only from this machine."""
    if not address or address.startswith("unix:"):
        return bool(address)
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or "" / 0.0.0.0-like wildcards: other machines may reach it


def warn_unauthenticated(addresses: list[str]) -> list[str]:
    """Log a warning naming each non-loopback address served without ``--auth``; returns them."""
    open_ = [a for a in addresses if a and not is_loopback(a)]
    if open_:
        log.warning(
            "NO AUTHENTICATION: %s reachable from other machines and any caller may read, commit "
            "and reset as any agent; start with --auth DIR (`oribus auth init --dir DIR`) "
            "or listen on 127.0.0.1", ", ".join(open_) + (" is" if len(open_) == 1 else " are"))
    return open_
