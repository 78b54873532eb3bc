"""``oribus auth``: the commands that manage an auth directory (specs/auth.md §3).

::

    oribus auth init   --dir D [--force]          signing key, its public half, policy.yaml, config.yaml
    oribus auth token  --dir D --agent NAME --role ROLE [--role ...] [--ttl 24h] [--act-for NAME|*]
                                                  prints a token (and nothing else) on stdout
    oribus auth revoke [--dir D] [--etcd E [--cluster C]] TOKEN_ID [--until EXP]
    oribus auth rotate --dir D                    a new signing key; the old public key stays
    oribus auth retire --dir D KID                remove a verification key
    oribus auth push   --dir D --etcd E [--cluster C]
                                                  D's verification keys, policy and revocations
                                                  into the cluster's etcd (never the signing key)

A running bus (``--auth D``) follows the directory: revocations, rotations, retirements
and policy edits apply within a second. In cluster mode the buses follow what ``push``
stored in etcd instead (``oribus.auth.published``): after a rotation, a retirement or a
policy edit in ``D``, push again; ``revoke --etcd`` revokes in etcd directly (with
``--dir`` too, in both). ``oribus.cli`` registers these on its parser, and gives the two
that reach etcd their etcd half (this package does no network IO).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from oribus.auth.authority import load_config
from oribus.auth.keys import (
    AuthDir,
    load_signing_key,
    new_signing_key,
    retire_key,
    write_atomically,
)
from oribus.auth.policy import STARTER_POLICY, load_policy_text
from oribus.auth.revocation import revoke
from oribus.auth.tokens import DEFAULT_ISSUER, issue, parse_ttl
from oribus.errors import InvalidRequest

# the etcd half of a command (oribus.cli): does it, returns what to print of it
EtcdCommand = Callable[[argparse.Namespace], dict[str, object]]

STARTER_CONFIG = f"""\
# oribus auth configuration (specs/auth.md §3)
issuer: {DEFAULT_ISSUER}    # the iss claim of issued tokens, checked by every bus
default_ttl: 24h    # the lifetime of a token when `oribus auth token` is not given --ttl
"""


def _print(obj: object) -> None:
    print(json.dumps(obj, ensure_ascii=False))


def cmd_init(args: argparse.Namespace) -> int:
    d = AuthDir(Path(args.dir))
    if d.signing_key.exists() and not args.force:
        raise InvalidRequest(f"{d.signing_key} exists: `oribus auth rotate` makes a new key (or --force)")
    d.root.mkdir(parents=True, exist_ok=True)
    kid = new_signing_key(d)
    for path, text in ((d.policy, STARTER_POLICY), (d.config, STARTER_CONFIG)):
        if args.force or not path.exists():
            write_atomically(path, text.encode())
    _print({"dir": str(d.root), "kid": kid, "signing_key": str(d.signing_key), "policy": str(d.policy)})
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    d = AuthDir(Path(args.dir))
    config = load_config(d)
    policy = load_policy_text(d.policy.read_text(encoding="utf-8"), str(d.policy)) if d.policy.exists() else None
    if policy is not None:  # a token for a role the bus does not know would be refused on every call
        unknown = [r for r in args.role if r not in policy.roles]
        if unknown:
            raise InvalidRequest(f"roles not in {d.policy}: {unknown} (known: {sorted(policy.roles)})")
    kid, key = load_signing_key(d)
    ttl = parse_ttl(args.ttl) if args.ttl else config["default_ttl"]
    print(issue(key, kid, agent=args.agent, roles=args.role, now=time.time(), ttl=ttl,
                issuer=config["issuer"], act_for=args.act_for or ()))
    return 0


def cmd_revoke(args: argparse.Namespace, in_etcd: EtcdCommand | None = None) -> int:
    if not args.dir and not args.etcd:
        raise InvalidRequest("oribus auth revoke needs --dir D (the directory's list), --etcd E (the cluster's), "
                             "or both")
    d = AuthDir(Path(args.dir)) if args.dir else None
    if d is not None and not d.root.is_dir():
        raise InvalidRequest(f"{d.root} is not an auth directory")
    out: dict[str, object] = {"revoked": args.token_id, "until": args.until or 0}
    if args.etcd:  # first: a refused id (or an unreachable etcd) leaves the directory as it was too
        assert in_etcd is not None, "oribus.cli gives revoke its etcd half"
        out["etcd"] = in_etcd(args)
    if d is not None:
        revoke(d.revoked, args.token_id, args.until or 0, time.time())
        out["dir"] = str(d.root)
    _print(out)
    return 0


def cmd_push(args: argparse.Namespace, in_etcd: EtcdCommand | None = None) -> int:
    assert in_etcd is not None, "oribus.cli gives push its etcd half"
    _print({"dir": args.dir, **in_etcd(args)})
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    d = AuthDir(Path(args.dir))
    old, _ = load_signing_key(d)
    kid = new_signing_key(d)
    _print({"kid": kid, "previous": old, "note": f"tokens signed by {old} verify until `oribus auth retire "
                                                 f"--dir {d.root} {old}`"})
    return 0


def cmd_retire(args: argparse.Namespace) -> int:
    retire_key(AuthDir(Path(args.dir)), args.kid)
    _print({"retired": args.kid})
    return 0


def add_commands(sub: argparse._SubParsersAction, *, cluster_options: Callable[[argparse.ArgumentParser], None],
                 push: EtcdCommand, revoke_in_etcd: EtcdCommand) -> None:
    """``oribus auth ...`` on the command line's subcommands. ``cluster_options`` adds
    ``--etcd``/``--cluster``; ``push`` and ``revoke_in_etcd`` do the etcd half of those
    commands and return what to print of it."""
    p = sub.add_parser("auth", help="agent identities: signing keys, tokens, revocation (specs/auth.md)")
    auth = p.add_subparsers(dest="auth_command", required=True)

    def command(name: str, help: str, dir_required: bool = True) -> argparse.ArgumentParser:
        q = auth.add_parser(name, help=help)
        q.add_argument("--dir", required=dir_required,
                       help="the auth directory (what `oribus up|bus --auth` reads)")
        return q

    q = command("init", "create the signing key, its public half, a starter policy.yaml and config.yaml")
    q.add_argument("--force", action="store_true", help="replace an existing signing key and files")
    q.set_defaults(fn=cmd_init)
    q = command("token", "print a signed token for an agent on stdout")
    q.add_argument("--agent", required=True, help="the agent name the token proves")
    q.add_argument("--role", action="append", required=True, help="a role of policy.yaml (repeatable)")
    q.add_argument("--ttl", help="lifetime: 90s, 30m, 24h, 7d (default: config.yaml's default_ttl)")
    q.add_argument("--act-for", action="append", metavar="AGENT",
                   help="another agent this token may name in requests, or * (repeatable)")
    q.set_defaults(fn=cmd_token)
    q = command("revoke", "refuse a token by its id (jti) from now on, on every bus following the directory "
                          "(--dir) or the cluster's etcd (--etcd)", dir_required=False)
    q.add_argument("token_id")
    q.add_argument("--until", type=int, help="the token's exp (seconds since the epoch): the line is dropped after "
                                             "it (default: kept for good)")
    cluster_options(q)
    q.set_defaults(fn=lambda args: cmd_revoke(args, revoke_in_etcd))
    q = command("rotate", "make a new signing key; tokens of the old one verify until it is retired")
    q.set_defaults(fn=cmd_rotate)
    q = command("retire", "remove a verification key: tokens it signed are refused from now on")
    q.add_argument("kid")
    q.set_defaults(fn=cmd_retire)
    q = command("push", "store the directory's verification keys, policy and revocations in the cluster's etcd, "
                        "which every bus of the cluster run with --auth follows (never the signing key)")
    cluster_options(q)
    q.set_defaults(fn=lambda args: cmd_push(args, push))
