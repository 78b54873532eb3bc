"""``oribus verify``: the black-box consistency check users run against their own deployment.

It runs the suite's workloads against a live bus, through the public SDK (and
the HTTP API with ``--http``), under a key prefix of its own, records what the
clients saw as a history (``specs/history.md``), checks it with
``oribus.checker`` and reports; see ``oribus verify --help`` and the README's
"Verify your deployment".

- ``plan``: the operation mix, drawn by Hypothesis from the seed;
- ``workloads``: list-append and agent-step clients over the SDK and HTTP;
- ``nemesis``: ``--nemesis local``, kill -9 and SIGSTOP/SIGCONT of local processes, and with
  ``--start-local --replicas R`` faults aimed by role at the members of replica groups;
- ``groups``: the replica groups of a local ``oribus up --replicas R``: member processes, roles;
- ``local``: ``--start-local``, an ``oribus up --processes`` verify runs itself;
- ``report``: the summary, ``report.json`` and the self-contained ``report.html``;
- ``run``: one run from start to exit code.
"""

from oribus.verify.run import VerifyConfig, verify

__all__ = ["VerifyConfig", "verify"]
