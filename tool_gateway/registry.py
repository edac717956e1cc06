"""The tools a gateway hosts, by name."""

from __future__ import annotations

from collections.abc import Iterable

from tool_gateway.config import GatewayConfig
from tool_gateway.plugins import entry_point_tools, file_tools, mcp_tools
from tool_gateway.tools.base import Tool, ToolSpec
from tool_gateway.tools.calculator_tool import CalculatorTool
from tool_gateway.tools.database_tool import DatabaseTool
from tool_gateway.tools.python_tool import PythonTool
from tool_gateway.tools.search_tool import SearchTool
from tool_gateway.tools.validate_tool import book_flight_tool


class ToolRegistry:
    def __init__(self, tools: Iterable[Tool], connections: Iterable = ()):
        self._connections = list(connections)  # MCP servers, closed with the gateway
        self._tools: dict[str, Tool] = {}
        for tool in tools:
            if tool.spec.name in self._tools:
                raise ValueError(f"two tools are named {tool.spec.name!r}")
            self._tools[tool.spec.name] = tool

    def get(self, name: str) -> Tool | None:
        return self._tools.get(name)

    def names(self) -> list[str]:
        return sorted(self._tools)

    def specs(self) -> list[ToolSpec]:
        return [self._tools[name].spec for name in self.names()]

    async def close(self) -> None:
        for connection in self._connections:
            await connection.close()


async def build_registry(config: GatewayConfig) -> ToolRegistry:
    """The built-in tools, then entry-point tools, then the tools file's.
    Raises SandboxUnavailable when code cannot be sandboxed and
    --allow-unsandboxed was not given, PluginError when a tool from outside
    cannot be loaded, ValueError when two tools share a name."""
    tools: list[Tool] = [
        await PythonTool.from_config(config),
        await SearchTool.from_config(config),
        await DatabaseTool.from_config(config),
        book_flight_tool(),
        CalculatorTool(),
    ]
    tools += await entry_point_tools(config)
    connections = []
    if config.tools_file:
        tools += file_tools(config.tools_file)
        from_mcp, connections = await mcp_tools(config.tools_file)
        tools += from_mcp
    try:
        return ToolRegistry(tools, connections)
    except ValueError:
        for connection in connections:
            await connection.close()
        raise
