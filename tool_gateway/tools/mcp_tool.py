"""A tool an MCP server hosts, as a gateway Tool: its spec comes from the
server's tools/list, and each call is one MCP tools/call.

By default a call is partial mode WHOLE: its one unit is the arguments
object, dispatched the moment the model has written the call (while it
writes the rest of its message). The tools file may override a tool's
`description` or mark it `partial_safe` (tool_gateway/plugins.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence

from tool_gateway.mcp_client import McpConnection, McpError, McpTimeout
from tool_gateway.tools.base import (
    Tool,
    ToolErrorCode,
    ToolFailure,
    ToolSession,
    ToolSpec,
    Unit,
    UnitOutcome,
)


class McpTool(Tool):
    # MCP sessions hold no state of the gateway's: any session serves any call.
    session_per_call = True

    def __init__(self, spec: ToolSpec, connection: McpConnection, remote_name: str):
        self.spec = spec
        self.connection = connection
        self.remote_name = remote_name  # the server's own name for it (no prefix)

    async def open_session(self, session_key: str) -> ToolSession:
        return McpSession(self)


class McpSession(ToolSession):
    def __init__(self, tool: McpTool):
        self._tool = tool

    async def run_unit(self, unit: Unit) -> UnitOutcome:
        try:
            arguments = json.loads(unit.text) if unit.text.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolFailure(
                ToolErrorCode.BAD_REQUEST, f"the arguments are not a JSON object: {e}"
            ) from None
        if not isinstance(arguments, dict):
            raise ToolFailure(ToolErrorCode.BAD_REQUEST, "the arguments must be a JSON object")

        async def progress(done: float, total: float | None, message: str | None) -> None:
            # MCP progress notifications become the unit's progress events.
            of = f"/{total:g}" if total else ""
            self.report(unit.index, f"[progress {done:g}{of}] {message or ''}".rstrip() + "\n")

        start = time.perf_counter()
        try:
            result = await self._tool.connection.call(self._tool.remote_name, arguments, progress)
        except McpTimeout as e:
            raise ToolFailure(ToolErrorCode.TIMEOUT, str(e)) from None
        except McpError as e:
            raise ToolFailure(ToolErrorCode.SANDBOX, str(e)) from None
        seconds = time.perf_counter() - start
        if not result.ok:
            return UnitOutcome(
                unit.index, ok=False, exception=result.text, duration_seconds=seconds
            )
        return UnitOutcome(unit.index, ok=True, value=result.text, duration_seconds=seconds)

    async def finish(self, full_text: str, outcomes: Sequence[UnitOutcome]) -> str:
        parts = [o.value if o.ok else f"error: {o.exception}" for o in outcomes]
        return "\n".join(p for p in parts if p)

    async def cancel(self) -> None:
        pass  # cancelling the unit's task cancels the MCP call (notifications/cancelled)

    async def close(self) -> None:
        pass
