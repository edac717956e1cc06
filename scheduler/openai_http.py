"""The OpenAI-compatible HTTP front door of the scheduler (`--http-port`):
`POST /v1/chat/completions` (streamed as server-sent events, or not),
`GET /v1/models` and `GET /health`.

A chat completion is a `ConveyorService.Run` over a loopback gRPC channel to
this same scheduler, so every check, limit, metric and cancel of `Run`
applies unchanged; a client that disconnects cancels that call, exactly as a
gRPC client's cancel does. Tools the gateway hosts run server-side, with
partial execution, across rounds: the content carries the model's text of
every round, and each chunk may carry a `conveyor` field with the run's
other events (a tool call started, a unit dispatched while decoding, its
result, the timing), which plain OpenAI clients ignore.

Everything in a request is checked here first and refused the way OpenAI
refuses it (status, `error.type`, `error.param`, `error.code`).
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from aiohttp import web
from conveyor.v1 import common_pb2, conveyor_pb2, conveyor_pb2_grpc
from google.protobuf import json_format

from conveyor_common.security import (
    RELOAD_CHECK_SECONDS,
    ServerSecurity,
    Settled,
    TlsFiles,
    authorization_metadata,
    refuse,
)

log = structlog.get_logger("openai_http")

_ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "developer": common_pb2.ROLE_SYSTEM,  # OpenAI's newer name for the system prompt
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
    "tool": common_pb2.ROLE_TOOL,
}
# Run finish reasons as OpenAI's; the run's own reason is in `conveyor`.
_FINISH = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_MAX_ROUNDS: "length",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
# Runs that ended this way produced no answer: an error, not a completion.
_FAILED = {
    common_pb2.FINISH_REASON_ERROR: (502, "server_error"),
    common_pb2.FINISH_REASON_TOOL_ERROR: (502, "server_error"),
    common_pb2.FINISH_REASON_DEADLINE_EXCEEDED: (504, "timeout"),
}
_GRPC_TO_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (413, "invalid_request_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
MAX_STOP = 4  # OpenAI's limit on stop sequences
PLAYGROUND = Path(__file__).with_name("playground.html")
# A body over this is refused (413) before it is read: the gRPC request cap's
# default (4 MiB) plus room for JSON's overhead over protobuf.
MAX_BODY_BYTES = 8 * 1024 * 1024


class ApiError(Exception):
    """A request refused with OpenAI's error shape."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {
            "error": {
                "message": str(self),
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


@dataclass(frozen=True)
class ChatRequest:
    run: conveyor_pb2.RunRequest
    model: str
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ApiError(f"{name} must be a number in [{low:g}, {high:g}]", param=name)
    return float(value)


def _content(message: dict, i: int) -> str:
    """A message's text: a string, or a list of text parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise ApiError(
                    "only text content parts are supported", param=f"messages[{i}].content"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise ApiError("content must be a string or a list of parts", param=f"messages[{i}].content")


def _tool_call_text(calls: object, where: str) -> tuple[str, dict[str, str]]:
    """An assistant message's tool_calls as the model writes them (Hermes
    tags), and each call's id -> tool name for the tool messages after it."""
    if not isinstance(calls, list):
        raise ApiError("tool_calls must be a list", param=where)
    blocks, names = [], {}
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError("each tool call needs function.name", param=f"{where}[{j}]")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, json.JSONDecodeError):
            raise ApiError("arguments must be JSON text", param=f"{where}[{j}]") from None
        names[str(call.get("id", ""))] = function["name"]
        body = json.dumps({"name": function["name"], "arguments": arguments})
        blocks.append(f"<tool_call>\n{body}\n</tool_call>")
    return "\n".join(blocks), names


def _messages(body: dict) -> list[common_pb2.ChatMessage]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list", param="messages")
    out, called = [], {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ApiError(
                f"messages[{i}].role must be one of {', '.join(_ROLES)}",
                param=f"messages[{i}].role",
            )
        content = _content(m, i)
        if m["role"] == "assistant" and m.get("tool_calls"):
            text, names = _tool_call_text(m["tool_calls"], f"messages[{i}].tool_calls")
            called.update(names)
            # This server's replies hold the calls' own text in content; a
            # client that dropped it gets the calls written back in.
            if "<tool_call>" not in content:
                content = f"{content}\n{text}" if content else text
        tool_call_id = str(m.get("tool_call_id") or "")
        out.append(
            common_pb2.ChatMessage(
                role=_ROLES[m["role"]],
                content=content,
                name=str(m.get("name") or called.get(tool_call_id, "")),
                tool_call_id=tool_call_id,
            )
        )
    return out


def _tools(body: dict, hosted: set[str]) -> tuple[list[str], list[common_pb2.ToolSpec]]:
    """The hosted tools the request names (none named: every hosted tool),
    and the function tools it defines that the client runs."""
    if body.get("tool_choice", "auto") not in ("auto", None):
        raise ApiError('only tool_choice "auto" is supported', param="tool_choice")
    tools = body.get("tools")
    if tools is None:
        return [], []
    if not isinstance(tools, list):
        raise ApiError("tools must be a list", param="tools")
    names, client = [], []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not function:
            raise ApiError('each tool must be {"type": "function", ...}', param=f"tools[{i}]")
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError("each function needs a name", param=f"tools[{i}].function.name")
        if name in hosted:
            names.append(name)
            continue
        parameters = function.get("parameters", {})
        if not isinstance(parameters, dict):
            raise ApiError("parameters must be an object", param=f"tools[{i}].function.parameters")
        client.append(
            common_pb2.ToolSpec(
                name=name,
                description=str(function.get("description") or ""),
                parameters_json_schema=json.dumps(parameters),
            )
        )
    return names, client


def parse_chat_request(body: object, model: str, hosted: set[str]) -> ChatRequest:
    """An OpenAI chat completion request as a RunRequest, or ApiError."""
    if not isinstance(body, dict):
        raise ApiError("the body must be a JSON object")
    if body.get("model") != model:
        raise ApiError(
            f"The model `{body.get('model')}` does not exist; this server has `{model}`",
            status=404,
            param="model",
            code="model_not_found",
        )
    if body.get("n", 1) != 1:
        raise ApiError("only n=1 is supported", param="n")
    sampling = common_pb2.SamplingParams()
    if (t := _number(body, "temperature", 0, 2)) is not None:
        sampling.temperature = t
    if (p := _number(body, "top_p", 0, 1)) is not None:
        sampling.top_p = p
    for name in ("max_completion_tokens", "max_tokens"):
        if (limit := _number(body, name, 1, 2**31 - 1)) is not None:
            if limit != int(limit):
                raise ApiError(f"{name} must be an integer", param=name)
            sampling.max_new_tokens = int(limit)
            break
    if (seed := body.get("seed")) is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ApiError("seed must be an integer in [0, 2**64)", param="seed")
        sampling.seed = seed
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop or []
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise ApiError(f"stop must be a string or up to {MAX_STOP} strings", param="stop")
    sampling.stop.extend(stops)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError("stream must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("stream_options must be an object", param="stream_options")
    names, client_tools = _tools(body, hosted)
    run = conveyor_pb2.RunRequest(
        run_id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        messages=_messages(body),
        tool_names=names,
        client_tools=client_tools,
        mode=conveyor_pb2.EXECUTION_MODE_PARTIAL,
        sampling=sampling,
    )
    _extension(body.get("conveyor"), run)
    return ChatRequest(run, model, stream, bool(options.get("include_usage")))


def _extension(extra: object, run: conveyor_pb2.RunRequest) -> None:
    """Conveyor's own request fields, under "conveyor" (the OpenAI SDK's
    `extra_body`): mode "partial" | "sequential", max_rounds, and the
    benchmark feature forced_completions (one per round)."""
    if extra is None:
        return
    if not isinstance(extra, dict) or set(extra) - {"mode", "max_rounds", "forced_completions"}:
        raise ApiError(
            "conveyor may hold mode, max_rounds and forced_completions only", param="conveyor"
        )
    modes = {"partial": conveyor_pb2.EXECUTION_MODE_PARTIAL}
    modes["sequential"] = conveyor_pb2.EXECUTION_MODE_SEQUENTIAL
    if "mode" in extra:
        if extra["mode"] not in modes:
            raise ApiError('conveyor.mode must be "partial" or "sequential"', param="conveyor.mode")
        run.mode = modes[extra["mode"]]
    rounds = extra.get("max_rounds", 0)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ApiError("conveyor.max_rounds must be an integer ≥ 0", param="conveyor.max_rounds")
    run.max_rounds = rounds  # the scheduler checks it against its limit
    forced = extra.get("forced_completions", [])
    if not isinstance(forced, list) or not all(isinstance(f, str) for f in forced):
        raise ApiError(
            "conveyor.forced_completions must be a list of strings",
            param="conveyor.forced_completions",
        )
    run.forced_completions.extend(forced)


def conveyor_extra(event: conveyor_pb2.RunResponse) -> dict | None:
    """The `conveyor` field a chunk carries for a non-token event."""
    kind = event.WhichOneof("event")
    if kind in (None, "token_delta"):
        return None
    return {"event": kind, **json_format.MessageToDict(getattr(event, kind))}


def _usage(finished: conveyor_pb2.RunFinished) -> dict:
    t = finished.timing
    return {
        "prompt_tokens": t.prompt_tokens,
        "completion_tokens": t.completion_tokens,
        "total_tokens": t.prompt_tokens + t.completion_tokens,
    }


class ChatCompletions:
    """The handlers, over a ConveyorService stub of this scheduler."""

    def __init__(
        self,
        stub: conveyor_pb2_grpc.ConveyorServiceStub,
        model_name: Callable[[], Awaitable[str]],
        timeout: float,
        metadata: tuple[tuple[str, str], ...] = (),
    ):
        self._stub = stub
        self._model_name = model_name
        self._timeout = timeout
        self._metadata = metadata  # proves to the gRPC port that the call is ours

    async def _model(self) -> str:
        try:
            return await self._model_name()
        except Exception as e:  # the worker is down: nothing can be served
            raise ApiError(str(e), status=503, kind="server_error") from None

    async def models(self, request: web.Request) -> web.Response:
        try:
            model = await self._model()
        except ApiError as e:
            return e.response()
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": model, "object": "model", "created": 0, "owned_by": "conveyor"}],
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def tools(self, request: web.Request) -> web.Response:
        """ListTools in proto3's JSON mapping (for the playground)."""
        try:
            listed = await self._stub.ListTools(
                conveyor_pb2.ListToolsRequest(), timeout=10, metadata=self._metadata
            )
        except grpc.aio.AioRpcError as e:
            return _grpc_error(e).response()
        return web.json_response(json_format.MessageToDict(listed))

    async def playground(self, request: web.Request) -> web.Response:
        """The playground page: a prompt, tools and mode, and the run's live
        timeline (tokens, each unit's dispatch and result), with a rerun of
        the same output in the other mode beside it."""
        return web.Response(text=PLAYGROUND.read_text(encoding="utf-8"), content_type="text/html")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ApiError("the body is not valid JSON") from None
            model = await self._model()
            listed = await self._stub.ListTools(
                conveyor_pb2.ListToolsRequest(), timeout=10, metadata=self._metadata
            )
            chat = parse_chat_request(body, model, {t.name for t in listed.tools})
        except ApiError as e:
            return e.response()
        except grpc.aio.AioRpcError as e:
            return _grpc_error(e).response()
        call = self._stub.Run(chat.run, timeout=self._timeout, metadata=self._metadata)
        try:
            if chat.stream:
                return await self._stream(request, chat, call)
            return await self._whole(chat, call)
        finally:
            call.cancel()  # a no-op once the run ended; stops it if the client left

    async def _whole(self, chat: ChatRequest, call) -> web.Response:
        text, events, tool_calls = [], [], []
        finished = None
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "token_delta":
                    text.append(event.token_delta.text)
                elif kind == "client_tool_call":
                    c = event.client_tool_call
                    tool_calls.append(_tool_call(c.call_id, c.tool_name, c.arguments_json))
                elif kind == "run_finished":
                    finished = event.run_finished
                if (extra := conveyor_extra(event)) is not None:
                    events.append(extra)
        except grpc.aio.AioRpcError as e:
            return _grpc_error(e).response()
        if finished is None or finished.finish_reason in _FAILED:
            return _run_failed(finished).response()
        return web.json_response(
            {
                "id": chat.run.run_id,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": chat.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": "".join(text),
                            **({"tool_calls": tool_calls} if tool_calls else {}),
                        },
                        "finish_reason": _FINISH.get(finished.finish_reason, "stop"),
                    }
                ],
                "usage": _usage(finished),
                "conveyor": {"events": events},
            }
        )

    async def _stream(self, request: web.Request, chat: ChatRequest, call) -> web.StreamResponse:
        head = {
            "id": chat.run.run_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": chat.model,
        }
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(payload: dict | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await response.write(f"data: {data}\n\n".encode())

        def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
            return {
                **head,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                **extra,
            }

        await send(chunk({"role": "assistant", "content": ""}))
        finished = None
        streamed: dict[str, tuple[int, str]] = {}  # call id -> (index, arguments sent)
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "token_delta":
                    await send(chunk({"content": event.token_delta.text}))
                    continue
                if kind in ("client_tool_call_delta", "client_tool_call"):
                    delta = _tool_call_delta(event, streamed)
                    if delta is not None:
                        await send(chunk({"tool_calls": [delta]}))
                    continue
                if kind == "run_finished":
                    finished = event.run_finished
                await send(chunk({}, conveyor=conveyor_extra(event)))
        except grpc.aio.AioRpcError as e:
            await send(_grpc_error(e).body())
            return response
        if finished is None or finished.finish_reason in _FAILED:
            await send(_run_failed(finished).body())
        else:
            await send(chunk({}, _FINISH.get(finished.finish_reason, "stop")))
            if chat.include_usage:
                await send({**head, "choices": [], "usage": _usage(finished)})
        await send("[DONE]")
        return response


def _tool_call_delta(
    event: conveyor_pb2.RunResponse, streamed: dict[str, tuple[int, str]]
) -> dict | None:
    """A streamed `tool_calls` entry: the first piece of a call carries its
    id and name, later ones only more arguments; the complete call sends
    whatever its pieces had not (all of it, when none came)."""
    if event.WhichOneof("event") == "client_tool_call_delta":
        d = event.client_tool_call_delta
        call_id, name, more = d.call_id, d.tool_name, d.arguments_delta
    else:
        c = event.client_tool_call
        call_id, name = c.call_id, c.tool_name
        sent = streamed.get(call_id, (0, ""))[1]
        more = c.arguments_json[len(sent) :] if c.arguments_json.startswith(sent) else ""
        if call_id in streamed and not more:
            return None
    if call_id in streamed:
        index, sent = streamed[call_id]
        streamed[call_id] = (index, sent + more)
        return {"index": index, "function": {"arguments": more}}
    streamed[call_id] = (len(streamed), more)
    return {"index": streamed[call_id][0], **_tool_call(call_id, name, more)}


def _tool_call(call_id: str, name: str, arguments: str) -> dict:
    """One entry of OpenAI's `tool_calls`."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _grpc_error(e: grpc.aio.AioRpcError) -> ApiError:
    status, kind = _GRPC_TO_HTTP.get(e.code(), (500, "server_error"))
    return ApiError(f"{e.code().name}: {e.details()}", status=status, kind=kind)


def _run_failed(finished: conveyor_pb2.RunFinished | None) -> ApiError:
    if finished is None:
        return ApiError("the run ended without finishing", status=500, kind="server_error")
    status, kind = _FAILED[finished.finish_reason]
    reason = common_pb2.FinishReason.Name(finished.finish_reason).removeprefix("FINISH_REASON_")
    return ApiError(f"the run ended {reason}: {finished.message}", status=status, kind=kind)


# Reachable without credentials: liveness, and the playground's static page
# (its API calls carry the token typed into it).
OPEN_PATHS = frozenset({"/health", "/ui"})


def _peer_names(request: web.Request) -> set[str]:
    """DNS SANs and common name of the caller's verified certificate."""
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    if not cert:
        return set()
    names = {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    for rdn in cert.get("subject", ()):
        names |= {value for key, value in rdn if key == "commonName"}
    return names


def authenticate(security: ServerSecurity):
    """The gRPC port's policy (security.judge) on each HTTP request; a
    refusal is OpenAI-shaped: 401 with WWW-Authenticate, or 403."""

    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.path in OPEN_PATHS:
            return await handler(request)
        # The route, not the raw path: a label per path anyone can send is unbounded.
        route = request.match_info.route.resource
        path = route.canonical if route is not None else "unmatched"
        metadata = authorization_metadata(request.headers.get("Authorization"))
        verdict = refuse(security, metadata, _peer_names(request), "http", path)
        if verdict is None:
            return await handler(request)
        if verdict.code == grpc.StatusCode.PERMISSION_DENIED:
            return ApiError(verdict.message, status=403, kind="permission_error").response()
        response = ApiError(
            verdict.message, status=401, kind="invalid_request_error", code="invalid_api_key"
        ).response()
        response.headers["WWW-Authenticate"] = 'Bearer realm="conveyor"'
        return response

    return middleware


def https_context(tls: TlsFiles) -> ssl.SSLContext:
    """The gRPC port's certificate; with its CA, client certificates are required."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load(context, tls)
    if tls.ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _load(context: ssl.SSLContext, tls: TlsFiles) -> None:
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca:
        context.load_verify_locations(tls.ca)  # adds: a renewed CA beside the old one


async def _follow_certificate(context: ssl.SSLContext, tls: TlsFiles) -> None:
    """Loads a renewed certificate into the live context (new handshakes get
    it), as the gRPC port's dynamic credentials do."""
    settled = Settled([p for p in (tls.cert, tls.key, tls.ca) if p])
    while True:
        await asyncio.sleep(RELOAD_CHECK_SECONDS)
        if settled.changed():
            try:
                _load(context, tls)
                log.info("https certificate reloaded", cert=tls.cert)
            except (OSError, ssl.SSLError) as e:
                log.error("https certificate reload failed; keeping the previous", error=str(e))


class HttpFrontDoor:
    """The aiohttp app on its own port, in the scheduler's event loop."""

    def __init__(self, handlers: ChatCompletions, security: ServerSecurity | None = None):
        self._security = security or ServerSecurity()
        middlewares = [authenticate(self._security)] if self._security.authenticates else []
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=middlewares)
        app.router.add_post("/v1/chat/completions", handlers.chat)
        app.router.add_get("/v1/models", handlers.models)
        app.router.add_get("/health", handlers.health)
        app.router.add_get("/v1/conveyor/tools", handlers.tools)
        app.router.add_get("/ui", handlers.playground)
        # A client that disconnects cancels its handler, and so its run.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self.port = 0
        self._follow: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> int:
        await self._runner.setup()
        tls = self._security.tls
        context = https_context(tls) if tls else None
        await web.TCPSite(self._runner, host, port, ssl_context=context).start()
        if context is not None:
            self._follow = asyncio.create_task(_follow_certificate(context, tls))
        self.port = self._runner.addresses[0][1]
        log.info("openai http listening", host=host, port=self.port)
        return self.port

    async def stop(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
        await self._runner.cleanup()
