"""Built-in tools and the interface every tool implements."""

from tool_gateway.tools.base import (
    CallOutcome,
    PartialMode,
    Tool,
    ToolErrorCode,
    ToolFailure,
    ToolSession,
    ToolSpec,
    Unit,
    UnitOutcome,
)

__all__ = [
    "CallOutcome",
    "PartialMode",
    "Tool",
    "ToolErrorCode",
    "ToolFailure",
    "ToolSession",
    "ToolSpec",
    "Unit",
    "UnitOutcome",
]
