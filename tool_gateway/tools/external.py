"""Tools whose work is done by a handler outside the gateway's own code: a
Python callable named by import path, or an HTTP endpoint the gateway POSTs
to. This is how a YAML tools file turns OpenAI-style function specs into
tools (see tool_gateway/plugins.py).

A handler is called once per command unit, in order (a WHOLE tool's single
unit is the entire call). It gets a `HandlerRequest` and answers with:
- a string: the unit's value;
- a `UnitOutcome` or `Verdict` (Python handlers);
- over HTTP, a JSON object {"ok": bool, "value": str, "stdout": str,
  "error": str, "verdict": {"reason": str, "field": str} | null}, or a
  text/plain body taken as the value.
An exception or HTTP error fails that unit (ok=False) with a clear message;
the call goes on, as with code that raises in the python tool. Plain
functions run in a worker thread; `async def` handlers on the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import inspect
import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

from tool_gateway.tools.base import (
    Tool,
    ToolErrorCode,
    ToolFailure,
    ToolSession,
    ToolSpec,
    Unit,
    UnitOutcome,
    Verdict,
)

HTTP_BODY_CAP = 1 << 20  # bytes read from a handler's answer


@dataclass(frozen=True)
class HandlerRequest:
    tool: str
    session_key: str
    index: int
    text: str
    field: str = ""
    # Per-session scratch space a Python handler may keep state in.
    state: dict = dataclasses.field(default_factory=dict, compare=False)


Handler = Callable[[HandlerRequest], object]


def import_handler(path: str) -> Handler:
    """`package.module:function` to the callable."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"handler {path!r} must look like 'package.module:function'")
    target: object = importlib.import_module(module_name)
    for part in attr.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"handler {path!r} is not callable")
    return target


def http_handler(url: str, timeout: float) -> Handler:
    """A handler that POSTs each unit as JSON to `url` (in a thread, so the
    event loop never waits on the network)."""

    def post(request: HandlerRequest) -> object:
        body = {k: v for k, v in asdict(request).items() if k != "state"}
        req = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                raw = response.read(HTTP_BODY_CAP)
                kind = response.headers.get_content_type()
        except urllib.error.HTTPError as e:
            detail = e.read(2048).decode(errors="replace").strip()
            raise RuntimeError(f"{url} answered HTTP {e.code}: {detail or e.reason}") from None
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RuntimeError(f"{url} could not be reached: {reason}") from None
        text = raw.decode(errors="replace")
        if kind != "application/json":
            return text
        try:
            answer = json.loads(text)
        except json.JSONDecodeError as e:
            raise RuntimeError(f"{url} sent invalid JSON: {e}") from None
        return _outcome_from_json(request.index, answer)

    post.__name__ = f"POST {url}"
    return post


def _outcome_from_json(index: int, answer: object) -> UnitOutcome | str:
    if isinstance(answer, str):
        return answer
    if not isinstance(answer, dict):
        raise RuntimeError(f"a handler answered {type(answer).__name__}, not an object")
    verdict = answer.get("verdict")
    return UnitOutcome(
        index=index,
        ok=bool(answer.get("ok", True)) and verdict is None,
        stdout=str(answer.get("stdout", "")),
        value=str(answer.get("value", "")),
        exception=str(answer.get("error", "")),
        verdict=Verdict(str(verdict.get("reason", "")), str(verdict.get("field", "")))
        if isinstance(verdict, dict)
        else None,
    )


class ExternalTool(Tool):
    def __init__(self, spec: ToolSpec, handler: Handler):
        self.spec = spec
        self.handler = handler

    async def open_session(self, session_key: str) -> ToolSession:
        return ExternalSession(self, session_key)


class ExternalSession(ToolSession):
    def __init__(self, tool: ExternalTool, session_key: str):
        self._tool = tool
        self._key = session_key
        self._state: dict = {}

    async def run_unit(self, unit: Unit) -> UnitOutcome:
        request = HandlerRequest(
            self._tool.spec.name, self._key, unit.index, unit.text, unit.field, self._state
        )
        start = time.perf_counter()
        handler = self._tool.handler
        try:
            # A plain function (an HTTP POST among them) may block: it runs in
            # a thread, so a slow handler never holds up another call.
            if inspect.iscoroutinefunction(handler):
                answer = await handler(request)
            else:
                answer = await asyncio.to_thread(handler, request)
        except Exception as e:
            return UnitOutcome(
                unit.index,
                ok=False,
                exception=f"{type(e).__name__}: {e}",
                duration_seconds=time.perf_counter() - start,
            )
        return _as_outcome(unit.index, answer, time.perf_counter() - start)

    async def finish(self, full_text: str, outcomes: Sequence[UnitOutcome]) -> str:
        parts = []
        for o in outcomes:
            parts.append(o.stdout + o.value if o.ok else f"error: {o.exception}")
        return "\n".join(p for p in parts if p)

    async def cancel(self) -> None:
        pass  # a handler call in flight ends with its task

    async def close(self) -> None:
        self._state.clear()


def _as_outcome(index: int, answer: object, seconds: float) -> UnitOutcome:
    if isinstance(answer, UnitOutcome):
        return replace(answer, index=index, duration_seconds=seconds)
    if isinstance(answer, Verdict):
        return UnitOutcome(index, ok=False, verdict=answer, duration_seconds=seconds)
    if answer is None:
        return UnitOutcome(index, ok=True, duration_seconds=seconds)
    if isinstance(answer, str):
        return UnitOutcome(index, ok=True, value=answer, duration_seconds=seconds)
    raise ToolFailure(
        ToolErrorCode.INTERNAL,
        f"the handler returned {type(answer).__name__}; expected str, UnitOutcome or Verdict",
    )
