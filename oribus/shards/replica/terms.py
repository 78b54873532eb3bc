"""The terms of a member's log: which term each record was appended in (``specs/replication.md`` §2).

Every term's records begin with the ``TERM_START`` record its primary appended before it
served (``oribus.shards.wal.record``), so the terms of a log are a short table::

    term -> first LSN of the term        e.g.  {1: 1, 3: 812, 4: 9070}

and the term of record ``lsn`` is that of the last entry whose first LSN is at or below it.
A member rebuilds the table when it opens from the snapshot (which keeps the table of the
records it covers, under ``"terms"``) and the ``TERM_START`` records of the log after it,
extends it as ``TERM_START`` records arrive, and cuts it when it cuts a divergent tail.
Records below the first entry (a log written before the shard was replicated) are in term 0.

A log position is ``(term_at(lsn), lsn)``; the empty log's is ``(0, 0)``.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable

from oribus.shards.replica.messages import Position


class Terms:
    """The table ``term -> first LSN`` of one log, in log order (terms and LSNs both rise)."""

    __slots__ = ("_terms", "_firsts")

    def __init__(self, entries: Iterable[tuple[int, int]] = ()) -> None:
        self._terms: list[int] = []
        self._firsts: list[int] = []
        for term, first in entries:
            self.start(term, first)

    def start(self, term: int, first_lsn: int) -> None:
        """Term ``term`` begins at ``first_lsn`` (its ``TERM_START`` record). A repeat of an
        entry is a no-op (a replay of records a snapshot's table already holds)."""
        if self._terms:
            i = bisect.bisect_left(self._terms, term)
            if i < len(self._terms) and self._terms[i] == term and self._firsts[i] == first_lsn:
                return
            if term <= self._terms[-1] or first_lsn <= self._firsts[-1]:
                raise ValueError(
                    f"term {term} at LSN {first_lsn} does not follow term {self._terms[-1]} "
                    f"at LSN {self._firsts[-1]}")
        if first_lsn < 1:
            raise ValueError(f"a term starts at an LSN >= 1, not {first_lsn}")
        self._terms.append(term)
        self._firsts.append(first_lsn)

    def term_at(self, lsn: int) -> int:
        """The term of the record at ``lsn`` (0 for LSN 0 and for records before any term)."""
        i = bisect.bisect_right(self._firsts, lsn) - 1
        return self._terms[i] if i >= 0 and lsn > 0 else 0

    def first_lsn_of(self, term: int) -> int | None:
        """The first LSN of ``term`` in this log (None: the log holds no record of it)."""
        i = bisect.bisect_left(self._terms, term)
        return self._firsts[i] if i < len(self._terms) and self._terms[i] == term else None

    def position(self, last_lsn: int) -> Position:
        """The position of the record at ``last_lsn``."""
        return (self.term_at(last_lsn), last_lsn)

    @property
    def last_term(self) -> int:
        """The highest term in the table (0: none)."""
        return self._terms[-1] if self._terms else 0

    def truncate_after(self, lsn: int) -> None:
        """Forget the terms that start after ``lsn`` (their records were cut)."""
        i = bisect.bisect_right(self._firsts, lsn)
        del self._terms[i:]
        del self._firsts[i:]

    def to_list(self, upto_lsn: int | None = None) -> list[list[int]]:
        """The table as ``[[term, first LSN], ...]`` (a snapshot's ``"terms"``), only the terms
        that start at or below ``upto_lsn`` if given."""
        return [[t, f] for t, f in zip(self._terms, self._firsts, strict=True)
                if upto_lsn is None or f <= upto_lsn]

    @classmethod
    def from_list(cls, entries: Iterable[Iterable[int]] | None) -> Terms:
        return cls((int(t), int(f)) for t, f in (entries or ()))

    def copy(self) -> Terms:
        return Terms(zip(self._terms, self._firsts, strict=True))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Terms) and self.to_list() == other.to_list()

    def __repr__(self) -> str:
        return f"Terms({dict(zip(self._terms, self._firsts, strict=True))})"
