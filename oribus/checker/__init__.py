"""Checking what clients saw against what oribus promises (``specs/history.md``).

- ``history``: the recorded events (JSON lines), their validation, and the
  ``Recorder`` clients call around every transaction;
- ``graph``: the dependency graph over committed transactions and its cycles;
- ``check``: every check over a history, giving a ``Report`` of anomalies;
- ``listappend``: the list-append workload that produces such histories
  through the SDK.

Example::

    rec = Recorder()
    await run_list_append(sessions, rec, txns=1500, seed=1)
    await record_final(sessions[0], rec)
    report = check(rec.events)
    print(report.summary())
"""

from oribus.checker.check import CATEGORIES, Anomaly, Report, check
from oribus.checker.history import (
    HistoryError,
    Recorder,
    Txn,
    read_history,
    transactions,
    write_history,
)
from oribus.checker.listappend import record_final, run_list_append

__all__ = [
    "CATEGORIES",
    "Anomaly",
    "HistoryError",
    "Recorder",
    "Report",
    "Txn",
    "check",
    "read_history",
    "record_final",
    "run_list_append",
    "transactions",
    "write_history",
]
