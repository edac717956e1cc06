"""The openai engine against a hostile peer: a real HTTP server on 127.0.0.1
that speaks the OpenAI protocol (`/v1/models`, `/health`, SSE
`/v1/completions`) and is told per test what to send, misbehaving included.
Everything else is real: OpenAIEngine behind the gRPC worker, called through
its stub.

What must hold: a well-behaved stream gives the decoded text and the server's
finish reason, from a request that carries the prompt's ids; a malformed
stream ends only its own request, with a message that says what was wrong,
while a concurrent request on the same worker finishes; HTTP errors map to
INVALID_ARGUMENT and UNAVAILABLE; a server gone is UNAVAILABLE at once and
turns the worker NOT_SERVING, and back when it returns; an abort, a cancelled
call and a stop string close the server's connection; a server that ignores
the forcing fails the forced request; the API key reaches the server."""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import pytest
from conveyor.v1 import common_pb2, llm_worker_pb2, llm_worker_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

import llm_worker.server
from conveyor_common.server import stop_server
from llm_worker.config import WorkerConfig
from llm_worker.server import create_server

SERVED = "served-tiny"  # the model id the peer's /v1/models names
MAX_MODEL_LEN = 3072  # the peer's context (the tiny model's own is 8192)
ANSWER = "The quick brown fox jumps."
DONE = b"data: [DONE]\n\n"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


# -- the peer ---------------------------------------------------------------


@dataclass
class Reply:
    """What the peer answers one /v1/completions request with. For status
    200, `events` are streamed `delay` seconds apart, then the connection
    closes: a dict is one `data:` event, bytes go as they are, and an
    asyncio.Event holds the stream until it is set."""

    events: list = field(default_factory=list)
    status: int = 200
    body: bytes = b""  # for a status other than 200
    delay: float = 0.0


@dataclass
class Exchange:
    """One /v1/completions request as the peer saw it."""

    headers: dict[str, str]
    body: dict
    sent: int = 0  # events written
    hung_up: asyncio.Event = field(default_factory=asyncio.Event)  # the client closed first


def event(ids: list | None = None, text: str = "", finish: str | None = None) -> dict:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = ids
    return {"id": "cmpl-1", "object": "text_completion", "model": SERVED, "choices": [choice]}


def stream_of(ids: list[int], finish: str = "stop", per_event: int = 2) -> list:
    """`ids` as vLLM streams them: a few per event, the finish on the last,
    then the usage event and [DONE]."""
    events = [event(ids[i : i + per_event]) for i in range(0, len(ids), per_event)]
    events[-1]["choices"][0]["finish_reason"] = finish
    usage = {"prompt_tokens": 10, "completion_tokens": len(ids), "total_tokens": 10 + len(ids)}
    return [*events, {"id": "cmpl-1", "choices": [], "usage": usage}, DONE]


class Peer:
    """An OpenAI-compatible server that does what `script(body)` says."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.script: Callable[[dict], Reply] = self.well_behaved
        self.exchanges: list[Exchange] = []
        self.headers_seen: list[tuple[str, dict]] = []  # (path, headers) of every request
        self.port = 0
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def asks(self, body: dict, word: str) -> bool:
        """Whether the request's prompt mentions `word`."""
        return word in self.tokenizer.decode(body["prompt"])

    def well_behaved(self, body: dict) -> Reply:
        """ANSWER, or the forced ids where the request forces some (as vLLM
        with the ForcedTokens logits processor does)."""
        forced = body.get("vllm_xargs", {}).get("conveyor_forced")
        if forced is not None:
            return Reply(stream_of(forced, "length"))
        return Reply(stream_of(self.ids(ANSWER)))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Closes the port and every open connection."""
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self._handlers.add(asyncio.current_task())
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.strip().split("\r\n")
            method, path, _ = request_line.split(" ")
            headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in lines)}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            self.headers_seen.append((path, headers))
            if path == "/v1/models":
                model = {"id": SERVED, "object": "model", "max_model_len": MAX_MODEL_LEN}
                await self._send(writer, 200, json.dumps({"object": "list", "data": [model]}))
            elif path == "/health":
                await self._send(writer, 200, "")
            elif method == "POST" and path == "/v1/completions":
                await self._complete(reader, writer, Exchange(headers, json.loads(body)))
            else:
                await self._send(writer, 404, '{"error": "not found"}')
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._handlers.discard(asyncio.current_task())
            writer.close()

    async def _send(self, writer, status: int, body: str | bytes) -> None:
        data = body.encode() if isinstance(body, str) else body
        writer.write(_head(status, "application/json", len(data)) + data)
        await writer.drain()

    async def _complete(self, reader, writer, exchange: Exchange) -> None:
        self.exchanges.append(exchange)
        reply = self.script(exchange.body)
        if reply.status != 200:
            await self._send(writer, reply.status, reply.body)
            return
        writer.write(_head(200, "text/event-stream"))  # no length: the body ends at close
        watch = asyncio.create_task(reader.read(1))  # b"" (or a reset) once the client hangs up
        watch.add_done_callback(lambda t: t.cancelled() or exchange.hung_up.set())
        try:
            for item in reply.events:
                if isinstance(item, asyncio.Event):
                    await _first(item.wait(), exchange.hung_up.wait())
                    continue
                await asyncio.sleep(reply.delay)
                if exchange.hung_up.is_set():
                    return
                writer.write(item if isinstance(item, bytes) else b"data: %s\n\n" % _json(item))
                await writer.drain()
                exchange.sent += 1
        finally:
            watch.cancel()


async def _first(*aws) -> None:
    """Waits until the first of `aws` is done."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        task.cancel()


def _head(status: int, content_type: str, length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}"]
    lines += [f"Content-Type: {content_type}", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _json(item: dict) -> bytes:
    return json.dumps(item).encode()


# -- the worker -------------------------------------------------------------


@contextlib.asynccontextmanager
async def worker_on(url: str, model_dir, **config):
    """(engine, channel) of a worker whose openai engine fronts `url`."""
    from llm_worker.engines.openai_remote import OpenAIEngine

    cfg = WorkerConfig(engine="openai", engine_url=url, model=str(model_dir), **config)
    engine = await OpenAIEngine.open(cfg)
    server, port = await create_server(cfg, engine=engine)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield engine, channel
    finally:
        await stop_server(server, 0)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
async def peer(tokenizer):
    peer = Peer(tokenizer)
    await peer.start()
    yield peer
    await peer.stop()


@pytest.fixture(scope="module")
async def worker(peer, tiny_model_dir):
    # Given as ".../v1/": the engine takes the base URL either way.
    async with worker_on(peer.url + "/v1/", tiny_model_dir) as (engine, channel):
        yield engine, llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)


@pytest.fixture
def stub(worker, peer):
    """The shared worker's stub, its peer well-behaved again."""
    peer.script = peer.well_behaved
    peer.exchanges.clear()
    peer.headers_seen.clear()
    return worker[1]


def request(content: str = "Say something.", **kw) -> llm_worker_pb2.GenerateRequest:
    return llm_worker_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)], **kw
    )


def forced(text: str, **kw) -> llm_worker_pb2.GenerateRequest:
    return request(forced_decoding=common_pb2.ForcedDecoding(completion=text), **kw)


async def collect(responses) -> tuple[str, int | None, str | None]:
    """(text, finish reason or None, error message or None) of a stream."""
    text, finish, error = "", None, None
    async for response in responses:
        kind = response.WhichOneof("event")
        assert finish is None and error is None, "an event after the end"
        if kind == "delta":
            text += response.delta.text
        elif kind == "complete":
            finish = response.complete.finish_reason
        else:
            error = response.error.message
    return text, finish, error


async def wait_idle(engine, seconds: float = 2.0) -> None:
    deadline = time.monotonic() + seconds
    while engine.running and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert engine.running == 0


# -- 1, 2: well-behaved streams ---------------------------------------------


@pytest.mark.parametrize(
    ("reason", "finish"),
    [("stop", common_pb2.FINISH_REASON_STOP), ("length", common_pb2.FINISH_REASON_LENGTH)],
)
async def test_a_well_behaved_stream(stub, peer, tokenizer, reason, finish):
    peer.script = lambda body: Reply(stream_of(peer.ids(ANSWER), reason))
    sampling = common_pb2.SamplingParams(max_new_tokens=50, temperature=0.5, top_p=0.9, seed=3)
    assert await collect(stub.Generate(request(sampling=sampling), timeout=10)) == (
        ANSWER,
        finish,
        None,
    )
    (exchange,) = peer.exchanges
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say something."}], add_generation_prompt=True, tokenize=False
    )
    assert exchange.body["prompt"] == tokenizer.encode(rendered, add_special_tokens=False)
    assert {k: exchange.body[k] for k in ("model", "stream", "max_tokens", "seed")} == {
        "model": SERVED,
        "stream": True,
        "max_tokens": 50,
        "seed": 3,
    }
    assert exchange.body["temperature"] == pytest.approx(0.5)
    assert "vllm_xargs" not in exchange.body and "authorization" not in exchange.headers


async def test_model_info_describes_the_server(stub, peer, tiny_model_dir):
    info = await stub.GetModelInfo(llm_worker_pb2.GetModelInfoRequest(), timeout=5)
    assert (info.engine, info.max_context_tokens, info.device, info.model, info.dtype) == (
        "openai",
        MAX_MODEL_LEN,
        peer.url,
        str(tiny_model_dir),
        "",
    )


async def test_a_forced_request_sends_the_forced_ids(stub, peer):
    text = "one two three four five"
    assert await collect(stub.Generate(forced(text), timeout=10)) == (
        text,
        common_pb2.FINISH_REASON_FORCED_END,
        None,
    )
    body = peer.exchanges[0].body
    ids = peer.ids(text)
    assert body["vllm_xargs"] == {"conveyor_forced": ids}
    assert (body["max_tokens"], body["temperature"], body["ignore_eos"]) == (len(ids), 0.0, True)


async def test_a_stream_of_text_only(stub, peer):
    pieces = ["The quick", " brown fox", " jumps", " over naïve dogs."]
    events = [event(text=p) for p in pieces[:-1]] + [event(text=pieces[-1], finish="stop"), DONE]
    peer.script = lambda body: Reply(events)
    assert await collect(stub.Generate(request(), timeout=10)) == (
        "".join(pieces),
        common_pb2.FINISH_REASON_STOP,
        None,
    )


# -- 3: hostile streams fail their own request alone -------------------------

VOCAB = 49152  # the tiny model's (SmolLM2's) vocabulary
GOOD = [504, 2365]  # "The quick"
HOSTILE = {
    "invalid JSON": (
        [event(GOOD), b"data: {not json\n\n"],
        "engine server stream failed: not JSON: '{not json'",
    ),
    "an id past the vocabulary": (
        [event([*GOOD, VOCAB])],
        f"engine server stream failed: token_ids outside the vocabulary of {VOCAB}",
    ),
    "a negative id": (
        [event([-1])],
        f"engine server stream failed: token_ids outside the vocabulary of {VOCAB}",
    ),
    "a boolean id": (
        [event([True])],
        f"engine server stream failed: token_ids outside the vocabulary of {VOCAB}",
    ),
    "a line over 1 MiB": (
        [event(GOOD), b"data: " + b"x" * (1 << 20) + b"x" * 4096],
        "engine server stream failed: a line over 1048576 bytes",
    ),
    "choices not a list": (
        [{"id": "cmpl-1", "choices": {"0": {"text": "hi"}}}],
        "engine server stream failed: an event without choices",
    ),
    "no finish and no [DONE]": ([event(GOOD)], "the engine's stream ended early"),
    "an unknown finish reason": (
        [event(GOOD, finish="content_filter")],
        "the engine server ended it: 'content_filter'",
    ),
}


@pytest.mark.parametrize("case", HOSTILE)
async def test_a_hostile_stream_fails_only_its_request(stub, peer, case):
    events, message = HOSTILE[case]
    await _hostile_beside_a_good_one(stub, peer, Reply(events), message)


async def test_a_mid_stream_error_event(stub, peer):
    error = {"error": {"message": "KV cache exhausted", "type": "InternalServerError"}}
    reply = Reply([event(GOOD), error, event([5, 6], finish="stop"), DONE])
    text, message = await _hostile_beside_a_good_one(stub, peer, reply, None)
    assert message.startswith("engine server: ") and "KV cache exhausted" in message
    assert text == "The quick"  # what came before the error


async def _hostile_beside_a_good_one(stub, peer, hostile: Reply, message: str | None):
    """Runs the hostile request while a well-behaved one is mid-stream (held
    until the hostile one has ended); returns the hostile (text, error)."""
    gate = asyncio.Event()
    good_events = stream_of(peer.ids(ANSWER))
    good_events.insert(1, gate)
    peer.script = lambda body: hostile if peer.asks(body, "poison") else Reply(good_events)
    good = aiter(stub.Generate(request(), timeout=10))
    first = await anext(good)
    assert first.delta.text == "The"
    text, finish, error = await collect(stub.Generate(request("poison"), timeout=10))
    assert finish is None and error is not None
    if message is not None:
        assert error == message
    gate.set()
    rest = await collect(good)
    assert rest == (ANSWER.removeprefix("The"), common_pb2.FINISH_REASON_STOP, None)
    return text, error


# -- 4: HTTP errors ----------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "prefix"),
    [
        (400, grpc.StatusCode.INVALID_ARGUMENT, "the engine server refused the request (400): "),
        (422, grpc.StatusCode.INVALID_ARGUMENT, "the engine server refused the request (422): "),
        (500, grpc.StatusCode.UNAVAILABLE, "the engine server answered 500: "),
        (503, grpc.StatusCode.UNAVAILABLE, "the engine server answered 503: "),
    ],
)
async def test_http_errors_map_to_grpc_codes(stub, peer, status, code, prefix):
    why = f"maximum context length is {MAX_MODEL_LEN} tokens"
    body = json.dumps({"error": {"message": why, "type": "BadRequestError"}}).encode()
    peer.script = lambda _: Reply(status=status, body=body)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub.Generate(request(), timeout=10))
    assert (err.value.code(), err.value.details()) == (code, prefix + why)


# -- 5: the server goes away and comes back ----------------------------------


async def test_a_server_gone_is_unavailable_and_not_serving(tokenizer, tiny_model_dir, monkeypatch):
    poll = 0.1
    monkeypatch.setattr(llm_worker.server, "HEALTH_POLL_SECONDS", poll)
    peer = Peer(tokenizer)
    await peer.start()
    async with worker_on(peer.url, tiny_model_dir, engine_connect_timeout=5.0) as (_, channel):
        stub = llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def health_becomes(status) -> float:
            start = time.monotonic()
            while time.monotonic() - start < 5 * poll + 1.0:
                if (await health.Check(health_pb2.HealthCheckRequest())).status == status:
                    return time.monotonic() - start
                await asyncio.sleep(poll / 4)
            pytest.fail(f"health never became {status}")

        await health_becomes(SERVING)
        await peer.stop()
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub.Generate(request(), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details().startswith("cannot reach the engine server")
        assert time.monotonic() - start < 1.0
        await health_becomes(NOT_SERVING)

        await peer.start()  # the same port
        await health_becomes(SERVING)
        assert await collect(stub.Generate(request(), timeout=10)) == (
            ANSWER,
            common_pb2.FINISH_REASON_STOP,
            None,
        )
    await peer.stop()


# -- 6, 7: the worker ends a stream early: the server sees the hang-up --------


def slow(peer: Peer, text: str = "", then: int = 100, delay: float = 0.2) -> Reply:
    """`text`, then `then` more tokens, one event each, `delay` s apart."""
    ids = peer.ids(text) + peer.ids(" word") * then
    return Reply([event([i]) for i in ids] + [event([], finish="length"), DONE], delay=delay)


def stalled(peer: Peer) -> Reply:
    """One token, then silence (well within the read timeout)."""
    return Reply([event(peer.ids(" word")), asyncio.Event(), event([], finish="length"), DONE])


PACES = {"slow": slow, "stalled": stalled}


@pytest.mark.parametrize("pace", PACES)
async def test_abort_ends_the_stream_and_the_connection(worker, stub, peer, pace):
    engine, _ = worker
    peer.script = lambda _: PACES[pace](peer)
    responses = aiter(stub.Generate(request(request_id="slow-1"), timeout=10))
    assert (await anext(responses)).delta.text == " word"
    start = time.monotonic()
    assert (await stub.Abort(llm_worker_pb2.AbortRequest(request_id="slow-1"))).found
    assert await collect(responses) == ("", common_pb2.FINISH_REASON_ABORTED, None)
    assert time.monotonic() - start < 0.5
    (exchange,) = peer.exchanges
    await asyncio.wait_for(exchange.hung_up.wait(), 2.0)
    assert exchange.sent < 10
    await wait_idle(engine)


@pytest.mark.parametrize("pace", PACES)
async def test_a_cancelled_call_closes_the_connection(worker, stub, peer, pace):
    engine, _ = worker
    peer.script = lambda _: PACES[pace](peer)
    call = stub.Generate(request(), timeout=10)
    assert (await anext(aiter(call))).delta.text == " word"
    call.cancel()
    (exchange,) = peer.exchanges
    await asyncio.wait_for(exchange.hung_up.wait(), 2.0)
    assert exchange.sent < 10
    await wait_idle(engine)


async def test_a_stop_string_closes_the_connection_early(worker, stub, peer):
    engine, _ = worker
    peer.script = lambda _: slow(peer, "one two three four", then=100, delay=0.02)
    sampling = common_pb2.SamplingParams(stop=["three"])
    assert await collect(stub.Generate(request(sampling=sampling), timeout=10)) == (
        "one two three",
        common_pb2.FINISH_REASON_STOP_STRING,
        None,
    )
    (exchange,) = peer.exchanges
    await asyncio.wait_for(exchange.hung_up.wait(), 1.0)
    assert exchange.sent < 10
    await wait_idle(engine)


# -- 8: a server that ignores the forcing -------------------------------------


@pytest.mark.parametrize(
    ("other", "reason"),
    [
        ("alpha beta gamma delta epsilon zeta", "length"),  # its own text, to the limit
        ("alpha beta", "stop"),  # its own text, then its own end of sequence
    ],
)
async def test_a_server_ignoring_the_forcing_fails_the_request(stub, peer, other, reason):
    peer.script = lambda body: Reply(stream_of(peer.ids(other)[: body["max_tokens"]], reason))
    _, finish, error = await collect(stub.Generate(forced("one two three four five"), timeout=10))
    assert (finish, error) == (None, "the engine did not follow the forced completion")


# -- 9: the API key ------------------------------------------------------------


async def test_the_api_key_reaches_the_server(tokenizer, tiny_model_dir):
    peer = Peer(tokenizer)
    await peer.start()
    async with worker_on(peer.url, tiny_model_dir, engine_api_key="sekrit-42") as (_, channel):
        stub = llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)
        await collect(stub.Generate(request(), timeout=10))
    await peer.stop()
    paths = [path for path, _ in peer.headers_seen]
    assert "/v1/models" in paths and "/v1/completions" in paths
    assert {h.get("authorization") for _, h in peer.headers_seen} == {"Bearer sekrit-42"}
