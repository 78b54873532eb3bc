"""oribus under LangGraph: a checkpointer and a store (``pip install 'oribus[langgraph]'``).

- ``OribusSaver``: a ``BaseCheckpointSaver``. Two runs that start from the same
  checkpoint of a thread cannot both extend it: the second's put raises
  ``CheckpointRaced`` naming the checkpoint it raced (or, with
  ``on_race="rebase"``, lands on top of it).
- ``OribusStore``: a ``BaseStore``. A put of an item the same task (or thread) got
  earlier is refused with ``ItemChanged`` (an ``oribus.Conflict``) if the item
  changed since, so two branches that read-modify-write one memory cannot
  silently lose an update.

Example::

    import oribus
    from oribus.integrations.langgraph import OribusSaver, OribusStore

    async with oribus.open_local("./data", agent="graphs") as bus:
        graph = builder.compile(checkpointer=OribusSaver(bus), store=OribusStore(bus))
        await graph.ainvoke(inputs, {"configurable": {"thread_id": "t1"}})
"""

from oribus.integrations.langgraph.saver import CheckpointRaced, OribusSaver, RacePolicy
from oribus.integrations.langgraph.store import ItemChanged, OribusStore

__all__ = ["CheckpointRaced", "ItemChanged", "OribusSaver", "OribusStore", "RacePolicy"]
