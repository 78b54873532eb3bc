"""``oribus proxy`` against a fake provider on a free port (never a real one): answers
forwarded unchanged, streams not buffered, references in prompts and answers recorded as
deliveries (skip-if-exists), so a commit that depends on them is refused; a bus or a
provider that is down."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging

import aiohttp
import pytest

import oribus
from oribus.errors import Conflict
from oribus.hosts.up import UpHost
from oribus.integrations.proxy import (
    DeliveryRecorder,
    IndexFeed,
    KeyIndex,
    ProxyConfig,
    ProxyServer,
    lost_key,
)
from oribus.integrations.proxy.fake_upstream import FakeUpstream
from oribus.integrations.proxy.recorder import LOST_PREFIX
from oribus.types import SessionRef

PLAN = {"steps": ["collect the quarterly figures", "draft the summary"], "owner": "planner"}
BUDGET = "The budget for the offsite is 14,500 EUR, approved by finance on Monday."


class Rig:
    def __init__(self, bus: oribus.AsyncSession, fake: FakeUpstream, proxy: ProxyServer, feed: IndexFeed) -> None:
        self.bus, self.fake, self.proxy, self.feed = bus, fake, proxy, feed
        self.http = aiohttp.ClientSession(auto_decompress=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    async def post(self, path: str, doc: dict, *, agent: str | None = "writer", session: str | None = None,
                   **headers: str) -> aiohttp.ClientResponse:
        h = {"Content-Type": "application/json", **{k.replace("_", "-"): v for k, v in headers.items()}}
        if agent:
            h["X-Oribus-Agent"] = agent
        if session:
            h["X-Oribus-Session"] = session
        resp = await self.http.post(self.url + path, data=json.dumps(doc).encode(), headers=h)
        await resp.read()
        return resp

    async def indexed(self, key: str, version: int) -> None:
        """Wait until the proxy's index has ``key`` at ``version`` (the watch is asynchronous)."""
        for _ in range(500):
            if self.proxy.index.current(key) == version:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{key} v{version} never indexed (has {self.proxy.index.current(key)})")


@pytest.fixture
async def rig(tmp_path):
    async with oribus.open_local(tmp_path / "data", shards=2, agent="setup") as bus:
        await bus.commit({"team/plan": PLAN, "team/budget": BUDGET, "team/notes": "short"})
        async with FakeUpstream() as fake:
            index = KeyIndex(ignored_prefixes=(LOST_PREFIX,))
            feed = IndexFeed(bus, index)
            await feed.start(wait=5)
            recorder = DeliveryRecorder(bus, retry_seconds=0.05)
            async with ProxyServer(ProxyConfig(fake.url, port=0), index, recorder) as proxy:
                r = Rig(bus, fake, proxy, feed)
                try:
                    yield r
                finally:
                    await r.http.close()
                    await recorder.close()
                    await feed.close()


def chat(text: str, stream: bool = False) -> dict:
    return {"model": "gpt-test", "stream": stream, "messages": [{"role": "system", "content": "You plan."},
                                                                 {"role": "user", "content": text}]}


def responses(text: str, stream: bool = False) -> dict:
    return {"model": "gpt-test", "stream": stream, "input": [{"role": "user", "content": text}]}


def messages(text: str, stream: bool = False) -> dict:
    return {"model": "claude-test", "max_tokens": 64, "stream": stream, "system": "You plan.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}


APIS = [("/v1/chat/completions", chat), ("/v1/responses", responses), ("/v1/messages", messages)]


async def delivered(bus: oribus.AsyncSession, agent: str, session: str = "http") -> dict[str, int]:
    """What ``(agent, session)`` was delivered, by key (the bus's own view, no record)."""
    views = await bus._bus.session_views()  # noqa: SLF001 - the in-process Bus
    for v in views:
        if (v["agent"], v["session"]) == (agent, session):
            return {r["key"]: r["version"] for r in v["reads"]}
    return {}


# ---- forwarding --------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "make"), APIS)
@pytest.mark.parametrize("stream", [False, True])
async def test_request_and_answer_pass_unchanged(rig, path, make, stream):
    doc = make("hello", stream)
    raw = json.dumps(doc, indent=3).encode()  # odd formatting: must arrive exactly so
    headers = {"Content-Type": "application/json", "X-Oribus-Agent": "writer", "Authorization": "Bearer sk-test",
               "X-Fake-Reply": "the answer"}
    direct = await rig.http.post(rig.fake.url + path, data=raw, headers=headers)
    direct_body = await direct.read()
    via = await rig.http.post(rig.url + path, data=raw, headers=headers)
    via_body = await via.read()
    assert rig.fake.bodies[-1] == raw == rig.fake.bodies[-2]
    assert rig.fake.headers[-1]["Authorization"] == "Bearer sk-test"
    assert "X-Oribus-Agent" not in rig.fake.headers[-1]  # the proxy's own header stays with it
    assert via.status == direct.status == 200
    assert via.headers["Content-Type"] == direct.headers["Content-Type"]
    if stream:
        assert via.headers["Content-Type"].startswith("text/event-stream")
    assert _without_created(via_body) == _without_created(direct_body)


def _without_created(body: bytes) -> bytes:
    import re

    return re.sub(rb'"created": \d+', b"", body)


async def test_gzip_answers_pass_compressed_and_are_still_scanned(rig):
    resp = await rig.post("/v1/chat/completions", chat("hi"), X_Fake_Gzip="1",
                          X_Fake_Reply="Look at team/plan first.")
    body = await resp.read()
    assert resp.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(body))["choices"][0]["message"]["content"] == "Look at team/plan first."
    assert await delivered(rig.bus, "writer") == {"team/plan": 1}


async def test_status_and_other_routes_pass(rig):
    resp = await rig.post("/v1/chat/completions", chat("hi"), X_Fake_Status="429")
    assert resp.status == 429
    got = await rig.http.get(rig.url + "/v1/models")
    assert got.status == 200 and (await got.json())["data"][0]["id"] == "fake"
    missing = await rig.http.get(rig.url + "/v1/nothing")
    assert missing.status == 404


@pytest.mark.parametrize(("path", "make"), APIS)
async def test_stream_is_passed_on_before_the_provider_finishes(rig, path, make):
    headers = {"Content-Type": "application/json", "X-Oribus-Agent": "writer", "X-Fake-Gate": "1",
               "X-Fake-Reply": "Mind team/budget please."}
    async with rig.http.post(rig.url + path, data=json.dumps(make("go", True)).encode(), headers=headers) as resp:
        first = await asyncio.wait_for(resp.content.readany(), 5)
        assert first and rig.fake.finished == 0  # the first event is here; the provider is still held
        rig.fake.release()
        rest = await asyncio.wait_for(resp.read(), 5)
    assert rig.fake.finished == 1
    assert b"Mind tea" in first + rest and b"m/budget" in first + rest  # the fake cut the key in two
    assert await delivered(rig.bus, "writer") == {"team/budget": 1}  # a key cut across events, reassembled


# ---- references recorded -----------------------------------------------------------------------


@pytest.mark.parametrize(("path", "make"), APIS)
@pytest.mark.parametrize("stream", [False, True])
async def test_names_in_prompt_and_answer_are_recorded(rig, path, make, stream):
    await rig.post(path, make("Update team/plan.", stream), agent="w1", X_Fake_Reply="And check `team/budget`!")
    assert await delivered(rig.bus, "w1") == {"team/plan": 1, "team/budget": 1}
    # near misses are not keys
    await rig.post(path, make("team/plans, team/plan2, team, plan", stream), agent="w2", X_Fake_Reply="no")
    assert await delivered(rig.bus, "w2") == {}


async def test_pasted_values_are_recognised(rig):
    pasted = json.dumps(PLAN, indent=2)  # re-indented JSON of the value
    await rig.post("/v1/messages", messages(f"Here is what we have:\n{pasted}\nGo on."), agent="w3")
    assert await delivered(rig.bus, "w3") == {"team/plan": 1}
    # a string value pasted inside other text, re-wrapped
    await rig.post("/v1/chat/completions", chat("fyi " + BUDGET.replace(" on ", "\non ")), agent="w4")
    assert await delivered(rig.bus, "w4") == {"team/budget": 1}
    # the same value with one figure changed is not it
    await rig.post("/v1/chat/completions", chat(BUDGET.replace("14,500", "14,600")), agent="w5")
    assert await delivered(rig.bus, "w5") == {}


async def test_session_header_and_key_map(rig):
    await rig.post("/v1/chat/completions", chat("team/plan"), agent="w6", session="run-7")
    assert await delivered(rig.bus, "w6", "run-7") == {"team/plan": 1}
    rig.proxy.config.key_map = {"sk-mapped": SessionRef("mapped-agent", "s1")}
    await rig.post("/v1/chat/completions", chat("team/plan"), agent=None, Authorization="Bearer sk-mapped")
    assert await delivered(rig.bus, "mapped-agent", "s1") == {"team/plan": 1}
    await rig.post("/v1/messages", messages("team/budget"), agent=None, x_api_key="sk-mapped")
    assert await delivered(rig.bus, "mapped-agent", "s1") == {"team/plan": 1, "team/budget": 1}
    await rig.post("/v1/messages", messages("team/notes"), agent="claims-another", x_api_key="sk-mapped")
    assert await delivered(rig.bus, "claims-another") == {}  # the key map wins over the header
    assert "team/notes" in await delivered(rig.bus, "mapped-agent", "s1")
    before = rig.proxy.counters.unidentified
    await rig.post("/v1/chat/completions", chat("team/plan"), agent=None, Authorization="Bearer sk-unknown")
    assert rig.proxy.counters.unidentified == before + 1


async def test_an_earlier_older_delivery_is_never_overwritten(rig):
    agent = rig.bus.session("w7", "http")
    assert (await agent.get("team/plan")).version == 1
    await rig.bus.put("team/plan", {**PLAN, "owner": "someone else"})
    await rig.indexed("team/plan", 2)
    await rig.post("/v1/chat/completions", chat("Continue with team/plan."), agent="w7")
    assert await delivered(rig.bus, "w7") == {"team/plan": 1}  # still the version it read
    assert rig.proxy.recorder.counters.skipped == 1
    with pytest.raises(Conflict):
        await agent.commit({"team/plan": {"steps": []}})


# ---- the point of it: ORI through the proxy ----------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_commit_depending_on_what_the_llm_saw_is_refused_after_a_change(rig, stream):
    agent = rig.bus.session("w8", "http")  # the agent's own SDK session: it never read team/budget
    await rig.post("/v1/chat/completions", chat("Plan within team/budget.", stream), agent="w8")
    await rig.bus.session("other").put("team/budget", "The budget is cut to 9,000 EUR.")
    with pytest.raises(Conflict) as e:
        await agent.commit({"team/plan": {"steps": ["spend 14,500"]}})
    assert [s.key for s in e.value.stale] == ["team/budget"]
    # without the proxy's record the same commit passes: the control
    control = rig.bus.session("w9", "http")
    await rig.bus.session("other").put("team/budget", "The budget is back to 14,500 EUR.")
    await control.commit({"team/plan": {"steps": ["spend 14,500"]}})


async def test_a_pasted_older_version_fails_the_session_closed(rig):
    old = json.dumps(PLAN)
    await rig.bus.put("team/plan", {**PLAN, "steps": ["skip the figures"]})
    await rig.indexed("team/plan", 2)
    await rig.post("/v1/chat/completions", chat(f"Our plan: {old}"), agent="w10")
    agent = rig.bus.session("w10", "http")
    with pytest.raises(Conflict) as e:
        await agent.commit({"team/notes": "based on the old plan"})
    assert lost_key(SessionRef("w10", "http")) in [s.key for s in e.value.stale]
    assert "older versions" in (await rig.bus.get(lost_key(SessionRef("w10", "http")))).value["reason"]
    await agent.reset_session()  # the agent's way out: read again
    await agent.commit({"team/notes": "based on the new plan"})


async def test_over_a_remote_bus(tmp_path):
    host = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=2)
    await host.start()
    try:
        async with oribus.connect(host.address, agent="oribus-proxy") as bus, FakeUpstream() as fake:
            await bus.commit({"team/plan": PLAN})
            index = KeyIndex()
            feed = IndexFeed(bus, index)
            await feed.start(wait=5)
            recorder = DeliveryRecorder(bus)
            async with ProxyServer(ProxyConfig(fake.url, port=0), index, recorder) as proxy, \
                    aiohttp.ClientSession() as http:
                async with oribus.connect(host.address, agent="remote-agent", session_id="s") as agent:
                    await agent.get("team/plan")  # an older delivery the proxy must keep
                    await bus.put("team/plan", {"steps": []})
                    resp = await http.post(f"http://127.0.0.1:{proxy.port}/v1/chat/completions",
                                           json=chat("team/plan"),
                                           headers={"X-Oribus-Agent": "remote-agent", "X-Oribus-Session": "s"})
                    assert resp.status == 200
                    assert recorder.counters.skipped == 1 and recorder.counters.recorded == 0
                    with pytest.raises(Conflict):
                        await agent.commit({"team/plan": {"steps": ["mine"]}})
            await recorder.close()
            await feed.close()
    finally:
        await host.stop()


# ---- when something is down ------------------------------------------------------------------


async def test_unreachable_provider_is_a_502_and_the_prompt_still_counts(rig):
    rig.proxy._upstream = "http://127.0.0.1:9"  # noqa: SLF001 - nothing listens there
    resp = await rig.post("/v1/chat/completions", chat("team/plan"), agent="w11")
    assert resp.status == 502
    assert (await resp.json())["error"]["type"] == "oribus_proxy_upstream_unreachable"
    assert await delivered(rig.bus, "w11") == {"team/plan": 1}


async def test_a_stream_the_provider_breaks_off_is_broken_off(rig):
    with pytest.raises(aiohttp.ClientPayloadError):
        await rig.post("/v1/chat/completions", chat("team/plan", True), agent="w12", X_Fake_Break="1")
    assert await delivered(rig.bus, "w12") == {"team/plan": 1}
    assert rig.proxy.counters.upstream_errors == 1


class _DownBus:
    """The proxy's bus while it is unreachable: every call fails as a lost bus does."""

    def __init__(self, real: oribus.AsyncSession) -> None:
        self.real = real
        self.down = True

    def session(self, agent: str, session_id: str | None = None) -> object:
        inner = self.real.session(agent, session_id)
        outer = self

        class S:
            async def register(self, keys):  # type: ignore[no-untyped-def]
                if outer.down:
                    raise oribus.Unavailable("bus unreachable (test)")
                return await inner.register(keys)

            async def get(self, key):  # type: ignore[no-untyped-def]
                if outer.down:
                    raise oribus.Unavailable("bus unreachable (test)")
                return await inner.get(key)

            async def commit(self, writes):  # type: ignore[no-untyped-def]
                if outer.down:
                    raise oribus.Unavailable("bus unreachable (test)")
                return await inner.commit(writes)

        return S()


async def test_bus_down_forwards_then_records_when_back(rig, caplog):
    down = _DownBus(rig.bus)
    rig.proxy.recorder.bus = down  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING, "oribus.proxy"):
        resp = await rig.post("/v1/chat/completions", chat("team/plan"), agent="w13")
    assert resp.status == 200  # the LLM call never fails for the bus's sake
    assert "could not record" in caplog.text
    assert rig.proxy.recorder.pending_sessions == 1
    down.down = False
    for _ in range(200):
        if not rig.proxy.recorder.pending_sessions:
            break
        await asyncio.sleep(0.02)
    assert await delivered(rig.bus, "w13") == {"team/plan": 1}
    assert rig.proxy.recorder.counters.failed_closed == 0


async def test_bus_down_while_the_key_changed_fails_the_session_closed(rig):
    down = _DownBus(rig.bus)
    rig.proxy.recorder.bus = down  # type: ignore[assignment]
    await rig.post("/v1/chat/completions", chat("team/plan"), agent="w14")
    await rig.bus.put("team/plan", {"steps": ["changed while the proxy could not record"]})
    down.down = False
    for _ in range(200):
        if not rig.proxy.recorder.pending_sessions:
            break
        await asyncio.sleep(0.02)
    assert rig.proxy.recorder.counters.failed_closed == 1
    with pytest.raises(Conflict):
        await rig.bus.session("w14", "http").commit({"team/notes": "x"})


async def test_stats_route(rig):
    await rig.post("/v1/chat/completions", chat("team/plan"), agent="w15")
    got = await (await rig.http.get(rig.url + "/.oribus/proxy/stats")).json()
    assert got["scanned"] == 1 and got["recorded"] == 1 and got["keys_indexed"] == 3


@pytest.mark.parametrize(("path", "make", "last"), [
    ("/v1/chat/completions", chat, b"[DONE]"), ("/v1/responses", responses, b"response.completed"),
    ("/v1/messages", messages, b"message_stop")])
async def test_the_answer_ends_only_after_its_references_are_recorded(rig, path, make, last):
    """A client may act as soon as it sees the terminal event (the OpenAI SDK stops reading
    at [DONE]): by then the deliveries are recorded, even when recording is slow."""
    record = rig.proxy.recorder.record

    async def slow(session, refs):  # type: ignore[no-untyped-def]
        await asyncio.sleep(0.3)
        await record(session, refs)

    rig.proxy.recorder.record = slow  # type: ignore[method-assign]
    headers = {"Content-Type": "application/json", "X-Oribus-Agent": "w16", "X-Fake-Reply": "see team/budget"}
    async with rig.http.post(rig.url + path, data=json.dumps(make("go", True)).encode(), headers=headers) as resp:
        seen = b""
        while last not in seen:
            chunk = await asyncio.wait_for(resp.content.readany(), 5)
            assert chunk, "the stream ended without its terminal event"
            seen += chunk
        assert await delivered(rig.bus, "w16") == {"team/budget": 1}


def test_key_map_file(tmp_path):
    from oribus.errors import InvalidRequest
    from oribus.integrations.proxy import load_key_map

    good = tmp_path / "keys.json"
    good.write_text(json.dumps({"sk-a": "planner", "sk-b": {"agent": "critic", "session": "run-1"}}))
    assert load_key_map(good) == {"sk-a": ("planner", "http"), "sk-b": ("critic", "run-1")}
    for bad in ("[1]", '{"sk": 3}', '{"sk": {"session": "s"}}', '{"sk": {"agent": "a", "session": ""}}', "{"):
        (tmp_path / "bad.json").write_text(bad)
        with pytest.raises(InvalidRequest, match="bad.json"):
            load_key_map(tmp_path / "bad.json")
    with pytest.raises(InvalidRequest, match="missing.json"):
        load_key_map(tmp_path / "missing.json")


async def test_only_the_agents_own_headers_go_upstream(rig):
    await rig.http.post(rig.url + "/v1/chat/completions", data=json.dumps(chat("hi")).encode(),
                        headers={"Content-Type": "application/json", "X-Oribus-Agent": "w17"},
                        skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent"))
    sent = {k.lower() for k in rig.fake.headers[-1]}
    assert not sent & {"accept", "accept-encoding", "user-agent", "x-oribus-agent"}, sent


async def test_an_agent_that_hangs_up_mid_stream_still_has_its_reads_recorded(rig):
    headers = {"Content-Type": "application/json", "X-Oribus-Agent": "w18", "X-Fake-Gate": "1",
               "X-Fake-Pace": "0.05", "X-Fake-Reply": "a long answer in many pieces, " * 3}
    resp = await rig.http.post(rig.url + "/v1/chat/completions", data=json.dumps(chat("use team/plan", True)).encode(),
                               headers=headers)
    assert await asyncio.wait_for(resp.content.readany(), 5)
    resp.close()  # gone before the answer ended
    rig.fake.release()
    for _ in range(200):
        if await delivered(rig.bus, "w18"):
            break
        await asyncio.sleep(0.02)
    assert await delivered(rig.bus, "w18") == {"team/plan": 1}


async def test_a_session_the_bus_refuses_is_not_kept(rig, caplog):
    with caplog.at_level(logging.WARNING, "oribus.proxy"):
        resp = await rig.post("/v1/chat/completions", chat("team/plan"), agent="a" * 300)
    assert resp.status == 200
    assert "not recorded" in caplog.text and rig.proxy.recorder.pending_sessions == 0


async def test_oribus_proxy_command(tmp_path):
    """``oribus proxy`` as an agent's operator runs it: over a bus at --addr, stopped by SIGTERM."""
    import os
    import signal
    import sys

    host = UpHost(tmp_path / "data", listen="127.0.0.1:0", shards=1)
    await host.start()
    proc = None
    try:
        async with FakeUpstream() as fake, oribus.connect(host.address, agent="setup") as bus, \
                aiohttp.ClientSession() as http:
            await bus.put("team/plan", PLAN)
            (tmp_path / "keys.json").write_text(json.dumps({"sk-1": "cli-agent"}))
            exe = os.path.join(os.path.dirname(sys.executable), "oribus")
            proc = await asyncio.create_subprocess_exec(
                exe, "proxy", "--listen", "127.0.0.1:0", "--upstream", fake.url, "--addr", host.address,
                "--key-map", str(tmp_path / "keys.json"), stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            assert proc.stdout is not None
            banner = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
            assert "oribus proxy listening on http://127.0.0.1:" in banner, banner
            url = banner.split()[4]
            resp = await http.post(url + "/v1/chat/completions", json=chat("Revise team/plan."),
                                   headers={"Authorization": "Bearer sk-1"})
            assert resp.status == 200
            await bus.put("team/plan", {"steps": []})
            with pytest.raises(Conflict):
                await bus.session("cli-agent", "http").commit({"team/notes": "from the old plan"})
            proc.send_signal(signal.SIGTERM)
            rest = (await asyncio.wait_for(proc.stdout.read(), 30)).decode()
            assert await proc.wait() == 0 and "Traceback" not in rest, rest
            proc = None
    finally:
        if proc is not None:
            proc.kill()
            await proc.wait()
        await host.stop()
