"""A tool an MCP server hosts, as a gateway Tool: its spec comes from the
server's tools/list, and each call is one MCP tools/call.

By default a call is partial mode WHOLE: its one unit is the arguments
object, dispatched the moment the model has written the call (while it
writes the rest of its message). The tools file may override a tool's
`description` or mark it `partial_safe` (tool_gateway/plugins.py), or
make it JSON_FIELDS with a `handler` that maps each argument, as soon as
the model has written it, to an MCP call of its own:

    def handler(field: str, value, state: dict) -> tuple[str, dict] | None
        # (the server's tool name, its arguments), or None: no call for this
        # field (`state` keeps what earlier fields of the call said)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

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

FieldHandler = Callable[[str, object, dict], "tuple[str, dict] | None"]


class McpTool(Tool):
    # Each call gets its own session (a field handler's state is per call).
    session_per_call = True

    def __init__(
        self,
        spec: ToolSpec,
        connection: McpConnection,
        remote_name: str,
        field_handler: FieldHandler | None = None,
    ):
        self.spec = spec
        self.connection = connection
        self.remote_name = remote_name  # the server's own name for it (no prefix)
        self.field_handler = field_handler

    async def open_session(self, session_key: str) -> ToolSession:
        return McpSession(self)


class McpSession(ToolSession):
    def __init__(self, tool: McpTool):
        self._tool = tool
        self._state: dict = {}  # the field handler's, for this call

    def _mapped(self, unit: Unit) -> tuple[str, dict] | None:
        """The MCP call a unit makes: the whole arguments (WHOLE), or what
        the field handler maps the field to (None: no call)."""
        try:
            value = json.loads(unit.text) if unit.text.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolFailure(
                ToolErrorCode.BAD_REQUEST, f"the arguments are not JSON: {e}"
            ) from None
        handler = self._tool.field_handler
        if handler is None:
            if not isinstance(value, dict):
                raise ToolFailure(ToolErrorCode.BAD_REQUEST, "the arguments must be a JSON object")
            return self._tool.remote_name, value
        try:
            return handler(unit.field, value, self._state)
        except Exception as e:
            raise ToolFailure(
                ToolErrorCode.BAD_REQUEST, f"the field handler refused {unit.field!r}: {e}"
            ) from None

    async def run_unit(self, unit: Unit) -> UnitOutcome:
        mapped = self._mapped(unit)
        if mapped is None:
            return UnitOutcome(unit.index, ok=True)
        remote, arguments = mapped

        async def progress(done: float, total: float | None, message: str | None) -> None:
            # MCP progress notifications become the unit's progress events.
            of = f"/{total:g}" if total else ""
            self.report(unit.index, f"[progress {done:g}{of}] {message or ''}".rstrip() + "\n")

        start = time.perf_counter()
        try:
            result = await self._tool.connection.call(remote, arguments, progress)
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
