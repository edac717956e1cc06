"""Tools from outside the gateway's code: Python entry points and a YAML file.

Entry points (group `conveyor.tools`) name a Tool subclass, a Tool instance,
or a factory `f(config) -> Tool` (which may be async); a package adds tools to
every gateway it is installed next to:

    [project.entry-points."conveyor.tools"]
    word_count = "my_tools.word_count:WordCount"

A YAML file (`--tools-file`) maps OpenAI-style function specs to handlers:

    tools:
      - type: function
        function:
          name: get_weather
          description: Current weather for a city.
          parameters: {type: object, properties: {city: {type: string}}}
        partial_mode: JSON_FIELDS   # default WHOLE
        partial_safe: true          # default false: units wait for the call's end
        command_field: ""           # an argument whose string is the command
        handler:
          python: my_tools.weather:get_weather    # or
          http: http://weather-svc:8080/unit      # POSTed each unit
          timeout_seconds: 10

The same file's `mcp_servers:` list adds every tool of those MCP servers
(tool_gateway/mcp_client.py has the keys).

A tool that cannot be loaded stops the gateway at start with a message that
names it: a gateway silently missing a tool fails every run that needs it.
"""

from __future__ import annotations

import inspect
from importlib.metadata import entry_points
from pathlib import Path

import yaml

from tool_gateway.mcp_client import McpConnection, McpError, McpServerConfig
from tool_gateway.tools.base import PartialMode, Tool, ToolSpec
from tool_gateway.tools.external import ExternalTool, http_handler, import_handler
from tool_gateway.tools.mcp_tool import McpTool

ENTRY_POINT_GROUP = "conveyor.tools"


class PluginError(RuntimeError):
    """A tool from an entry point or a tools file could not be loaded."""


async def entry_point_tools(config) -> list[Tool]:
    tools = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = ep.load()
            tool = target() if isinstance(target, type) else target
            if not isinstance(tool, Tool) and callable(tool):
                tool = tool(config)
                if inspect.isawaitable(tool):
                    tool = await tool
        except Exception as e:
            raise PluginError(f"entry point {ep.name!r} ({ep.value}): {e}") from e
        if not isinstance(tool, Tool):
            raise PluginError(
                f"entry point {ep.name!r} ({ep.value}) gave {type(tool).__name__}, not a Tool"
            )
        tools.append(tool)
    return tools


def _read(path: str | Path) -> dict:
    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise PluginError(f"tools file {path}: {e}") from e
    if not isinstance(doc, dict) or not ({"tools", "mcp_servers"} & set(doc)):
        raise PluginError(
            f"tools file {path}: expected a top-level 'tools:' or 'mcp_servers:' list"
        )
    return doc


def file_tools(path: str | Path) -> list[Tool]:
    """The tools a YAML tools file declares under `tools:`."""
    entries = _read(path).get("tools", [])
    if not isinstance(entries, list):
        raise PluginError(f"tools file {path}: expected a top-level 'tools:' list")
    return [_file_tool(path, i, entry) for i, entry in enumerate(entries)]


def mcp_server_configs(path: str | Path) -> list[McpServerConfig]:
    entries = _read(path).get("mcp_servers", [])
    if not isinstance(entries, list):
        raise PluginError(f"tools file {path}: 'mcp_servers' must be a list")
    configs = []
    for i, entry in enumerate(entries):
        where = f"tools file {path}, MCP server {i}"
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise PluginError(f"{where}: expected a mapping with a 'name'")
        try:
            configs.append(
                McpServerConfig(
                    name=entry["name"],
                    command=str(entry.get("command", "")),
                    args=tuple(str(a) for a in entry.get("args", ())),
                    env={str(k): str(v) for k, v in (entry.get("env") or {}).items()},
                    url=str(entry.get("url", "")),
                    headers={str(k): str(v) for k, v in (entry.get("headers") or {}).items()},
                    timeout_seconds=float(entry.get("timeout_seconds", 60)),
                    prefix=str(entry.get("prefix", "")),
                    tools=dict(entry.get("tools") or {}),
                )
            )
        except (TypeError, ValueError, AttributeError) as e:
            raise PluginError(f"{where} ({entry['name']}): {e}") from e
    return configs


async def mcp_tools(path: str | Path) -> tuple[list[Tool], list[McpConnection]]:
    """Every tool of the MCP servers the file declares: each server is
    started (or reached) now and its tools listed. A server that fails
    here stops the gateway, as any tool that cannot be loaded does."""
    tools: list[Tool] = []
    connections = []
    try:
        for config in mcp_server_configs(path):
            connection = McpConnection(config)
            connections.append(connection)
            try:
                config.check_environment()
                listed = await connection.list_tools()
            except McpError as e:
                raise PluginError(f"tools file {path}: {e}") from e
            for info in listed:
                try:
                    tools.append(_mcp_tool(config, connection, info))
                except Exception as e:  # a bad override or handler: named, at start
                    raise PluginError(f"tools file {path}, MCP tool {info.name!r}: {e}") from e
    except BaseException:
        for connection in connections:  # the servers started so far
            await connection.close()
        raise
    return tools, connections


def _mcp_tool(config: McpServerConfig, connection: McpConnection, info) -> McpTool:
    """A listed tool with the file's overrides: description, partial_safe,
    and partial_mode JSON_FIELDS with a field handler."""
    overrides = config.tools.get(info.name) or {}
    mode = PartialMode(str(overrides.get("partial_mode", "WHOLE")).upper())
    handler = overrides.get("handler")
    if (mode == PartialMode.JSON_FIELDS) != bool(handler):
        raise ValueError("partial_mode JSON_FIELDS and a 'handler' go together")
    if mode not in (PartialMode.WHOLE, PartialMode.JSON_FIELDS):
        raise ValueError(f"an MCP tool is WHOLE or JSON_FIELDS, not {mode.value}")
    spec = ToolSpec(
        name=config.prefix + info.name,
        description=str(overrides.get("description", info.description)),
        parameters=info.input_schema or {"type": "object", "properties": {}},
        partial_mode=mode,
        partial_safe=bool(overrides.get("partial_safe", False)),
    )
    field_handler = import_handler(str(handler)) if handler else None
    return McpTool(spec, connection, info.name, field_handler)


def _file_tool(path, i: int, entry: object) -> Tool:
    where = f"tools file {path}, tool {i}"
    if not isinstance(entry, dict):
        raise PluginError(f"{where}: expected a mapping")
    function = entry.get("function", entry)  # `type: function` wrapper optional
    name = function.get("name") if isinstance(function, dict) else None
    if not name or not isinstance(name, str):
        raise PluginError(f"{where}: 'function.name' is required")
    where = f"{where} ({name})"
    mode_name = str(entry.get("partial_mode", "WHOLE")).upper().removeprefix("PARTIAL_MODE_")
    try:
        mode = PartialMode(mode_name)
    except ValueError:
        known = ", ".join(m.value for m in PartialMode)
        raise PluginError(f"{where}: unknown partial_mode {mode_name!r}; one of {known}") from None
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise PluginError(f"{where}: 'parameters' must be a JSON schema object")
    spec = ToolSpec(
        name=name,
        description=str(function.get("description", "")),
        parameters=parameters,
        partial_mode=mode,
        partial_safe=bool(entry.get("partial_safe", False)),
        command_field=str(entry.get("command_field", "")),
    )
    handler = entry.get("handler")
    if not isinstance(handler, dict) or ("python" in handler) == ("http" in handler):
        raise PluginError(f"{where}: 'handler' needs exactly one of 'python' or 'http'")
    try:
        if "python" in handler:
            return ExternalTool(spec, import_handler(str(handler["python"])))
        timeout = float(handler.get("timeout_seconds", 30))
        return ExternalTool(spec, http_handler(str(handler["http"]), timeout))
    except Exception as e:
        raise PluginError(f"{where}: {e}") from e
