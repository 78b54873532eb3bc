"""The client API: sessions, transactions, sync and async, embedded or remote."""

from oribus.client.local import open_local, open_local_sync
from oribus.client.remote import Client, RemoteBus, connect
from oribus.client.retry import RetryPolicy
from oribus.client.session import AsyncSession, Transaction
from oribus.client.sync import SyncSession, SyncTransaction, SyncWatch
from oribus.client.watch import WatchStream
from oribus.types import DELETE, Item, SessionRef, Version, WatchEvent

__all__ = [
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
    "open_local",
    "open_local_sync",
]
