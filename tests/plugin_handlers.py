"""Handlers and a tool that tests/test_tool_plugins.py loads by import path,
as a user's package would provide them."""

from __future__ import annotations

import json
from collections.abc import Sequence

from tool_gateway.tools.base import (
    PartialMode,
    Tool,
    ToolSession,
    ToolSpec,
    Unit,
    UnitOutcome,
    Verdict,
)
from tool_gateway.tools.external import HandlerRequest


def shout(request: HandlerRequest) -> str:
    """Each unit upper-cased, numbered by how many units this session saw."""
    request.state["seen"] = request.state.get("seen", 0) + 1
    return f"{request.state['seen']}:{request.text.upper()}"


async def positive(request: HandlerRequest) -> str | Verdict:
    """A JSON field check: a negative number dooms the call."""
    value = json.loads(request.text)
    if value < 0:
        return Verdict(f"{request.field} must be positive, got {value}", request.field)
    return "ok"


def broken(request: HandlerRequest) -> str:
    raise ValueError("the handler broke")


class EchoTool(Tool):
    """A whole tool class, registered through an entry point."""

    spec = ToolSpec(name="echo_ep", description="Echoes.", partial_mode=PartialMode.LINES)

    async def open_session(self, session_key: str) -> ToolSession:
        return EchoSession()


class EchoSession(ToolSession):
    async def run_unit(self, unit: Unit) -> UnitOutcome:
        return UnitOutcome(unit.index, ok=True, value=unit.text)

    async def finish(self, full_text: str, outcomes: Sequence[UnitOutcome]) -> str:
        return "|".join(o.value for o in outcomes)

    async def cancel(self) -> None: ...

    async def close(self) -> None: ...
