"""The scheduler's OpenAI-compatible HTTP API, driven by OpenAI's own Python
client against the in-process stack (tiny model; tool rounds are forced
completions, so the sandboxed python tool really runs)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from conveyor_common.server import stop_server

PROGRAM = "```python\nimport time\nx = 6\ntime.sleep(0.2)\nprint(x * 7)\n```\n"
ANSWER = "The answer is 42."


@pytest.fixture(scope="module")
async def http_url(worker, gateway):
    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server, http_port

    _, worker_target = worker
    config = SchedulerConfig(worker_target=worker_target, gateway_target=gateway, http_port=0)
    server, _ = await create_server(config)
    yield f"http://127.0.0.1:{http_port(server)}"
    await stop_server(server, 0)


@pytest.fixture
async def client(http_url):
    async with openai.AsyncOpenAI(base_url=f"{http_url}/v1", api_key="unused") as c:
        yield c


async def _model(client) -> str:
    models = (await client.models.list()).data
    assert len(models) == 1
    return models[0].id


def _forced(*completions: str, mode: str = "partial") -> dict:
    return {
        "conveyor": {
            "forced_completions": list(completions),
            "max_rounds": len(completions),
            "mode": mode,
        }
    }


async def test_models_and_health(client, http_url):
    assert (await _model(client)).startswith("tiny") or await _model(client)
    async with httpx.AsyncClient() as h:
        assert (await h.get(f"{http_url}/health")).json() == {"status": "ok"}


async def test_a_hosted_tool_runs_server_side_across_rounds(client):
    model = await _model(client)
    reply = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is 6 * 7? Use Python."}],
        extra_body=_forced(PROGRAM, ANSWER),
    )
    choice = reply.choices[0]
    assert choice.message.content == PROGRAM + ANSWER
    assert choice.finish_reason == "stop"
    assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens > 0
    events = reply.model_extra["conveyor"]["events"]
    kinds = [e["event"] for e in events]
    assert "unit_dispatched" in kinds and kinds[-1] == "run_finished"
    results = [e["result"] for e in events if e["event"] == "unit_result"]
    assert any(r.get("stdout") == "42\n" for r in results)
    # Partial execution: the units went out while the model was still writing.
    assert any(e.get("duringDecode") for e in events if e["event"] == "unit_dispatched")


async def test_streaming_gives_content_deltas_events_and_usage(client):
    model = await _model(client)
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is 6 * 7? Use Python."}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body=_forced(PROGRAM, ANSWER),
    )
    text, finish, usage, extras = "", None, None, []
    first_dispatch_at = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if (chunk.model_extra or {}).get("conveyor"):
            extras.append(chunk.model_extra["conveyor"]["event"])
            if extras[-1] == "unit_dispatched" and first_dispatch_at is None:
                first_dispatch_at = len(text)
    assert text == PROGRAM + ANSWER and finish == "stop"
    assert usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert "unit_result" in extras and "tool_call_finished" in extras
    assert extras[-1] == "run_finished"
    # Partial execution: the first unit went out before the program was written.
    assert first_dispatch_at is not None and first_dispatch_at < PROGRAM.index("print")


async def test_sequential_mode_dispatches_once_the_call_is_complete(client):
    reply = await client.chat.completions.create(
        model=await _model(client),
        messages=[{"role": "user", "content": "6 * 7"}],
        extra_body=_forced(PROGRAM, ANSWER, mode="sequential"),
    )
    kinds = [e["event"] for e in reply.model_extra["conveyor"]["events"]]
    # The call's units go out together once it is complete, before any result.
    assert kinds.count("unit_dispatched") == 4
    last_dispatch = max(i for i, k in enumerate(kinds) if k == "unit_dispatched")
    assert last_dispatch < kinds.index("unit_result")


async def test_sampling_parameters_are_accepted_and_limits_apply(client):
    reply = await client.chat.completions.create(
        model=await _model(client),
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        temperature=0.7,
        top_p=0.9,
        seed=5,
        max_completion_tokens=3,
        stop=["\n\n"],
        extra_body={"conveyor": {"max_rounds": 1}},
    )
    assert reply.usage.completion_tokens <= 3


@pytest.mark.parametrize(
    "change, status, param",
    [
        ({"model": "no-such-model"}, 404, "model"),
        ({"n": 2}, 400, "n"),
        ({"temperature": 5}, 400, "temperature"),
        ({"top_p": "high"}, 400, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
        (
            {"tools": [{"type": "function", "function": {"name": ""}}]},
            400,
            "tools[0].function.name",
        ),
        ({"tool_choice": "required"}, 400, "tool_choice"),
        ({"conveyor": {"mode": "eager"}}, 400, "conveyor.mode"),
    ],
)
async def test_bad_requests_get_openai_errors(client, change, status, param):
    body = {"model": await _model(client), "messages": [{"role": "user", "content": "hi"}]}
    body.update(change)
    model = body.pop("model")
    messages = body.pop("messages")
    with pytest.raises(openai.APIStatusError) as e:
        await client.chat.completions.create(model=model, messages=messages, extra_body=body)
    assert e.value.status_code == status
    error = e.value.body if isinstance(e.value.body, dict) else {}
    assert error.get("param") == param, e.value.body
    if status == 404:
        assert error.get("code") == "model_not_found"


async def test_a_body_that_is_not_json_is_a_400(http_url):
    async with httpx.AsyncClient() as h:
        reply = await h.post(f"{http_url}/v1/chat/completions", content=b"{not json")
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"


async def test_a_client_that_disconnects_cancels_its_run(http_url, worker, client):
    engine, _ = worker
    body = {
        "model": await _model(client),
        "messages": [{"role": "user", "content": "Talk for a long time."}],
        "stream": True,
        **_forced("word " * 3000),
    }
    async with httpx.AsyncClient(timeout=30) as h:
        async with h.stream("POST", f"{http_url}/v1/chat/completions", json=body) as reply:
            seen = 0
            async for line in reply.aiter_lines():
                seen += '"content"' in line
                if seen >= 5:
                    break
    for _ in range(100):  # the worker drops the request at its next step
        if engine.running == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.running == 0


async def test_the_readme_openai_example_runs_as_written(http_url):
    import os
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    start = readme.index("```python\n", readme.index("Any OpenAI client works")) + 10
    code = readme[start : readme.index("```\n", start)]
    assert "http://localhost:8080/v1" in code
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code.replace("http://localhost:8080/v1", f"{http_url}/v1"),
        env={**os.environ, "PYTHONPATH": f"{root / 'gen'}:{root}"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out, "the example printed no content"  # the tiny model writes noise


async def test_langchains_openai_chat_model_works_against_it(client, http_url):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(
        base_url=f"{http_url}/v1",
        api_key="unused",
        model=await _model(client),
        max_tokens=8,
        extra_body={"conveyor": {"max_rounds": 1}},
    )
    reply = await chat.ainvoke("Say hi.")
    assert isinstance(reply.content, str)
    chunks = [c async for c in chat.astream("Say hi.")]
    assert chunks and all(isinstance(c.content, str) for c in chunks)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
WEATHER_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


async def test_a_client_tool_round_trip_as_openai_does_it(client):
    """The model calls a tool the client defines: tool_calls and finish_reason
    "tool_calls"; the client's role "tool" message continues the conversation."""
    model = await _model(client)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    reply = await client.chat.completions.create(
        model=model, messages=messages, tools=[WEATHER], extra_body=_forced(WEATHER_CALL, "x")
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    answer = await client.chat.completions.create(
        model=model,
        messages=messages,
        tools=[WEATHER],
        extra_body=_forced("It is 18 C and sunny in Paris."),
    )
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.content == "It is 18 C and sunny in Paris."
    assert not answer.choices[0].message.tool_calls


async def test_a_streamed_client_tool_call_and_a_hosted_tool_in_one_conversation(client):
    """Round 0 runs hosted Python server-side; round 1 calls the client's tool."""
    stream = await client.chat.completions.create(
        model=await _model(client),
        messages=[{"role": "user", "content": "Compute, then ask for the weather."}],
        tools=[WEATHER],
        stream=True,
        extra_body=_forced(PROGRAM, WEATHER_CALL, "x"),
    )
    calls, finish, events, pieces = {}, None, [], 0
    async for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                calls.setdefault(delta.index, [delta.id, delta.function.name, ""])
                calls[delta.index][2] += delta.function.arguments or ""
                pieces += 1
        if (chunk.model_extra or {}).get("conveyor"):
            events.append(chunk.model_extra["conveyor"])
    assert finish == "tool_calls"
    assert [(name, json.loads(args)) for _, name, args in calls.values()] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert pieces > 1  # the arguments streamed as the model wrote them
    results = [e["result"] for e in events if e["event"] == "unit_result"]
    assert any(r.get("stdout") == "42\n" for r in results)


async def test_a_client_tool_named_like_a_hosted_one_is_the_hosted_one(client):
    reply = await client.chat.completions.create(
        model=await _model(client),
        messages=[{"role": "user", "content": "6 * 7"}],
        tools=[{"type": "function", "function": {"name": "python"}}],
        extra_body=_forced(PROGRAM, ANSWER),
    )
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls
