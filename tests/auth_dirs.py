"""An auth directory for tests: ``oribus auth init``, then the test's own policy."""

from __future__ import annotations

from pathlib import Path

from oribus.auth.keys import AuthDir
from oribus.cli import main


def init_auth_dir(root: Path, policy: str) -> AuthDir:
    """A fresh signing key and starter files in ``root`` (as the CLI makes them), ``policy``
    written over the starter policy."""
    assert main(["auth", "init", "--dir", str(root)]) == 0
    d = AuthDir(root)
    d.policy.write_text(policy)
    return d
