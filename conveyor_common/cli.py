"""`conveyor`, the command-line client of ConveyorService: runs print their
streamed events readably (tokens as they come, each unit dispatched and its
result, the timing breakdown) or as JSON, one event per line.

    conveyor run "Write Python that prints 2**10" [--mode partial|sequential]
                 [--system TEXT] [--tools python,calculator] [--temperature T]
                 [--seed N] [--max-new-tokens N] [--max-rounds N] [--timeout S] [--json]
    conveyor tools [--json]
    conveyor chat            (one run per line you type; the conversation carries on)

Every command takes --target (default localhost:50051). `python -m
conveyor_common.cli` is the same program.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from conveyor.v1 import common_pb2, conveyor_pb2, conveyor_pb2_grpc
from google.protobuf import json_format

from conveyor_common.defaults import SCHEDULER_PORT
from conveyor_common.security import (
    ClientSecurity,
    ClientToken,
    SecurityConfigError,
    StaticToken,
    TlsFiles,
)

# The API token, when --token-file is not given.
TOKEN_ENV = "CONVEYOR_TOKEN"

# Chosen so the default SmolLM2-135M writes a program of several statements
# (each runs while it writes the next) and then states the printed result,
# in bfloat16 and float32 alike, instead of writing the program again.
DEFAULT_SYSTEM = (
    "You are a helpful assistant. Solve tasks by writing one ```python block that prints "
    "the result. You will then be shown the printed output; reply with one short sentence "
    "that states it, and do not write code again."
)
DEFAULT_PROMPT = (
    "Write a Python program with three steps: make a list of the numbers 1 to 10, square "
    "each one into a new list, then print the sum of that list."
)


class Printer:
    def __init__(self, out=sys.stdout):
        self.out = out
        self.color = out.isatty()
        self._mid_line = False

    def _note(self, text: str) -> None:
        if self._mid_line:
            self.out.write("\n")
        style = ("\033[36m", "\033[0m") if self.color else ("", "")
        self.out.write(f"{style[0]}  ▸ {text}{style[1]}\n")
        self._mid_line = False
        self.out.flush()

    def token(self, text: str) -> None:
        self.out.write(text)
        self._mid_line = not text.endswith("\n")
        self.out.flush()

    def event(self, r: conveyor_pb2.RunResponse) -> None:
        kind = r.WhichOneof("event")
        if kind == "token_delta":
            self.token(r.token_delta.text)
        elif kind == "round_started":
            self._note(f"round {r.round_started.round}: model output")
        elif kind == "tool_call_started":
            c = r.tool_call_started
            mode = common_pb2.PartialMode.Name(c.partial_mode).removeprefix("PARTIAL_MODE_")
            self._note(f"{c.call_id}: tool {c.tool_name!r} called ({mode.lower()})")
        elif kind == "unit_dispatched":
            u = r.unit_dispatched
            when = "while decoding" if u.during_decode else "after decoding"
            first = u.text.strip().splitlines()[0] if u.text.strip() else ""
            self._note(f"{u.call_id} unit {u.index} dispatched {when}: {first[:60]}")
        elif kind == "unit_result":
            res = r.unit_result.result
            out = (res.stdout or res.value or "").strip().replace("\n", " | ")
            status = "ok" if res.ok else f"error: {res.exception.strip().splitlines()[-1]}"
            self._note(
                f"{r.unit_result.call_id} unit {res.index} {status} "
                f"({res.duration_seconds * 1000:.0f} ms){': ' + out[:80] if out else ''}"
            )
        elif kind == "unit_progress":
            p = r.unit_progress
            text = p.progress.stdout.strip().replace("\n", " | ")
            self._note(f"{p.call_id} unit {p.progress.index} running: {text[:80]}")
        elif kind == "tool_call_finished":
            f = r.tool_call_finished
            if f.WhichOneof("outcome") == "error":
                self._note(f"{f.call_id} failed: {f.error.message}")
            else:
                self._note(f"{f.call_id} finished ({f.result.units_executed} units)")
        elif kind == "parse_error":
            self._note(f"parse error in {r.parse_error.call_id}: {r.parse_error.message}")
        elif kind == "abort_verdict":
            v = r.abort_verdict.verdict
            self._note(f"abort verdict from {r.abort_verdict.call_id}: {v.reason}")
        elif kind == "run_finished":
            self.finished(r.run_finished)

    def finished(self, f: conveyor_pb2.RunFinished) -> None:
        t = f.timing
        reason = common_pb2.FinishReason.Name(f.finish_reason).removeprefix("FINISH_REASON_")
        self._note(f"run finished: {reason}{' (' + f.message + ')' if f.message else ''}")
        rows = [
            ("decode", t.decode_seconds),
            ("tools", t.tool_seconds),
            ("tools hidden under decode", t.hidden_tool_seconds),
            ("total", t.total_seconds),
            ("sequential estimate", t.sequential_estimate_seconds),
        ]
        for name, seconds in rows:
            self.out.write(f"    {name:<27}{seconds:8.3f} s\n")
        self.out.write(
            f"    {'units dispatched':<27}{t.units_dispatched:8d}\n"
            f"    {'rounds / tokens':<27}{t.rounds:4d} / {t.completion_tokens}\n"
        )
        self.out.flush()


class JsonPrinter:
    """One event per line, in proto3's JSON mapping (what grpcurl prints)."""

    def __init__(self, out=sys.stdout):
        self.out = out

    def event(self, r: conveyor_pb2.RunResponse) -> None:
        self.out.write(json.dumps(json_format.MessageToDict(r)) + "\n")
        self.out.flush()


@dataclass
class RunOptions:
    system: str = DEFAULT_SYSTEM
    partial: bool = True
    tools: Sequence[str] = ()  # empty: every hosted tool
    temperature: float = 0.0  # greedy
    seed: int | None = None
    max_new_tokens: int = 256
    max_rounds: int = 2
    timeout: float = 600.0
    history: list[common_pb2.ChatMessage] = field(default_factory=list)  # earlier turns
    security: ClientSecurity | None = None  # TLS and token; None: plaintext, no token


def run_request(prompt: str, options: RunOptions) -> conveyor_pb2.RunRequest:
    messages = [common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=options.system)]
    messages += options.history
    messages.append(common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt))
    sampling = common_pb2.SamplingParams(
        temperature=options.temperature, max_new_tokens=options.max_new_tokens
    )
    if options.seed is not None:
        sampling.seed = options.seed
    return conveyor_pb2.RunRequest(
        messages=messages,
        tool_names=list(options.tools),
        mode=conveyor_pb2.EXECUTION_MODE_PARTIAL
        if options.partial
        else conveyor_pb2.EXECUTION_MODE_SEQUENTIAL,
        sampling=sampling,
        max_rounds=options.max_rounds,
    )


async def run_once(
    target: str,
    prompt: str,
    options: RunOptions | None = None,
    printer: Printer | JsonPrinter | None = None,
) -> conveyor_pb2.RunFinished | None:
    """Streams one run to `printer`; its RunFinished (None if it had none)."""
    options = options or RunOptions()
    printer = printer or Printer()
    finished = None
    security = options.security or ClientSecurity()
    async with security.channel(target, ()) as channel:
        stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)
        call = stub.Run(
            run_request(prompt, options), timeout=options.timeout, metadata=security.metadata()
        )
        async for response in call:
            printer.event(response)
            if response.WhichOneof("event") == "run_finished":
                finished = response.run_finished
    return finished


async def list_tools(
    target: str, timeout: float = 10.0, security: ClientSecurity | None = None
) -> list[common_pb2.ToolSpec]:
    security = security or ClientSecurity()
    async with security.channel(target, ()) as channel:
        stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)
        request = conveyor_pb2.ListToolsRequest()
        listed = await stub.ListTools(request, timeout=timeout, metadata=security.metadata())
        return list(listed.tools)


def print_tools(tools: Sequence[common_pb2.ToolSpec], as_json: bool, out=sys.stdout) -> None:
    for tool in tools:
        if as_json:
            out.write(json.dumps(json_format.MessageToDict(tool)) + "\n")
            continue
        mode = common_pb2.PartialMode.Name(tool.partial_mode).removeprefix("PARTIAL_MODE_")
        early = ", runs while decoding" if tool.partial_safe else ""
        out.write(f"{tool.name}  ({mode.lower()}{early})\n")
        out.write(f"    {tool.description}\n")
        schema = json.loads(tool.parameters_json_schema or "{}")
        for name, spec in schema.get("properties", {}).items():
            out.write(f"    - {name}: {spec.get('type', 'any')}  {spec.get('description', '')}\n")


async def chat(target: str, options: RunOptions, lines, out=sys.stdout) -> int:
    """One run per line read; each answer joins the conversation. Returns
    the number of runs."""
    runs = 0
    printer = Printer(out)
    for line in lines:
        prompt = line.strip()
        if prompt in ("/exit", "/quit"):
            break
        if not prompt:
            continue
        finished = await run_once(target, prompt, options, printer)
        runs += 1
        options.history.append(common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt))
        if finished is not None and finished.final_text:
            options.history.append(
                common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=finished.final_text)
            )
        if out.isatty():
            out.write("> ")
            out.flush()
    return runs


def _stdin_lines():
    if sys.stdin.isatty():
        sys.stdout.write("Conveyor chat: a line is a turn; /exit or end of input to leave.\n> ")
        sys.stdout.flush()
    yield from sys.stdin


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="conveyor", description="A client of Conveyor's scheduler")
    sub = p.add_subparsers(dest="command", required=True)

    def common(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument("--target", default=f"localhost:{SCHEDULER_PORT}", help="scheduler")
        cmd.add_argument(
            "--tls-ca", default="", help="PEM CA of the scheduler's certificate: connect with TLS"
        )
        cmd.add_argument("--tls-cert", default="", help="PEM client certificate (mutual TLS)")
        cmd.add_argument("--tls-key", default="", help="its key")
        cmd.add_argument(
            "--token-file",
            default="",
            help=f"file holding the API token (default: ${TOKEN_ENV} when set)",
        )

    def run_flags(cmd: argparse.ArgumentParser) -> None:
        common(cmd)
        cmd.add_argument("--system", default=DEFAULT_SYSTEM, help="system prompt")
        cmd.add_argument("--tools", default="", help="comma-separated tool names (default: all)")
        cmd.add_argument("--mode", choices=["partial", "sequential"], default="partial")
        cmd.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        cmd.add_argument("--seed", type=int, default=None)
        cmd.add_argument("--max-new-tokens", type=int, default=256, help="per round")
        cmd.add_argument("--max-rounds", type=int, default=2)
        cmd.add_argument("--timeout", type=float, default=600.0, help="seconds per run")

    run = sub.add_parser("run", help="one run, its events as they stream")
    run.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    run_flags(run)
    run.add_argument("--json", action="store_true", help="one JSON event per line")
    tools = sub.add_parser("tools", help="the tools a run may call")
    common(tools)
    tools.add_argument("--json", action="store_true", help="one JSON tool spec per line")
    run_flags(sub.add_parser("chat", help="an interactive conversation, one run per turn"))
    return p


def _security(args: argparse.Namespace) -> ClientSecurity:
    tls = None
    if args.tls_ca or args.tls_cert:
        tls = TlsFiles(args.tls_cert or None, args.tls_key or None, args.tls_ca or None)
    token = None
    if args.token_file:
        token = ClientToken(args.token_file)
    elif os.environ.get(TOKEN_ENV):
        token = StaticToken(os.environ[TOKEN_ENV])
    return ClientSecurity(tls=tls, token=token)


def _options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        security=_security(args),
        system=args.system,
        partial=args.mode == "partial",
        tools=[t.strip() for t in args.tools.split(",") if t.strip()],
        temperature=args.temperature,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        max_rounds=args.max_rounds,
        timeout=args.timeout,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "tools":
            print_tools(asyncio.run(list_tools(args.target, security=_security(args))), args.json)
        elif args.command == "run":
            printer = JsonPrinter() if args.json else Printer()
            finished = asyncio.run(run_once(args.target, args.prompt, _options(args), printer))
            if finished is None:
                sys.stderr.write("the run ended without a RunFinished event\n")
                return 1
        else:
            asyncio.run(chat(args.target, _options(args), _stdin_lines()))
    except grpc.aio.AioRpcError as e:
        sys.stderr.write(f"conveyor {args.command} failed: {e.code().name}: {e.details()}\n")
        return 2
    except SecurityConfigError as e:
        sys.stderr.write(f"conveyor {args.command}: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
