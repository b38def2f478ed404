"""The HTTP API as a client sees it, against a real server on 127.0.0.1 and the fake engine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.daemon.conftest import MakeApi, Served
from tests.daemon.fake_engine import REFUSED_CONTENT, FakeEngine, reply_for
from tui.client import DONE, SseComment, read_sse

HELLO = [{"role": "user", "content": "hello"}]


async def sse_items(response: aiohttp.ClientResponse) -> AsyncIterator[Any]:
    """Each event of a stream as the wire has it: decoded JSON, "[DONE]", or a ": ..." comment."""
    async for data in read_sse(response, comments=True):
        yield data if isinstance(data, SseComment) or data == DONE else json.loads(data)


async def read_all(response: aiohttp.ClientResponse) -> list[Any]:
    return [item async for item in sse_items(response)]


async def post_chat(api: Served, body: Any) -> tuple[int, Any]:
    async with api.session.post(f"{api.url}/v1/chat/completions", json=body) as response:
        return response.status, await response.json()


def assert_error(status: int, body: Any, expected_status: int, *words: str) -> None:
    assert status == expected_status, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error


# -- invalid requests ------------------------------------------------------------------------


async def test_malformed_json_is_a_400(api: Served) -> None:
    async with api.session.post(f"{api.url}/v1/chat/completions", data=b'{"messages": [',
                                headers={"Content-Type": "application/json"}) as response:
        assert_error(response.status, await response.json(), 400, "not valid JSON")


async def test_nan_is_not_json(api: Served) -> None:
    body = b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'
    async with api.session.post(f"{api.url}/v1/chat/completions", data=body,
                                headers={"Content-Type": "application/json"}) as response:
        assert_error(response.status, await response.json(), 400, "NaN")


async def test_deeply_nested_json_is_a_400(api: Served) -> None:
    body = b"[" * 200_000 + b"]" * 200_000
    async with api.session.post(f"{api.url}/v1/chat/completions", data=body,
                                headers={"Content-Type": "application/json"}) as response:
        assert_error(response.status, await response.json(), 400, "not valid JSON")


async def test_body_must_be_declared_json(api: Served) -> None:
    async with api.session.post(f"{api.url}/v1/chat/completions", data=b"{}",
                                headers={"Content-Type": "text/plain"}) as response:
        assert_error(response.status, await response.json(), 415, "application/json")


async def test_body_too_large_is_refused(api: Served) -> None:
    body = {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    status, answer = await post_chat(api, body)
    assert_error(status, answer, 413, "larger than")


async def test_unknown_field_is_named(api: Served) -> None:
    status, body = await post_chat(api, {"messages": HELLO, "frequency_penalty": 0.5})
    assert_error(status, body, 400, "frequency_penalty")
    assert body["error"]["param"] == "frequency_penalty"


async def test_missing_messages(api: Served) -> None:
    status, body = await post_chat(api, {"max_tokens": 3})
    assert_error(status, body, 400, "messages")
    assert body["error"]["param"] == "messages"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([1, 2], None),
        ({"messages": "hello"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hello"]}, "messages[0]"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x", "name": "a"}]}, "messages[0].name"),
        ({"messages": HELLO, "max_tokens": "10"}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": True}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": 0}, "max_tokens"),
        ({"messages": HELLO, "max_tokens": 4097}, "max_tokens"),
        ({"messages": HELLO, "max_completion_tokens": 2.5}, "max_completion_tokens"),
        ({"messages": HELLO, "max_tokens": 5, "max_completion_tokens": 5}, "max_completion_tokens"),
        ({"messages": HELLO, "temperature": "hot"}, "temperature"),
        ({"messages": HELLO, "temperature": 2.5}, "temperature"),
        ({"messages": HELLO, "top_p": 0}, "top_p"),
        ({"messages": HELLO, "top_k": -1}, "top_k"),
        ({"messages": HELLO, "seed": 1.5}, "seed"),
        ({"messages": HELLO, "stream": "yes"}, "stream"),
        ({"messages": HELLO, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"messages": HELLO, "stream_options": {"extra": True}}, "stream_options.extra"),
        ({"messages": HELLO, "n": 2}, "n"),
        ({"messages": HELLO, "user": 7}, "user"),
        ({"messages": HELLO, "model": 7}, "model"),
        ({"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": HELLO, "stop": [""]}, "stop"),
        ({"messages": HELLO, "stop": 3}, "stop"),
    ],
)
async def test_wrong_shapes_are_400s_naming_the_field(api: Served, body: Any, param: str | None) -> None:
    status, answer = await post_chat(api, body)
    assert_error(status, answer, 400)
    assert answer["error"]["param"] == param
    assert api.engine.calls == []


async def test_n_other_than_one_is_refused(api: Served) -> None:
    status, body = await post_chat(api, {"messages": HELLO, "n": 3})
    assert_error(status, body, 400, "'n' must be 1")


async def test_over_long_prompt_names_the_limit(make_api: MakeApi) -> None:
    api = await make_api(FakeEngine(max_positions=64))
    status, body = await post_chat(api, {"messages": [{"role": "user", "content": "x" * 100}]})
    assert_error(status, body, 400, "64")
    assert body["error"]["code"] == "context_length_exceeded"
    assert api.engine.calls == []


async def test_chat_template_refusal_is_a_400(api: Served) -> None:
    status, body = await post_chat(api, {"messages": [{"role": "user", "content": REFUSED_CONTENT}]})
    assert_error(status, body, 400, "chat template")


async def test_unknown_model_is_a_404(api: Served) -> None:
    status, body = await post_chat(api, {"messages": HELLO, "model": "gpt-9"})
    assert_error(status, body, 404, "gpt-9", "fake-model")
    assert body["error"]["code"] == "model_not_found"


async def test_unknown_path_and_method_are_json_errors(api: Served) -> None:
    async with api.session.get(f"{api.url}/v1/nothing") as response:
        assert_error(response.status, await response.json(), 404)
    async with api.session.get(f"{api.url}/v1/chat/completions") as response:
        assert_error(response.status, await response.json(), 405)


async def test_foreign_host_header_is_refused(api: Served) -> None:
    async with api.session.get(f"{api.url}/v1/status", headers={"Host": "evil.example:8470"}) as response:
        assert_error(response.status, await response.json(), 403, "evil.example")


async def test_chat_while_loading_is_a_503(make_api: MakeApi) -> None:
    api = await make_api(loaded=False)
    status, body = await post_chat(api, {"messages": HELLO})
    assert_error(status, body, 503, "loading")
    async with api.session.get(f"{api.url}/v1/models") as response:
        assert (await response.json())["data"] == []


# -- answers -----------------------------------------------------------------------------------


async def test_non_stream_answer_has_openai_shape(api: Served) -> None:
    status, body = await post_chat(api, {"messages": HELLO, "model": "fake-model"})
    assert status == 200, body
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": reply_for(HELLO)}
    assert choice["finish_reason"] == "stop"
    prompt_len = len("<user>hello<assistant>")
    completion_len = len(reply_for(HELLO)) + 1  # the EOS token counts
    assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": completion_len,
                             "total_tokens": prompt_len + completion_len}


async def test_defaults_and_greedy_reach_the_engine(api: Served) -> None:
    await post_chat(api, {"messages": HELLO})
    await post_chat(api, {"messages": HELLO, "temperature": 0, "top_k": 5, "top_p": 0.5,
                          "seed": 7, "max_completion_tokens": 9})
    (_, defaults), (_, greedy) = api.engine.calls
    assert (defaults.temperature, defaults.max_tokens, defaults.top_k, defaults.top_p) == (1.0, 256, 0, 1.0)
    assert defaults.seed is None
    assert greedy.greedy
    assert (greedy.top_k, greedy.top_p, greedy.seed, greedy.max_tokens) == (5, 0.5, 7, 9)


async def test_max_tokens_cuts_the_answer(api: Served) -> None:
    status, body = await post_chat(api, {"messages": HELLO, "max_tokens": 4})
    assert status == 200
    assert body["choices"][0]["message"]["content"] == reply_for(HELLO)[:4]
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 4


async def test_stop_string_ends_the_answer_before_it(api: Served) -> None:
    status, body = await post_chat(api, {"messages": HELLO, "stop": ["o: h", "zzz"]})
    assert status == 200
    assert body["choices"][0]["message"]["content"] == "ech"
    assert body["choices"][0]["finish_reason"] == "stop"


async def stream_chat(api: Served, body: dict[str, Any]) -> list[Any]:
    async with api.session.post(f"{api.url}/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        return await read_all(response)


async def test_stream_has_openai_chunk_shape(api: Served) -> None:
    items = await stream_chat(api, {"messages": HELLO})
    assert items[-1] == DONE
    chunks = items[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == reply_for(HELLO)
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}
    assert "usage" not in chunks[-1]


async def test_stream_usage_chunk_when_asked(api: Served) -> None:
    items = await stream_chat(api, {"messages": HELLO, "max_tokens": 3,
                                    "stream_options": {"include_usage": True}})
    *chunks, usage_chunk, done = items
    assert done == DONE
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["usage"] is None for c in chunks)
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 3


async def test_stream_with_stop_string(api: Served) -> None:
    items = await stream_chat(api, {"messages": HELLO, "stop": "lo"})
    chunks = items[:-1]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "echo: hel"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_client_disconnect_cancels_generation(make_api: MakeApi) -> None:
    api = await make_api(FakeEngine(token_delay_s=0.01, endless=True))
    body = {"messages": HELLO, "stream": True, "max_tokens": 4096}
    async with api.session.post(f"{api.url}/v1/chat/completions", json=body) as response:
        async for item in sse_items(response):
            if item["choices"][0]["delta"].get("content"):
                break
        response.close()
    assert await asyncio.to_thread(api.engine.cancelled.wait, 10)
    # the worker is free again: the next request is answered in full
    api.engine.endless = False
    api.engine.token_delay_s = 0.0
    status, answer = await post_chat(api, {"messages": HELLO})
    assert status == 200
    assert answer["choices"][0]["message"]["content"] == reply_for(HELLO)


async def test_non_stream_client_disconnect_cancels_generation(make_api: MakeApi) -> None:
    api = await make_api(FakeEngine(token_delay_s=0.01, endless=True))
    body = {"messages": HELLO, "max_tokens": 4096}
    request = asyncio.create_task(api.session.post(f"{api.url}/v1/chat/completions", json=body))
    assert await asyncio.to_thread(api.engine.started.wait, 10)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    assert await asyncio.to_thread(api.engine.cancelled.wait, 10)


async def test_concurrent_requests_all_answered_on_one_thread(api: Served) -> None:
    conversations = [[{"role": "user", "content": f"question {i}"}] for i in range(4)]
    results = await asyncio.gather(*(post_chat(api, {"messages": m}) for m in conversations),
                                   stream_chat(api, {"messages": HELLO}))
    for (status, body), messages in zip(results[:4], conversations):
        assert status == 200
        assert body["choices"][0]["message"]["content"] == reply_for(messages)
    assert results[4][-1] == DONE
    assert set(api.engine.generate_threads) == {"meshllm-worker"}


# -- control -----------------------------------------------------------------------------------


async def test_models_lists_the_served_model(api: Served) -> None:
    async with api.session.get(f"{api.url}/v1/models") as response:
        assert await response.json() == {
            "object": "list",
            "data": [{"id": "fake-model", "object": "model", "created": 0, "owned_by": "meshllm"}],
        }


async def test_status_describes_a_single_node(api: Served) -> None:
    async with api.session.get(f"{api.url}/v1/status") as response:
        status = await response.json()
    assert status["self_id"] == "n-test"
    assert status["model"] == {"id": "fake0123456789ab", "name": "fake-model", "num_layers": 4, "weights": "f32",
                               "kernel": "", "batch_invariant": False, "private_layers": 0}
    assert status["coordinator_id"] == "n-test"
    assert status["plan"] == {"term": 0, "state": "active",
                              "stages": [{"node_id": "n-test", "start_layer": 0, "end_layer": 4}]}
    [node] = status["nodes"]
    assert node["is_self"] and node["role"] == "coordinator" and node["state"] == "ready"
    assert node["span"] == [0, 4] and node["ms_per_layer"] == 1.5
    assert status["incompatible"] == []
    assert status["sessions"] == {"running": 0, "queued": 0, "max": 16, "queue_max": 64}


async def test_status_while_loading_has_no_plan(make_api: MakeApi) -> None:
    api = await make_api(loaded=False)
    async with api.session.get(f"{api.url}/v1/status") as response:
        status = await response.json()
    assert status["plan"] is None and status["model"] is None
    assert status["nodes"][0]["state"] == "starting" and status["nodes"][0]["span"] is None


async def test_events_start_with_status_then_logs_and_pings(make_api: MakeApi) -> None:
    api = await make_api(keepalive_s=0.05)
    async with api.session.get(f"{api.url}/v1/events") as response:
        assert response.content_type == "text/event-stream"
        items = sse_items(response)
        first = await anext(items)
        assert first["type"] == "status" and first["status"]["self_id"] == "n-test"
        assert await anext(items) == ": ping"
        api.hub.log("join", "node b joined")
        event = await anext(items)
        while event == ": ping":
            event = await anext(items)
        assert event["type"] == "log" and event["kind"] == "join"
        assert event["message"] == "node b joined" and isinstance(event["ts"], float)


async def test_events_follow_session_count(api: Served) -> None:
    async with api.session.get(f"{api.url}/v1/events") as response:
        items = sse_items(response)
        assert (await anext(items))["status"]["sessions"]["running"] == 0
        await post_chat(api, {"messages": HELLO})
        assert (await anext(items))["status"]["sessions"]["running"] == 1
        assert (await anext(items))["status"]["sessions"]["running"] == 0


async def test_down_answers_then_stops(api: Served) -> None:
    async with api.session.post(f"{api.url}/v1/down", json={}) as response:
        assert response.status == 200
        assert await response.json() == {"ok": True}
    assert api.stop_requested.is_set()


async def test_down_needs_json_content_type(api: Served) -> None:
    async with api.session.post(f"{api.url}/v1/down", data=b"") as response:
        assert response.status == 415
    assert not api.stop_requested.is_set()


async def test_a_bad_request_does_not_disturb_a_stream(make_api: MakeApi) -> None:
    api = await make_api(FakeEngine(token_delay_s=0.005))
    messages = [{"role": "user", "content": "a longer question"}]
    stream = asyncio.create_task(stream_chat(api, {"messages": messages}))
    assert await asyncio.to_thread(api.engine.started.wait, 10)
    async with aiohttp.ClientSession() as other:
        async with other.post(f"{api.url}/v1/chat/completions", data=b"{oops",
                              headers={"Content-Type": "application/json"}) as response:
            assert response.status == 400
    items = await stream
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in items[:-1]) == reply_for(messages)
