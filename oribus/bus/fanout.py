"""Calls to several shards at once, with one task fewer than ``asyncio.gather``.

A read or a commit of the bus usually reaches one or two shards. ``asyncio.gather`` wraps
every coroutine in a task (each one registered, scheduled and started a loop turn later) and
adds a future of its own; ``fan_out`` runs the first coroutine in the caller's own task and
only the others as tasks, and awaits them one by one. The caller may run outside any task (a
call's first step on a server, ``wire.start_eagerly``). Same results, same order, same
exceptions: the first to fail is raised (with ``return_exceptions``, returned in its place);
the others run to their end all the same, as under ``gather``, and a cancellation of the
caller cancels them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def fan_out(coros: list[Coroutine[Any, Any, Any]], *, return_exceptions: bool = False) -> list[Any]:
    if not coros:
        return []
    loop = asyncio.get_running_loop()
    others = [loop.create_task(c) for c in coros[1:]]
    results: list[Any] = []
    failed: BaseException | None = None
    try:
        for aw in (coros[0], *others):
            try:
                results.append(await aw)
            except asyncio.CancelledError:
                me = asyncio.current_task()  # None in a call's first step, run outside any task
                if not isinstance(aw, asyncio.Task) or me is None or me.cancelling() or not return_exceptions:
                    raise  # the caller is cancelled, or a call was (raised, as gather does)
                results.append(asyncio.CancelledError())
            except Exception as e:
                if not return_exceptions:
                    failed = e
                    raise
                results.append(e)
    except BaseException:
        for t in others:
            if failed is None:
                t.cancel()  # the caller is cancelled: so are the calls it started
            elif not t.done():
                t.add_done_callback(_retrieve)  # runs to its end; its own error is not reported
            else:
                _retrieve(t)
        raise
    return results


def _retrieve(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
