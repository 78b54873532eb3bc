"""The proxy's reference finder (sans-IO): names, value fingerprints, texts of bodies and
of streamed answers."""

from __future__ import annotations

import json

from oribus.integrations.proxy.detect import (
    MIN_VALUE_CHARS,
    KeyIndex,
    Ref,
    SseText,
    body_texts,
    fingerprints,
)

DOC = "x" * 40 + " ".join(f"paragraph {i} of the design document, with its own words" for i in range(20))


def index() -> KeyIndex:
    ix = KeyIndex(versions_kept=3)
    ix.put("team/plan", 1, {"steps": ["collect the quarterly figures", "draft"], "owner": "planner"})
    ix.put("team/budget", 4, "The budget is 14,500 EUR, approved on Monday.")
    ix.put("team/doc", 2, DOC)
    ix.put("flag", 1, True)
    return ix


def test_names_are_whole_tokens():
    ix = index()
    assert ix.find(["see team/plan."]) == [Ref("team/plan", 1, "name")]
    assert ix.find(['{"key": "team/plan"}', "(team/budget)"]) == [Ref("team/budget", 4, "name"),
                                                                 Ref("team/plan", 1, "name")]
    assert ix.find(["**team/plan**", "_team/budget_'s owner"]) == [Ref("team/budget", 4, "name"),
                                                                  Ref("team/plan", 1, "name")]
    assert ix.find(["team/plans team/plan2 team/plan/x xteam/plan team plan docs/team/plan.md"]) == []


def test_values_match_re_indented_and_in_any_key_order():
    ix = index()
    stored = {"steps": ["collect the quarterly figures", "draft"], "owner": "planner"}
    assert ix.find([f"we have {json.dumps(stored, indent=1)} now"]) == [Ref("team/plan", 1, "value")]
    assert ix.find([json.dumps(stored, indent=4, sort_keys=True)]) == [Ref("team/plan", 1, "value")]
    assert ix.find([json.dumps({**stored, "owner": "reviewer"})]) == []
    assert ix.find([f"in Python: {stored}"]) == [Ref("team/plan", 1, "value")]  # str(dict), single quotes
    assert ix.find(["The budget is\n  14,500 EUR, approved on Monday. ok"]) == [Ref("team/budget", 4, "value")]
    assert ix.find(["The budget is 14,600 EUR, approved on Monday."]) == []


def test_a_fragment_of_a_long_value_matches_a_short_one_does_not():
    ix = index()
    assert ix.find([DOC[300:500]]) == [Ref("team/doc", 2, "value")]
    assert ix.find([DOC[300:340]]) == []


def test_short_values_have_no_fingerprint():
    assert fingerprints(True) == [] and fingerprints("done") == [] and fingerprints(12) == []
    assert all(len(f) >= MIN_VALUE_CHARS for f in fingerprints({"a": 1, "b": "x" * 40}))


def test_newest_matching_version_and_old_versions_dropped():
    ix = KeyIndex(versions_kept=2)
    ix.put("k", 1, "version one of the long enough value")
    ix.put("k", 2, "version two of the long enough value")
    ix.put("k", 1, "ignored: older than what is known")
    assert ix.find(["version one of the long enough value"]) == [Ref("k", 1, "value")]
    ix.put("k", 3, "version three of the long enough value")
    assert ix.find(["version one of the long enough value"]) == []  # only two versions kept
    assert ix.find(["version two of the long enough value"]) == [Ref("k", 2, "value")]
    ix.delete("k", 4)
    assert ix.find(["k"]) == [] and ix.current("k") == 4


def test_ignored_prefixes_and_max_keys():
    ix = KeyIndex(max_keys=1, ignored_prefixes=(".oribus-proxy/",))
    ix.put(".oribus-proxy/lost/x", 1, "a long enough value to be fingerprinted")
    ix.put("a", 1, 1)
    ix.put("b", 1, 1)
    assert ix.names == {"a"} and ix.full


def test_body_texts_skip_inline_data():
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hello"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "team/plan"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}).encode()
    assert body_texts(body) == ["hello"]
    assert body_texts(b"not json team/plan") == ["not json team/plan"]


def sse(*events: dict | str) -> bytes:
    return b"".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events)


def test_sse_reassembles_each_stream_of_deltas_across_chunks():
    raw = sse(
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "see te"}}]},
        {"choices": [{"index": 0, "delta": {"content": "am/plan"}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"k": "team/'}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'budget"}'}}]}}]},
        "[DONE]")
    s = SseText()
    for i in range(0, len(raw), 7):  # cut anywhere, even inside a line
        s.feed(raw[i:i + 7])
        if i + 7 < len(raw) - 20:
            assert not s.done
    s.close()
    assert s.done
    assert set(s.texts()) == {"see team/plan", '{"k": "team/budget"}'}


def test_sse_anthropic_and_responses_shapes():
    s = SseText()
    s.feed(b"event: content_block_delta\n" + sse({"type": "content_block_delta", "index": 0,
                                                   "delta": {"type": "text_delta", "text": "team/"}}))
    s.feed(sse({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "plan"}}))
    assert not s.done
    s.feed(b"event: message_stop\ndata: {\"type\": \"message_stop\"}\n\n")
    assert s.done and s.texts() == ["team/plan"]
    r = SseText()
    r.feed(sse({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "ab"},
               {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "cd"}))
    assert r.texts() == ["abcd"] and not r.done
    r.feed(sse({"type": "response.completed", "response": {"output": [{"content": [{"text": "abcd"}]}]}}))
    assert r.done and r.texts() == ["abcd", "abcd"]
