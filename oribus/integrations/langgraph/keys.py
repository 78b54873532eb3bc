"""Where the LangGraph integration keeps its data in oribus: the key layout.

Every name a caller chooses (thread id, checkpoint namespace, channel, store
namespace label, store key) becomes one key segment, percent-encoded so that
``/``, ``%`` and control characters cannot split or break it; the empty string,
which the root checkpoint namespace is, becomes ``~`` (a percent-encoded name
never is: its own ``~`` is written ``%7E``).

Checkpoints, under ``<root>`` (``lg`` unless the saver is given another)::

    <root>/threads                          sorted list of every thread id (list() over all threads)
    <root>/t/<thread>                       {"ns": [checkpoint namespaces of the thread]}
    <root>/t/<thread>/<ns>                  the thread head: {"ids": [checkpoint ids, ascending]};
                                            its last id is the newest checkpoint
    <root>/t/<thread>/<ns>/c/<id>           one checkpoint: checkpoint (without channel values),
                                            metadata, parent id
    <root>/t/<thread>/<ns>/w/<id>           the pending writes of checkpoint <id>
    <root>/t/<thread>/<ns>/b/<channel>/<v>  one channel value at channel version <v>

A put writes the checkpoint, its new channel values and the head in one commit,
so a listing (which starts from the head) never sees half a checkpoint.

Store items, under ``<root>`` (``lgs`` unless given another)::

    <root>/namespaces                       sorted list of every namespace (as lists of labels)
    <root>/n/<label>/.../<label>            {"keys": [item keys of that namespace, sorted]}
    <root>/n/<label>/.../<label>/=<key>     one item: value, created_at, updated_at, expires_at
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import quote, unquote

EMPTY = "~"


def segment(name: str) -> str:
    """``name`` as one key segment (reversible with ``name_of``)."""
    if not isinstance(name, str):
        raise TypeError(f"a name in a key must be a str, not {type(name).__name__}")
    if name == "":
        return EMPTY
    return quote(name, safe="").replace("~", "%7E")


def name_of(seg: str) -> str:
    """The name a segment encodes."""
    return "" if seg == EMPTY else unquote(seg)


class CheckpointKeys:
    """The keys of the checkpoint saver under one root."""

    def __init__(self, root: str = "lg") -> None:
        self.root = root
        self.threads = f"{root}/threads"

    def thread(self, thread_id: str) -> str:
        return f"{self.root}/t/{segment(thread_id)}"

    def head(self, thread_id: str, ns: str) -> str:
        return f"{self.thread(thread_id)}/{segment(ns)}"

    def checkpoint(self, thread_id: str, ns: str, checkpoint_id: str) -> str:
        return f"{self.head(thread_id, ns)}/c/{segment(checkpoint_id)}"

    def writes(self, thread_id: str, ns: str, checkpoint_id: str) -> str:
        return f"{self.head(thread_id, ns)}/w/{segment(checkpoint_id)}"

    def blob(self, thread_id: str, ns: str, channel: str, version: str | int | float) -> str:
        return f"{self.head(thread_id, ns)}/b/{segment(channel)}/{segment(str(version))}"


class StoreKeys:
    """The keys of the store under one root."""

    def __init__(self, root: str = "lgs") -> None:
        self.root = root
        self.namespaces = f"{root}/namespaces"

    def namespace(self, namespace: Sequence[str]) -> str:
        return "/".join([f"{self.root}/n", *(segment(label) for label in namespace)])

    def item(self, namespace: Sequence[str], key: str) -> str:
        return f"{self.namespace(namespace)}/={segment(key)}"
