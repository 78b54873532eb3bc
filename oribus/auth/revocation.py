"""The revoked token ids, ``D/revoked`` (specs/auth.md §3).

A text file, one revoked token per line::

    <jti> <until>

``until`` is the revoked token's ``exp`` in whole seconds since the epoch (``0``: not
known, kept for good). Past it (and the tokens' leeway, ``tokens.LEEWAY_SECONDS``, during
which a bus still accepts an expired token) the token is refused as expired anyway, so
``revoke`` drops those lines when it rewrites the file. Blank lines and
lines starting with ``#`` are ignored; any other line that does not have this shape
makes the whole file refused (the bus keeps the list it had: failing open would
un-revoke every token).
"""

from __future__ import annotations

import re
from pathlib import Path

from oribus.auth.keys import write_atomically
from oribus.auth.tokens import LEEWAY_SECONDS
from oribus.errors import InvalidRequest

_LINE = re.compile(r"^(\S{1,256}) (\d{1,12})$")


def parse_revoked(text: str, source: str = "revoked") -> dict[str, int]:
    """jti -> until of every line; InvalidRequest naming the first bad line."""
    out: dict[str, int] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise InvalidRequest(f"{source}:{n}: expected '<token id> <until>', got {line[:80]!r}")
        out[m.group(1)] = int(m.group(2))
    return out


def format_revoked(revoked: dict[str, int]) -> str:
    return "".join(f"{jti} {until}\n" for jti, until in sorted(revoked.items()))


def load_revoked(path: Path) -> dict[str, int]:
    """The revoked ids of ``path`` (a missing file: none)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    return parse_revoked(text, str(path))


def revoke(path: Path, token_id: str, until: int, now: float) -> dict[str, int]:
    """Add ``token_id`` (kept until ``until``; 0: for good) and drop the ids past theirs."""
    if not token_id or any(c.isspace() for c in token_id) or len(token_id) > 256:
        raise InvalidRequest(f"{token_id!r} is not a token id")
    # kept through the leeway: dropped earlier, the token would verify again for up to 30 s
    revoked = {j: u for j, u in load_revoked(path).items() if u == 0 or u + LEEWAY_SECONDS >= now}
    before = revoked.get(token_id)
    revoked[token_id] = 0 if not until or before == 0 else max(until, before or 0)
    write_atomically(path, format_revoked(revoked).encode())
    return revoked
