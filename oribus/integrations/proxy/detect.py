"""Finding references to bus keys in LLM traffic (sans-IO: no sockets, no clock).

``KeyIndex`` holds what the proxy knows of the bus: the live keys under its prefixes and,
for the last ``versions_kept`` versions of each, fingerprints of the value. ``find``
returns the ``Ref``s a text makes:

- **by name**: a token of the text equal to a live key. Tokens are runs of characters
  other than white space, quotes, brackets and ``,;|``; trailing ``.:!?`` are not part of
  a token (a key ending a sentence), nor are markdown's ``*_~`` around it. A key containing white space is never found by
  name, and a key that is an ordinary word ("plan") matches that word wherever it is
  written: prefer keys with a namespace ("team-a/plan"), or serve only such prefixes.
- **by value**: a fingerprint of a version of a key occurs in the text. Text and
  fingerprints are compared with every white-space character removed, so re-indented
  or re-wrapped JSON still matches. A value's fingerprints are its compact JSON (a
  string value: the string itself), the same with sorted keys, the value as Python
  prints it (``str(value)``, what an f-string pastes), and each string inside
  it of at least ``MIN_FIELD_CHARS`` characters (a field pasted on its own). A
  fingerprint shorter than ``MIN_VALUE_CHARS`` is not kept: short values ("done", 3)
  occur everywhere and are found by their key's name or not at all. A fingerprint of at
  most ``WHOLE_UP_TO`` characters must occur whole; a longer one also matches when a
  fragment of it spanning ``FRAGMENT_WINDOWS`` of its windows occurs (part of a
  long document pasted). The version a value reference names is the newest version
  whose fingerprint matched — the current one when the text matches it too, since
  successive versions often share most of their content.

How it scans: windows of ``WINDOW`` characters start at every *anchor* character
(``_ANCHOR``: ``e``, ``0``, ``"``, ``:``, about one character in eight of prose or JSON)
of each fingerprint, and are indexed with their position; the text is looked up at its
own anchors only, so the same run of characters gives the same windows wherever it lies.
Each hit places a fingerprint in the text (a window shared by more than ``MAX_HOLDERS``
fingerprints places none); a whole fingerprint is confirmed by comparing it there, a
fragment by ``FRAGMENT_WINDOWS`` hits placing it at the same spot. A
fingerprint without an anchored window (a number without a 0) is searched for whole.

What is text: ``request_texts`` and ``response_texts`` take every string of a JSON body
(OpenAI chat completions and responses, Anthropic messages: messages, system prompts,
tool calls and results alike) except inline binary data; ``SseText`` reassembles a
streamed answer (``text/event-stream``): the pieces of each stream of deltas are joined
in order, so a key cut between two events is still found.
"""

from __future__ import annotations

import json
import re
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

WINDOW = 16
MIN_VALUE_CHARS = 16  # shorter fingerprints are not kept (see the module docstring)
MIN_FIELD_CHARS = 32  # a string inside a structured value is a fingerprint of its own from this length
WHOLE_UP_TO = 256  # fingerprints up to this length match only whole
FRAGMENT_WINDOWS = 8  # a longer one matches on this many of its windows, in place (about 70 characters)
# A window that many fingerprints share (a JSON schema's field names, a stock phrase) places
# none of them: it tells nothing apart and would cost a step per holder on every occurrence.
MAX_HOLDERS = 32
DEFAULT_VERSIONS_KEPT = 8  # versions of each key fingerprinted
DEFAULT_MAX_KEYS = 200_000  # keys indexed at most (the rest are not found)

# JSON members that carry no text an agent reads: inline binary data and bookkeeping.
_SKIPPED_MEMBERS = frozenset({"data", "b64_json", "image_url", "signature", "encrypted_content", "media_type",
                              "role", "type", "id", "object", "model", "system_fingerprint"})
_TOKEN = re.compile(r"[^\s\"'`()\[\]{}<>,;|]+")
_AROUND = "*_~"  # markdown emphasis around a token
_TRAILING = ".:!?"
# Where windows start, in a fingerprint and in a text alike: at these characters, so a shared
# run of text yields the same windows wherever it lies (content-defined, about one character
# in eight of prose or JSON). A text is looked up only there, not at every character.
_ANCHOR = re.compile(r'[e0":]')


def squeeze(text: str) -> str:
    """``text`` without white space: how texts and fingerprints are compared."""
    return "".join(text.split())


@dataclass(frozen=True, slots=True)
class Ref:
    """A reference to a key: by its name, or by the value of one of its versions."""

    key: str
    version: int | None  # by value: the version matched; by name: the index's current version, if known
    how: Literal["name", "value"]


def fingerprints(value: Any) -> list[str]:
    """The fingerprints of a value (squeezed), longest first; none for short values."""
    if value is None or isinstance(value, bytes | bytearray):
        return []
    out: set[str] = set()
    if isinstance(value, str):
        out.add(squeeze(value))
    else:
        try:
            out.add(squeeze(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)))
            out.add(squeeze(json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str,
                                       sort_keys=True)))
        except (TypeError, ValueError):  # keys json cannot sort (mixed types): the first form only
            pass
        out.add(squeeze(repr(value)))  # as Python prints it: an f-string of the value
        for s in _strings(value):
            if len(s) >= MIN_FIELD_CHARS:
                out.add(squeeze(s))
    return sorted((f for f in out if len(f) >= MIN_VALUE_CHARS), key=len, reverse=True)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str):
                yield k
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


@dataclass(slots=True)
class _Print:
    key: str
    version: int
    text: str
    windows: list[tuple[int, str]]  # (position, window) of each anchored window of ``text``


@dataclass(slots=True)
class _Versions:
    current: int = 0
    deleted: bool = False
    prints: deque[tuple[int, list[int]]] = field(default_factory=deque)  # (version, fingerprint ids), oldest first


def _anchored(text: str) -> list[tuple[int, str]]:
    """The windows of ``text`` that start at an anchor character (see the module docstring)."""
    end = len(text) - WINDOW
    return [(at, text[at:at + WINDOW]) for m in _ANCHOR.finditer(text, 0, end + 1) if (at := m.start()) <= end]


class KeyIndex:
    """The keys and value fingerprints the proxy matches text against.

    Fed by ``put`` and ``delete`` (from a scan and a watch of the bus); an older version
    than one already known is ignored, so the two may overlap in any order.
    """

    def __init__(self, *, versions_kept: int = DEFAULT_VERSIONS_KEPT, max_keys: int = DEFAULT_MAX_KEYS,
                 ignored_prefixes: tuple[str, ...] = ()) -> None:
        self.versions_kept = versions_kept
        self.max_keys = max_keys
        self.ignored_prefixes = ignored_prefixes
        self.names: set[str] = set()  # live keys
        self._keys: dict[str, _Versions] = {}
        self._prints: dict[int, _Print] = {}
        self._windows: dict[str, list[tuple[int, int]]] = {}  # window -> (fingerprint id, its position there)
        self._plain: set[int] = set()  # fingerprints without an anchored window: searched whole
        self._next_id = 0
        self.full = False  # max_keys reached: later keys are not indexed

    def __len__(self) -> int:
        return len(self.names)

    def current(self, key: str) -> int | None:
        """The newest version of ``key`` the index knows, None if it knows none."""
        v = self._keys.get(key)
        return v.current if v is not None else None

    def put(self, key: str, version: int, value: Any) -> None:
        """Version ``version`` of ``key`` now holds ``value``."""
        if key.startswith(self.ignored_prefixes):
            return
        known = self._keys.get(key)
        if known is None:
            if len(self._keys) >= self.max_keys:
                self.full = True
                return
            known = self._keys[key] = _Versions()
        if version <= known.current:
            return
        known.current = version
        known.deleted = False
        self.names.add(key)
        ids = [self._add_print(key, version, f) for f in fingerprints(value)]
        known.prints.append((version, ids))
        while len(known.prints) > self.versions_kept:
            _, old = known.prints.popleft()
            for i in old:
                self._drop_print(i)

    def delete(self, key: str, version: int) -> None:
        """``key`` was deleted, making ``version``: its name no longer refers to it."""
        known = self._keys.get(key)
        if known is None or version <= known.current:
            return
        known.current = version
        known.deleted = True
        self.names.discard(key)

    def _add_print(self, key: str, version: int, text: str) -> int:
        i = self._next_id
        self._next_id += 1
        p = self._prints[i] = _Print(key, version, text, _anchored(text))
        if not p.windows:
            self._plain.add(i)
        for at, window in p.windows:
            self._windows.setdefault(window, []).append((i, at))
        return i

    def _drop_print(self, i: int) -> None:
        p = self._prints.pop(i)
        self._plain.discard(i)
        for window in {w for _, w in p.windows}:
            held = self._windows.get(window)
            if held is None:
                continue
            held[:] = [h for h in held if h[0] != i]
            if not held:
                del self._windows[window]

    # ---- matching ------------------------------------------------------------------------

    def find(self, texts: Iterable[str]) -> list[Ref]:
        """Every reference ``texts`` make, one per (key, how), value references naming
        the newest matching version; sorted by key."""
        names: dict[str, Ref] = {}
        values: dict[str, int] = {}
        for text in texts:
            if not text:
                continue
            for tok in _TOKEN.findall(text):
                key = tok.strip(_AROUND).rstrip(_TRAILING)
                if key in self.names and key not in names:
                    names[key] = Ref(key, self.current(key), "name")
            for key, version in self._values_in(squeeze(text)):
                if version > values.get(key, -1):
                    values[key] = version
        refs = list(names.values()) + [Ref(k, v, "value") for k, v in values.items()]
        refs.sort(key=lambda r: (r.key, r.how))
        return refs

    def _values_in(self, text: str) -> Iterator[tuple[str, int]]:
        if len(text) < MIN_VALUE_CHARS:
            return
        windows = self._windows
        placed: dict[tuple[int, int], int] = {}  # (fingerprint, where it would start in text) -> windows there
        for m in _ANCHOR.finditer(text, 0, len(text) - WINDOW + 1):
            at = m.start()
            held = windows.get(text[at:at + WINDOW])
            if held is not None and len(held) <= MAX_HOLDERS:
                for i, pos in held:
                    k = (i, at - pos)
                    placed[k] = placed.get(k, 0) + 1
        matched: set[int] = set()
        for (i, start), n in placed.items():
            if i in matched:
                continue
            p = self._prints[i]
            if len(p.text) <= WHOLE_UP_TO:
                found = text.startswith(p.text, start) if start >= 0 else False
            else:
                found = n >= min(FRAGMENT_WINDOWS, len(p.windows))
            if found:
                matched.add(i)
        for i in self._plain:
            if self._prints[i].text in text:
                matched.add(i)
        for i in matched:
            yield self._prints[i].key, self._prints[i].version


# ---- the texts of a request or an answer ---------------------------------------------------


def json_strings(doc: Any, out: list[str] | None = None) -> list[str]:
    """Every string of a decoded JSON document an agent or a model reads (see
    ``_SKIPPED_MEMBERS``), in document order."""
    if out is None:
        out = []
    if isinstance(doc, str):
        if not doc.startswith("data:"):  # inline data URLs (images, files)
            out.append(doc)
    elif isinstance(doc, dict):
        for k, v in doc.items():
            if k not in _SKIPPED_MEMBERS:
                json_strings(v, out)
    elif isinstance(doc, list):
        for v in doc:
            json_strings(v, out)
    return out


def body_texts(body: bytes) -> list[str]:
    """The texts of a request or a whole (not streamed) answer: the strings of its JSON,
    or the body as text when it is not JSON."""
    if not body:
        return []
    try:
        return json_strings(json.loads(body))
    except (ValueError, RecursionError):
        return [body.decode("utf-8", "replace")]


request_texts = body_texts
response_texts = body_texts


class SseText:
    """The texts of a ``text/event-stream`` answer, fed as its bytes arrive.

    Each event's ``data`` is decoded as JSON. A ``delta`` (OpenAI chat completions:
    ``choices[i].delta``; OpenAI responses: a string ``delta`` with its output and
    content index; Anthropic: ``delta`` with the block ``index``) is a piece of one stream
    of text, joined with the pieces before it; the strings of any other event are texts
    of their own. ``done`` turns true once a terminal event has been fed (``[DONE]``,
    ``message_stop``, ``response.completed`` / ``failed`` / ``incomplete``).
    """

    def __init__(self, max_chars: int = 4 << 20) -> None:
        self.max_chars = max_chars
        self.done = False
        self.truncated = False  # more than max_chars of text: the rest was not kept
        self._partial = b""
        self._data: list[str] = []
        self._streams: dict[str, list[str]] = {}
        self._texts: list[str] = []
        self._chars = 0

    def feed(self, chunk: bytes) -> None:
        buf = self._partial + chunk
        lines = buf.split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", "replace")
            if not line:
                self._dispatch()
            elif line.startswith("data:"):
                self._data.append(line[5:].removeprefix(" "))
            elif line.startswith("event:") and line[6:].strip() == "message_stop":
                self.done = True

    def close(self) -> None:
        """The stream ended: an event not followed by a blank line still counts."""
        if self._partial:
            self.feed(b"\n")
        self._dispatch()

    def texts(self) -> list[str]:
        return [*("".join(parts) for parts in self._streams.values()), *self._texts]

    def _keep(self, text: str) -> bool:
        self._chars += len(text)
        if self._chars > self.max_chars:
            self.truncated = True
            return False
        return True

    def _dispatch(self) -> None:
        if not self._data:
            return
        data = "\n".join(self._data)
        self._data = []
        if data.strip() == "[DONE]":
            self.done = True
            return
        try:
            event = json.loads(data)
        except ValueError:
            if self._keep(data):
                self._texts.append(data)
            return
        if not isinstance(event, dict):
            return
        kind = event.get("type")
        if kind in ("message_stop", "response.completed", "response.failed", "response.incomplete"):
            self.done = True
        pieces: list[tuple[str, str]] = []
        delta = event.get("delta")
        if isinstance(delta, str):  # OpenAI responses
            pieces.append((f"{kind}/{event.get('item_id')}/{event.get('output_index')}/"
                           f"{event.get('content_index')}", delta))
        elif isinstance(delta, dict):  # Anthropic
            _delta_pieces(delta, f"block{event.get('index')}", pieces)
        choices = event.get("choices")
        if isinstance(choices, list):  # OpenAI chat completions
            for n, choice in enumerate(choices):
                if isinstance(choice, dict) and isinstance(choice.get("delta"), dict):
                    _delta_pieces(choice["delta"], f"choice{choice.get('index', n)}", pieces)
        if pieces:
            for stream, text in pieces:
                if self._keep(text):
                    self._streams.setdefault(stream, []).append(text)
            return
        for text in json_strings(event):
            if self._keep(text):
                self._texts.append(text)


def _delta_pieces(doc: Any, path: str, out: list[tuple[str, str]]) -> None:
    """The strings of a delta, each with the path of the stream it continues (a list
    element is named by its own ``index`` member when it has one, as tool calls do)."""
    if isinstance(doc, str):
        out.append((path, doc))
    elif isinstance(doc, dict):
        for k, v in doc.items():
            if k not in _SKIPPED_MEMBERS and k != "index":
                _delta_pieces(v, f"{path}.{k}", out)
    elif isinstance(doc, list):
        for n, v in enumerate(doc):
            name = v.get("index", n) if isinstance(v, dict) else n
            _delta_pieces(v, f"{path}[{name}]", out)
