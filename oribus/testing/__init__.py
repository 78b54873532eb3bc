"""Testing your agents against oribus: a pytest plugin, recorded histories, and Hypothesis.

- ``plugin``: the fixtures ``oribus_bus``, ``oribus_server`` and ``oribus_history``
  (registered by ``pip install oribus``; see there);
- ``recording``: ``Recording``, which records every read and commit of the sessions
  over a bus as a history and checks it (``oribus.checker``, ``specs/history.md``);
- ``interleave``: ``Interleaving``, your agents over one embedded engine, one bus call
  at a time in a chosen order, with crashes and restarts of the engine between calls;
- ``strategies`` and ``machine`` (need Hypothesis: ``pip install 'oribus[testing]'``):
  strategies for agent steps and fault schedules, and ``AgentMachine``, a
  ``RuleBasedStateMachine`` that interleaves your agents with crashes, checks every
  run's history and your invariant, and shrinks a failing interleaving.

Only the public SDK is needed in your code: an agent is an async callable given an
``oribus.AsyncSession``. ``examples/lost_update.py`` shows the whole of it.
"""
