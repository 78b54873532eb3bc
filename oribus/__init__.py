"""oribus — a distributed state bus for fleets of agents, with Observable-Read Isolation.

No agent can commit work based on state it read that has since changed: the
server checks every commit against what it actually delivered to that agent.

    import oribus

    async with oribus.open_local("./data", shards=4, agent="planner") as bus:
        plan = await bus.get("plan")
        await bus.commit({"plan": {"step": 2}})
"""

from oribus.client import (
    DELETE,
    AsyncSession,
    Client,
    Item,
    RetryPolicy,
    SessionRef,
    SyncSession,
    SyncTransaction,
    SyncWatch,
    Transaction,
    Version,
    WatchEvent,
    WatchStream,
    connect,
)
from oribus.errors import (
    Aborted,
    Conflict,
    DataCorrupted,
    DataDirLocked,
    HistoryTruncated,
    InvalidRequest,
    LimitExceeded,
    OribusError,
    PermissionDenied,
    SessionExpired,
    Stale,
    Unauthenticated,
    Unavailable,
    ValueTooLarge,
    WatchLagged,
)
from oribus.local import open_local, open_local_sync
from oribus.tls import TlsConfig

__version__ = "0.1.0"

__all__ = [
    "Client",
    "connect",
    "DELETE",
    "Aborted",
    "AsyncSession",
    "Conflict",
    "DataCorrupted",
    "DataDirLocked",
    "HistoryTruncated",
    "InvalidRequest",
    "Item",
    "LimitExceeded",
    "OribusError",
    "PermissionDenied",
    "RetryPolicy",
    "SessionExpired",
    "SessionRef",
    "Stale",
    "SyncSession",
    "SyncTransaction",
    "SyncWatch",
    "TlsConfig",
    "Transaction",
    "Unauthenticated",
    "Unavailable",
    "ValueTooLarge",
    "Version",
    "WatchEvent",
    "WatchLagged",
    "WatchStream",
    "open_local",
    "open_local_sync",
]
