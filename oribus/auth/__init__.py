"""Agent identity and access rules (specs/auth.md): the sans-IO core and the files it reads.

A bus started with ``--auth D`` checks, on every call and before any shard is contacted,
who the caller is and whether its roles allow the operation on every key it names::

    credential.py   where a credential travels: the bearer token of the call in progress
                    (a context variable the transports set), ``Authorization`` parsing
    keys.py         the auth directory's layout, Ed25519 signing and verification keys,
                    key ids, rotation and retirement
    tokens.py       ``Identity``; issuing a JWT (EdDSA) and verifying one, each refusal
                    naming its reason
    revocation.py   the revoked token ids (``D/revoked``), one line per id
    policy.py       ``policy.yaml``: roles granting operations on key patterns; load and
                    validate, failing on anything it does not understand
    rules.py        the decision per operation and key (``decide``), and who owns a session
                    (``SessionOwners``): plain functions over plain objects
    authority.py    ``Authority``: the directory loaded, followed (a change applies within
                    a second, a file that does not parse keeps the previous rules) and a
                    cache of verified tokens; what the bus's guard asks

Nothing here imports the bus, a shard or a transport: the guard that enforces these
decisions on a bus is ``oribus.bus.guarded``; the transports only carry the token.
"""

from oribus.auth.authority import Authority
from oribus.auth.policy import Policy, Role
from oribus.auth.rules import Decision, Operation, SessionOwners, decide
from oribus.auth.tokens import Identity

__all__ = ["Authority", "Decision", "Identity", "Operation", "Policy", "Role", "SessionOwners", "decide"]
