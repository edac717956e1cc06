"""`Client`: runs, tool discovery and cancel over ConveyorService, async and
sync, with deadlines and gRPC statuses as exceptions (`errors.py`)."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import grpc

from conveyor_client import errors, events
from conveyor_client._proto.v1 import common_pb2, conveyor_pb2, conveyor_pb2_grpc

_ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
    "tool": common_pb2.ROLE_TOOL,
}


@dataclass(frozen=True)
class Tool:
    """A tool a run may call."""

    name: str
    description: str
    parameters_json_schema: str
    partial_mode: str  # WHOLE, PYTHON_STATEMENTS, ...
    runs_while_decoding: bool


def _message(m: dict | tuple) -> common_pb2.ChatMessage:
    if isinstance(m, tuple):
        m = {"role": m[0], "content": m[1]}
    if m.get("role") not in _ROLES:
        raise ValueError(f"a message's role must be one of {', '.join(_ROLES)}: {m!r}")
    return common_pb2.ChatMessage(
        role=_ROLES[m["role"]],
        content=str(m.get("content", "")),
        name=str(m.get("name", "")),
        tool_call_id=str(m.get("tool_call_id", "")),
    )


def run_request(
    prompt: str | Sequence[dict | tuple],
    *,
    system: str | None = None,
    tools: Sequence[str] = (),
    partial: bool = True,
    temperature: float = 0.0,
    seed: int | None = None,
    max_new_tokens: int = 0,
    max_rounds: int = 0,
) -> conveyor_pb2.RunRequest:
    """`prompt`: a user message, or the conversation as dicts or (role, text)."""
    history = [("user", prompt)] if isinstance(prompt, str) else list(prompt)
    if system is not None:
        history.insert(0, ("system", system))
    sampling = common_pb2.SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens)
    if seed is not None:
        sampling.seed = seed
    return conveyor_pb2.RunRequest(
        messages=[_message(m) for m in history],
        tool_names=list(tools),
        mode=conveyor_pb2.EXECUTION_MODE_PARTIAL
        if partial
        else conveyor_pb2.EXECUTION_MODE_SEQUENTIAL,
        sampling=sampling,
        max_rounds=max_rounds,
    )


class Client:
    """A client of one scheduler. `token` is sent as a bearer token on every
    call; `timeout` is each call's default deadline in seconds.

        async with Client("localhost:50051") as client:
            async for event in client.run("Print 2**10 with Python."):
                ...
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        token: str | None = None,
        timeout: float = 600.0,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.target, self.timeout = target, timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> conveyor_pb2_grpc.ConveyorServiceStub:
        if self._channel is None:  # made on first use, in the running event loop
            self._channel = (
                grpc.aio.secure_channel(self.target, self._credentials)
                if self._credentials
                else grpc.aio.insecure_channel(self.target)
            )
        return conveyor_pb2_grpc.ConveyorServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def list_tools(self, timeout: float | None = None) -> list[Tool]:
        try:
            response = await self._stub().ListTools(
                conveyor_pb2.ListToolsRequest(),
                timeout=timeout or self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None
        return [
            Tool(
                t.name,
                t.description,
                t.parameters_json_schema,
                common_pb2.PartialMode.Name(t.partial_mode).removeprefix("PARTIAL_MODE_"),
                t.partial_safe,
            )
            for t in response.tools
        ]

    async def run(
        self, prompt: str | Sequence[dict | tuple], *, timeout: float | None = None, **options
    ) -> AsyncIterator[events.Event]:
        """Streams one run's events; the last is `events.Finished`. Leaving
        the loop early (break, or cancelling the task) cancels the run on
        the server: decoding stops and its tools are killed. `options`: see
        `run_request` (system, tools, partial, temperature, seed, ...)."""
        call = self._stub().Run(
            run_request(prompt, **options), timeout=timeout or self.timeout, metadata=self._metadata
        )
        try:
            async for response in call:
                yield events.from_pb(response)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None
        finally:
            call.cancel()  # a no-op once the run ended


class SyncClient:
    """The same, for code without an event loop: a private loop runs in a
    thread, and `run()` is a plain iterator (closing it cancels the run)."""

    def __init__(self, target: str = "localhost:50051", **kwargs):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._client = Client(target, **kwargs)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def list_tools(self, timeout: float | None = None) -> list[Tool]:
        return self._call(self._client.list_tools(timeout))

    def run(self, prompt, **options) -> Iterator[events.Event]:
        out: queue.Queue = queue.Queue()
        done = object()

        async def pump() -> None:
            try:
                async for event in self._client.run(prompt, **options):
                    out.put(event)
            except BaseException as e:  # handed to the caller's thread
                out.put(e)
            finally:
                out.put(done)

        task = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while (item := out.get()) is not done:
                if isinstance(item, BaseException):
                    if isinstance(item, asyncio.CancelledError):
                        return
                    raise item
                yield item
        finally:
            task.cancel()  # the caller stopped early: the run is cancelled

    def close(self) -> None:
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
