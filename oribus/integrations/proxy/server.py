"""``oribus proxy``: the HTTP proxy between agents and their LLM provider.

An agent points its OpenAI or Anthropic client at the proxy (``base_url``) and is named
by its API key in a key map (which a header cannot override), or names itself with a
header (``X-Oribus-Agent``, and ``X-Oribus-Session`` for its session id, default ``http``,
the session ``/v1`` agents get). Every request goes to ``upstream`` + the request's path and query, and its answer
comes back, unchanged: the request body byte for byte with its headers (less the
hop-by-hop ones and the proxy's own), the answer's status, headers and body byte for
byte (still compressed if the provider compressed it). A streamed answer
(``text/event-stream``) is passed on chunk by chunk as it arrives.

What the proxy adds: for ``POST`` requests to a chat completions (``…/chat/completions``),
responses (``…/responses``) or messages (``…/messages``) path, it finds the references
the prompt and the answer make to bus keys (``detect.py``: names, and fingerprints of
values) and records them as deliveries to the agent's session, skip-if-exists
(``recorder.py``). Order: the prompt is scanned while the provider works; the answer's
references are recorded **before the answer ends** — before the last bytes of a whole
answer, and before the terminal event (``[DONE]``, ``message_stop``,
``response.completed``) and the end of a streamed one — so an agent that acts on an
answer has its reads recorded first. Recording waits at most ``record_timeout`` seconds;
a bus that does not answer by then never fails the call (``recorder.py`` says what
happens to those references).

Errors of its own: an unreachable provider 502, one silent for ``upstream_timeout`` 504, a request body over ``max_body_bytes`` 413, each with a JSON
body ``{"error": {"type": "oribus_proxy_...", "message"}}``. A provider that breaks off
a streamed answer has its connection to the agent broken off too. ``GET
/.oribus/proxy/stats`` answers the proxy's counters (never forwarded).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from oribus.errors import InvalidRequest
from oribus.integrations.proxy.detect import KeyIndex, Ref, SseText, body_texts
from oribus.integrations.proxy.recorder import DeliveryRecorder
from oribus.types import SessionRef

log = logging.getLogger("oribus.proxy")

DEFAULT_AGENT_HEADER = "X-Oribus-Agent"
SESSION_HEADER = "X-Oribus-Session"
DEFAULT_SESSION = "http"  # the session id /v1 agents get by default
STATS_PATH = "/.oribus/proxy/stats"
SCANNED_SUFFIXES = ("/chat/completions", "/responses", "/messages")
_HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Host", "Content-Length"))
_API_KEY_HEADERS = ("x-api-key", "api-key")
_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")


@dataclass
class ProxyConfig:
    """One ``oribus proxy``."""

    upstream: str  # the provider's base URL; the request's path and query are appended
    host: str = "127.0.0.1"
    port: int = 7790
    agent_header: str = DEFAULT_AGENT_HEADER  # names the calling agent
    key_map: Mapping[str, SessionRef] = field(default_factory=dict)  # API key -> (agent, session)
    record_timeout: float = 2.0  # seconds an answer's end waits for its recording
    upstream_timeout: float = 600.0  # seconds the provider may stay silent (before its answer, or within it)
    max_body_bytes: int = 32 << 20  # largest request body
    max_scan_bytes: int = 8 << 20  # an answer's bytes kept for scanning (beyond: not scanned)


def load_key_map(path: str | Path) -> dict[str, SessionRef]:
    """A key map file: JSON ``{"<api key>": "agent"}`` or ``{"<api key>": {"agent": ...,
    "session": ...}}``. InvalidRequest naming the file and the entry if it is not one."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise InvalidRequest(f"key map {str(path)!r}: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidRequest(f"key map {str(path)!r} must be a JSON object of api key -> agent")
    out: dict[str, SessionRef] = {}
    for key, who in doc.items():
        if isinstance(who, str) and who:
            out[key] = SessionRef(who, DEFAULT_SESSION)
        elif isinstance(who, dict) and isinstance(who.get("agent"), str) and who["agent"]:
            session = who.get("session", DEFAULT_SESSION)
            if not isinstance(session, str) or not session:
                raise InvalidRequest(f"key map {str(path)!r}: the session of an entry must be a non-empty string")
            out[key] = SessionRef(who["agent"], session)
        else:
            raise InvalidRequest(f"key map {str(path)!r}: an entry must be an agent name or "
                                 '{"agent": ..., "session": ...}')
    return out


@dataclass(slots=True)
class ProxyCounters:
    requests: int = 0  # forwarded
    scanned: int = 0  # LLM exchanges scanned
    unidentified: int = 0  # LLM exchanges of no known agent (forwarded, nothing recorded)
    references: int = 0  # references found
    upstream_errors: int = 0  # 502/504 answered by the proxy, or answers broken off

    def as_dict(self) -> dict[str, int]:
        return {f: getattr(self, f) for f in self.__slots__}


class ProxyServer:
    """The proxy (see the module docstring). ``start()`` / ``stop()``, or ``async with``.

    Example::

        bus = oribus.connect("127.0.0.1:7700", agent="oribus-proxy")
        index = KeyIndex(ignored_prefixes=(LOST_PREFIX,))
        feed = IndexFeed(bus, index)
        await feed.start(wait=5)
        async with ProxyServer(ProxyConfig("https://api.openai.com"), index, DeliveryRecorder(bus)) as proxy:
            ...  # agents use base_url=f"http://127.0.0.1:{proxy.port}/v1"
    """

    def __init__(self, config: ProxyConfig, index: KeyIndex, recorder: DeliveryRecorder) -> None:
        self.config = config
        self.index = index
        self.recorder = recorder
        self.counters = ProxyCounters()
        self.port = config.port
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._upstream = config.upstream.rstrip("/")

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        if self._runner is not None:
            return
        self._client = aiohttp.ClientSession(
            auto_decompress=False,  # answers pass byte for byte, compressed or not
            # a long answer may stream for many minutes: only silence is a timeout
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=self.config.upstream_timeout),
            connector=aiohttp.TCPConnector(limit=0),
            skip_auto_headers=_AUTO_HEADERS,  # the agent's headers only, not the client library's defaults
        )
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_get(STATS_PATH, self._stats)
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    def stats(self) -> dict:
        return {**self.counters.as_dict(), **self.recorder.counters.as_dict(),
                "pending_sessions": self.recorder.pending_sessions, "keys_indexed": len(self.index)}

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    # ---- who is calling -------------------------------------------------------------------

    def session_of(self, headers: Mapping[str, str]) -> SessionRef | None:
        """The calling agent's session: the API key's entry in the key map (it cannot be
        claimed by naming another agent in a header), else the agent header (and the
        session header), else None."""
        if self.config.key_map:
            auth = headers.get("Authorization", "")
            candidates = [auth[7:].strip()] if auth[:7].lower() == "bearer " else []
            candidates += [headers[h].strip() for h in _API_KEY_HEADERS if h in headers]
            for key in candidates:
                if key in self.config.key_map:
                    return self.config.key_map[key]
        agent = headers.get(self.config.agent_header, "").strip()
        if agent:
            return SessionRef(agent, headers.get(SESSION_HEADER, "").strip() or DEFAULT_SESSION)
        return None

    # ---- forwarding ----------------------------------------------------------------------

    def _upstream_headers(self, request: web.Request) -> dict[str, str]:
        own = {self.config.agent_header.lower(), SESSION_HEADER.lower()}
        out: dict[str, str] = {}
        for k, v in request.headers.items():
            low = k.lower()
            if low in _HOP_BY_HOP or low in own:
                continue
            out[k] = f"{out[k]}, {v}" if k in out else v
        return out

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        assert self._client is not None
        self.counters.requests += 1
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "body_too_large", f"request body over {self.config.max_body_bytes} bytes")
        scanned = request.method == "POST" and request.path.rstrip("/").endswith(SCANNED_SUFFIXES)
        session = self.session_of(request.headers) if scanned else None
        if scanned:
            self.counters.scanned += 1
            if session is None:
                self.counters.unidentified += 1
        url = self._upstream + request.path_qs
        sent = asyncio.ensure_future(self._client.request(
            request.method, url, headers=self._upstream_headers(request), data=body if body else None,
            allow_redirects=False))
        prompt: list[Ref] = []
        if session is not None:  # scanned while the provider works
            await asyncio.sleep(0)  # the request's first step: on its way before the scan
            prompt = self._refs(body_texts(body))
        try:
            upstream = await sent
        except TimeoutError:
            await self._record(session, prompt)
            self.counters.upstream_errors += 1
            return _error(504, "upstream_timeout", f"{self._upstream} did not answer in "
                          f"{self.config.upstream_timeout:g} s")
        except aiohttp.ClientError as e:
            await self._record(session, prompt)
            self.counters.upstream_errors += 1
            return _error(502, "upstream_unreachable", f"{self._upstream}: {type(e).__name__}: {e}")
        async with upstream:
            if session is None:
                return await self._pass(request, upstream)
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self._pass_stream(request, upstream, session, prompt)
            return await self._pass_whole(request, upstream, session, prompt)

    def _refs(self, texts: list[str]) -> list[Ref]:
        refs = self.index.find(texts)
        self.counters.references += len(refs)
        return refs

    async def _record(self, session: SessionRef | None, refs: list[Ref]) -> None:
        if session is not None and refs:
            await self.recorder.record(session, refs)

    def _response(self, upstream: aiohttp.ClientResponse, *, length: bool) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason, headers=_headers(upstream))
        if length and upstream.content_length is not None:
            resp.content_length = upstream.content_length
        return resp

    async def _pass(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """Not an LLM exchange, or no agent to record for: pass it on as it comes."""
        resp = self._response(upstream, length=True)
        await resp.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
        except (TimeoutError, aiohttp.ClientPayloadError) as e:
            return self._broken_off(request, resp, e)
        await resp.write_eof()
        return resp

    async def _pass_whole(self, request: web.Request, upstream: aiohttp.ClientResponse,
                          session: SessionRef, prompt: list[Ref]) -> web.StreamResponse:
        """A whole answer: read it, record, then answer with it."""
        try:
            body = await upstream.read()
        except (TimeoutError, aiohttp.ClientPayloadError) as e:
            await self._record(session, prompt)
            self.counters.upstream_errors += 1
            return _error(502, "upstream_broke_off", f"{self._upstream} broke off its answer: {type(e).__name__}: {e}")
        if len(body) <= self.config.max_scan_bytes:
            texts = body_texts(_decoded(body, upstream.headers.get("Content-Encoding", "")))
            prompt = _merge(prompt, self._refs(texts))
        await self._record(session, prompt)
        return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=_headers(upstream))

    async def _pass_stream(self, request: web.Request, upstream: aiohttp.ClientResponse,
                           session: SessionRef, prompt: list[Ref]) -> web.StreamResponse:
        """A streamed answer: each chunk on at once, up to its terminal event; then record,
        then the rest and the end."""
        resp = self._response(upstream, length=False)
        await resp.prepare(request)
        sse = SseText()
        decoder = _decoder(upstream.headers.get("Content-Encoding", ""))
        held: list[bytes] = []
        kept = 0
        broken: BaseException | None = None
        try:
            async for chunk in upstream.content.iter_any():
                if kept <= self.config.max_scan_bytes and decoder is not None:
                    kept += len(chunk)
                    sse.feed(chunk if decoder is True else decoder.decompress(chunk))
                if held or sse.done:
                    held.append(chunk)
                else:
                    await resp.write(chunk)
        except (TimeoutError, aiohttp.ClientPayloadError) as e:
            broken = e
        except ConnectionResetError:  # the agent went away: it may have read part of the answer
            sse.close()
            await self._record(session, _merge(prompt, self._refs(sse.texts())))
            return resp
        sse.close()
        await self._record(session, _merge(prompt, self._refs(sse.texts())))
        with contextlib.suppress(ConnectionResetError):
            for chunk in held:
                await resp.write(chunk)
            if broken is None:
                await resp.write_eof()
        if broken is not None:
            return self._broken_off(request, resp, broken)
        return resp

    def _broken_off(self, request: web.Request, resp: web.StreamResponse, e: BaseException) -> web.StreamResponse:
        """The provider broke off an answer already under way: so is the agent's connection,
        so the agent sees the answer end early rather than end well."""
        self.counters.upstream_errors += 1
        log.warning("%s broke off its answer to %s: %s: %s", self._upstream, request.path, type(e).__name__, e)
        if request.transport is not None:
            request.transport.abort()
        return resp


def _headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in upstream.headers.items():
        if k.lower() not in _HOP_BY_HOP:
            out.add(k, v)
    return out


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"error": {"type": f"oribus_proxy_{kind}", "message": message}}, status=status)


def _merge(a: list[Ref], b: list[Ref]) -> list[Ref]:
    return list(dict.fromkeys([*a, *b]))


class _Decoder:
    def __init__(self, wbits: int) -> None:
        self._z = zlib.decompressobj(wbits)

    def decompress(self, chunk: bytes) -> bytes:
        with contextlib.suppress(zlib.error):
            return self._z.decompress(chunk)
        return b""


def _decoder(encoding: str) -> _Decoder | Literal[True] | None:
    """How to read an answer's bytes for scanning: True as they are, a zlib decoder for
    gzip/deflate, None when the proxy cannot read them (``br``, ``zstd``: passed, not scanned)."""
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return True
    if enc in ("gzip", "x-gzip", "deflate"):
        return _Decoder(47)  # zlib or gzip header, detected
    log.info("answer encoded as %r: passed on, not scanned", encoding)
    return None


def _decoded(body: bytes, encoding: str) -> bytes:
    d = _decoder(encoding)
    if d is True:
        return body
    if d is None:
        return b""
    assert isinstance(d, _Decoder)
    return d.decompress(body)
