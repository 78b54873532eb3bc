"""A stand-in LLM provider for trying ``oribus proxy`` offline, its tests and benchmark.

It speaks the three APIs the proxy scans, whole and streamed (``"stream": true``), with
the shapes the providers use: OpenAI chat completions (``POST /v1/chat/completions``),
OpenAI responses (``POST /v1/responses``) and Anthropic messages (``POST /v1/messages``).
It answers with the text of the request's ``X-Fake-Reply`` header, else ``"Noted: "``
and the last user message's text; a streamed answer is cut into pieces of
``X-Fake-Chunk`` characters (default 8), one event each. Other test knobs, all headers:
``X-Fake-Gate`` (streams wait after their first event until ``release()``),
``X-Fake-Break`` (a stream breaks off after its first event), ``X-Fake-Pace`` (seconds
between the events of a stream), ``X-Fake-Gzip`` (a whole
answer gzip-compressed), ``X-Fake-Status`` (answer with that status). Every request body
it receives is kept in ``bodies``.

Run it: ``python -m oribus.integrations.proxy.fake_upstream --port 7791``.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import time
from typing import Any

from aiohttp import web


class FakeUpstream:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.gate = asyncio.Event()
        self.finished = 0  # streams that sent their last byte
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def release(self) -> None:
        self.gate.set()

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages", self._messages)
        app.router.add_get("/v1/models", self._models)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeUpstream:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- the APIs --------------------------------------------------------------------------

    async def _request(self, request: web.Request) -> tuple[dict, str]:
        raw = await request.read()
        self.bodies.append(raw)
        self.headers.append(dict(request.headers))
        body = json.loads(raw)
        reply = request.headers.get("X-Fake-Reply")
        if reply is None:
            reply = "Noted: " + _last_user_text(body)
        return body, reply

    def _pieces(self, request: web.Request, text: str) -> list[str]:
        n = max(1, int(request.headers.get("X-Fake-Chunk", "8")))
        return [text[i:i + n] for i in range(0, len(text), n)] or [""]

    async def _whole(self, request: web.Request, doc: dict) -> web.Response:
        status = int(request.headers.get("X-Fake-Status", "200"))
        body = json.dumps(doc).encode()
        if request.headers.get("X-Fake-Gzip"):
            return web.Response(body=gzip.compress(body), status=status,
                                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
        return web.Response(body=body, status=status, content_type="application/json")

    async def _stream(self, request: web.Request, events: list[bytes]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        pace = float(request.headers.get("X-Fake-Pace", "0"))
        for n, ev in enumerate(events):
            if n and pace:
                await asyncio.sleep(pace)
            await resp.write(ev)
            if n == 0:
                if request.headers.get("X-Fake-Break"):
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if request.headers.get("X-Fake-Gate"):
                    await self.gate.wait()
        await resp.write_eof()
        self.finished += 1
        return resp

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body, reply = await self._request(request)
        cid, created, model = "chatcmpl-fake", int(time.time()), body.get("model", "fake")
        if not body.get("stream"):
            return await self._whole(request, {
                "id": cid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

        def chunk(delta: dict, finish: str | None = None) -> bytes:
            return _sse({"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        events = [chunk({"role": "assistant", "content": ""})]
        events += [chunk({"content": p}) for p in self._pieces(request, reply)]
        events += [chunk({}, "stop"), b"data: [DONE]\n\n"]
        return await self._stream(request, events)

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body, reply = await self._request(request)
        message = {"type": "message", "id": "msg_fake", "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": reply, "annotations": []}]}
        done = {"id": "resp_fake", "object": "response", "status": "completed", "model": body.get("model", "fake"),
                "output": [message]}
        if not body.get("stream"):
            return await self._whole(request, done)
        events = [_sse({"type": "response.created", "response": {**done, "status": "in_progress", "output": []}},
                       "response.created")]
        events += [_sse({"type": "response.output_text.delta", "item_id": "msg_fake", "output_index": 0,
                         "content_index": 0, "delta": p}, "response.output_text.delta")
                   for p in self._pieces(request, reply)]
        events += [_sse({"type": "response.output_text.done", "item_id": "msg_fake", "output_index": 0,
                         "content_index": 0, "text": reply}, "response.output_text.done"),
                   _sse({"type": "response.completed", "response": done}, "response.completed")]
        return await self._stream(request, events)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body, reply = await self._request(request)
        model = body.get("model", "fake")
        if not body.get("stream"):
            return await self._whole(request, {
                "id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                "content": [{"type": "text", "text": reply}], "stop_reason": "end_turn",
                "usage": {"input_tokens": 1, "output_tokens": 1}})
        events = [_sse({"type": "message_start", "message": {"id": "msg_fake", "type": "message",
                                                             "role": "assistant", "model": model, "content": []}},
                       "message_start"),
                  _sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
                       "content_block_start")]
        events += [_sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}},
                        "content_block_delta") for p in self._pieces(request, reply)]
        events += [_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
                   _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}, "message_delta"),
                   _sse({"type": "message_stop"}, "message_stop")]
        return await self._stream(request, events)

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "fake", "object": "model"}]})


def _sse(doc: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(doc)}\n\n".encode()


def _last_user_text(body: dict) -> str:
    messages: Any = body.get("messages") or body.get("input") or []
    if isinstance(messages, str):
        return messages
    for m in reversed(messages if isinstance(messages, list) else []):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7791)
    args = parser.parse_args()

    async def run() -> None:
        async with FakeUpstream(args.host, args.port) as fake:
            print(f"fake LLM provider on {fake.url}", flush=True)
            await asyncio.Event().wait()

    asyncio.run(run())


if __name__ == "__main__":
    main()
