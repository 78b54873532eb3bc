"""The operation mix of a verify run, drawn by Hypothesis from the run's seed.

Hypothesis draws a ``Mix``: a library of list-append transaction shapes (1-4
micro-operations, each a read or an append of a key index), a library of
agent-step picks (three distinct key indices: read all three, write the first
two) and the seed of the order in which each client walks through them. A
client then picks shapes from the library with ``random.Random(order seed,
client)``, so the same ``--seed`` replays the same operations per client (their
interleaving is the deployment's).

Drawn with ``@given`` under ``@seed(N)`` with the generate phase only, which is
deterministic; the first example Hypothesis tries is its simplest (every
shape a read of key 0), so the last of a few examples is kept.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from typing import Any

from oribus.checker.history import APPEND, READ
from oribus.checker.listappend import transaction_ops

SHAPES = 48  # list-append shapes in the library
STEPS = 32  # agent-step picks in the library
KEY_SPACE = 1024  # key indices are drawn below this and taken modulo the run's key count


@dataclass(frozen=True)
class Mix:
    shapes: tuple[tuple[tuple[str, int], ...], ...]  # list-append: ((op, key index), ...)
    steps: tuple[tuple[int, int, int], ...]  # agent-step: three key indices, distinct modulo the key count
    order_seed: int  # seeds each client's walk through the libraries

    def client_rng(self, client: str) -> random.Random:
        return random.Random(f"{self.order_seed}/{client}")

    def to_dict(self) -> dict[str, Any]:
        return {"shapes": [list(map(list, s)) for s in self.shapes], "steps": [list(s) for s in self.steps],
                "order_seed": self.order_seed}


def draw_mix(seed: int) -> Mix:
    """The mix for ``seed``: the same seed gives the same mix. Needs Hypothesis (``oribus[verify]``)."""
    try:
        from hypothesis import HealthCheck, Phase, given, settings
        from hypothesis import seed as hypothesis_seed
        from hypothesis import strategies as st
        from hypothesis.configuration import set_hypothesis_home_dir
    except ImportError as e:  # pragma: no cover - the extra is part of every test set-up
        raise ImportError("oribus verify needs Hypothesis: pip install 'oribus[verify]'") from e

    op = st.tuples(st.sampled_from([READ, APPEND]), st.integers(0, KEY_SPACE - 1))
    shape = st.lists(op, min_size=1, max_size=4).map(tuple)
    step = st.lists(st.integers(0, KEY_SPACE - 1), min_size=3, max_size=3).map(lambda s: (s[0], s[1], s[2]))
    drawn: list[Mix] = []

    @hypothesis_seed(seed)
    @settings(max_examples=3, database=None, phases=[Phase.generate], deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(shape, min_size=SHAPES, max_size=SHAPES), st.lists(step, min_size=STEPS, max_size=STEPS),
           st.integers(0, 2**32 - 1))
    def collect(shapes: list[tuple[tuple[str, int], ...]], steps: list[tuple[int, int, int]], order: int) -> None:
        drawn.append(Mix(tuple(shapes), tuple(steps), order))

    # Hypothesis caches what it learns under ./.hypothesis: not in the user's directory (read-only
    # in the Kubernetes Job), in a temporary one
    with tempfile.TemporaryDirectory(prefix="oribus-verify-") as home:
        set_hypothesis_home_dir(home)
        try:
            collect()
        finally:
            set_hypothesis_home_dir(None)
    return drawn[-1]


def list_append_ops(shape: tuple[tuple[str, int], ...], keys: list[str], next_element: Any) -> list[list[Any]]:
    """A shape's micro-operations over ``keys``, by the rule of ``checker.listappend``: a key is
    read at most once, never after the transaction appended to it, and an append reads its key first."""
    return transaction_ops(((kind, keys[index % len(keys)]) for kind, index in shape), next_element)


def step_keys(step: tuple[int, int, int], keys: list[str]) -> list[str]:
    """Three distinct keys for an agent step (needs at least three keys)."""
    picked: list[str] = []
    for index in step:
        i = index % len(keys)
        while keys[i] in picked:
            i = (i + 1) % len(keys)
        picked.append(keys[i])
    return picked
