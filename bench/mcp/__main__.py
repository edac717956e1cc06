"""What the MCP paths cost, side by side in one run:

- a tool of a real MCP server (mcp-server-time's convert_time, over stdio)
  called straight from the SDK's client, against the same call through the
  gateway's Execute stream (gRPC, then MCP);
- the gateway's python tool called over its MCP server (--mcp-port) by the
  SDK's client, against the same code on the Execute stream: each with a
  fresh interpreter per call (a new Execute stream; MCP's stateless
  protocol), and over an MCP session that keeps its interpreter.

    python -m bench.mcp [--quick]     (make bench-mcp)

Writes bench/results/mcp.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench import common

OUT = Path("bench/results/mcp")
ARGS = {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}
CODE = "x = sum(range(1000))\nprint(x)\n"


async def _execute(stub, tool: str, arguments: dict, units: list[tuple[str, str]]) -> str:
    from conveyor.v1 import tool_gateway_pb2 as pb

    text = json.dumps(arguments)
    requests = [pb.ExecuteRequest(call_id="c", open=pb.OpenCall(tool_name=tool, run_id="bench"))]
    for i, (unit_text, field) in enumerate(units):
        requests.append(
            pb.ExecuteRequest(
                call_id="c", unit=pb.CommandUnit(index=i, text=unit_text, field=field)
            )
        )
    requests.append(
        pb.ExecuteRequest(call_id="c", close=pb.CloseCall(full_text=text, unit_count=len(units)))
    )
    last = None
    async for response in stub.Execute(iter(requests), timeout=60):
        last = response
    assert last.WhichOneof("event") == "call_result" and last.call_result.ok, last
    return last.call_result.output


async def measure(n: int, say) -> dict:
    import httpx2
    from conveyor.v1 import tool_gateway_pb2_grpc
    from mcp import Client, StdioServerParameters
    from mcp.client.streamable_http import streamable_http_client

    from conveyor_common.server import stop_server
    from tool_gateway.config import GatewayConfig
    from tool_gateway.server import create_server, mcp_port

    time_server = StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_server_time", "--local-timezone", "UTC"]
    )
    with tempfile.TemporaryDirectory() as tmp:
        tools = Path(tmp) / "tools.yaml"
        tools.write_text(
            json.dumps(
                {
                    "mcp_servers": [
                        {"name": "time", "command": time_server.command, "args": time_server.args}
                    ]
                }
            )
        )
        config = GatewayConfig(unit_timeout=30.0, tools_file=str(tools), mcp_port=0)
        gateway, port = await create_server(config, "127.0.0.1", 0)
        rows: dict[str, dict[str, list[float]]] = {
            "convert_time (mcp-server-time, stdio)": {"SDK client, direct": [], "gateway": []},
            "python, 2 statements": {
                "gRPC Execute (new interpreter)": [],
                "MCP, stateless (new interpreter)": [],
                "MCP, one session (its interpreter)": [],
            },
        }
        try:
            http = httpx2.AsyncClient(timeout=httpx2.Timeout(30.0, read=60.0))
            url = f"http://127.0.0.1:{mcp_port(gateway)}/mcp"
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel,
                Client(time_server, mode="legacy") as direct,
                http,
                Client(streamable_http_client(url, http_client=http), mode="legacy") as served,
                Client(url) as stateless,
            ):
                stub = tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)
                code_units = [(line + "\n", "") for line in CODE.splitlines()]
                for i in range(n + 3):  # 3 to warm up
                    timed = {}
                    start = time.perf_counter()
                    await direct.call_tool("convert_time", ARGS)
                    timed[("convert_time (mcp-server-time, stdio)", "SDK client, direct")] = (
                        time.perf_counter() - start
                    )
                    start = time.perf_counter()
                    await _execute(stub, "convert_time", ARGS, [(json.dumps(ARGS), "")])
                    timed[("convert_time (mcp-server-time, stdio)", "gateway")] = (
                        time.perf_counter() - start
                    )
                    start = time.perf_counter()
                    await _execute(stub, "python", {"code": CODE}, code_units)
                    python = "python, 2 statements"
                    timed[(python, "gRPC Execute (new interpreter)")] = time.perf_counter() - start
                    for column, client in (
                        ("MCP, stateless (new interpreter)", stateless),
                        ("MCP, one session (its interpreter)", served),
                    ):
                        start = time.perf_counter()
                        result = await client.call_tool("python", {"code": CODE})
                        timed[(python, column)] = time.perf_counter() - start
                        assert not result.is_error and "499500" in result.content[0].text
                    if i >= 3:
                        for (row, column), value in timed.items():
                            rows[row][column].append(value)
                    if i % 10 == 0:
                        say(f"round {i}/{n + 3}")
        finally:
            await stop_server(gateway, 0)
    return {
        row: {c: common.latency_summary(v) for c, v in columns.items()}
        for row, columns in rows.items()
    }


def report(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# MCP paths",
        "",
        f"{m['cpu_model']} ({m['cpu_count']} CPUs), {results['date']}; medians (p90) in ms "
        "over the same calls, interleaved.",
        "",
        "| call | path | median | p90 | ratio |",
        "|---|---|---|---|---|",
    ]
    for row, columns in results["rows"].items():
        base = next(iter(columns.values()))["median_ms"]
        for column, s in columns.items():
            lines.append(
                f"| {row} | {column} | {s['median_ms']:.2f} | {s['p90_ms']:.2f} | "
                f"×{s['median_ms'] / base:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    say = common.progress("mcp")
    rows = asyncio.run(measure(10 if args.quick else 100, say))
    results = {"machine": common.machine(), "date": common.now(), "rows": rows}
    common.publish(results, args.out, report(results))


if __name__ == "__main__":
    main()
