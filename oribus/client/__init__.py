"""The client API: sessions, transactions, sync and async, over any ``BusService``.

The embedded engine is opened by ``oribus.open_local`` (``oribus.local``), which
joins these sessions to an in-process bus; this package imports no server module.
"""

from oribus.client.remote import Client, connect
from oribus.client.retry import RetryPolicy
from oribus.client.session import AsyncSession, Transaction
from oribus.client.sync import SyncSession, SyncTransaction, SyncWatch
from oribus.client.watch import WatchStream
from oribus.rpc.bus_client import RemoteBus
from oribus.rpc.wire import DEFAULT_BUS_ADDRESS
from oribus.types import DELETE, Item, SessionRef, Version, WatchEvent

__all__ = [
    "DEFAULT_BUS_ADDRESS",
    "Client",
    "RemoteBus",
    "connect",
    "DELETE",
    "AsyncSession",
    "Item",
    "RetryPolicy",
    "SessionRef",
    "SyncSession",
    "SyncTransaction",
    "SyncWatch",
    "Transaction",
    "Version",
    "WatchEvent",
    "WatchStream",
]
