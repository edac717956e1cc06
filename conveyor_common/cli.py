"""A command-line client of ConveyorService.Run that prints the streamed
events readably: tokens as they come, each unit dispatched and its result,
and the timing breakdown.

    python -m conveyor_common.cli "Write Python that prints 2**10" --mode partial
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from conveyor.v1 import common_pb2, conveyor_pb2, conveyor_pb2_grpc

from conveyor_common.defaults import SCHEDULER_PORT

DEFAULT_SYSTEM = (
    "You are a helpful assistant. When a task needs computation, write Python code "
    "in a ```python block; it is executed and you see the output."
)
DEFAULT_PROMPT = (
    "Write Python code that computes the sum of the squares of the numbers "
    "from 1 to 10 and prints it."
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


async def run_once(
    target: str,
    prompt: str,
    *,
    system: str = DEFAULT_SYSTEM,
    partial: bool = True,
    max_new_tokens: int = 256,
    max_rounds: int = 2,
    timeout: float = 600.0,
) -> conveyor_pb2.RunFinished:
    request = conveyor_pb2.RunRequest(
        messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=system),
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt),
        ],
        mode=conveyor_pb2.EXECUTION_MODE_PARTIAL
        if partial
        else conveyor_pb2.EXECUTION_MODE_SEQUENTIAL,
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens),
        max_rounds=max_rounds,
    )
    printer = Printer()
    finished = None
    async with grpc.aio.insecure_channel(target) as channel:
        stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)
        async for response in stub.Run(request, timeout=timeout):
            printer.event(response)
            if response.WhichOneof("event") == "run_finished":
                finished = response.run_finished
    return finished


def main() -> None:
    p = argparse.ArgumentParser(description="Send one run to a Conveyor scheduler")
    p.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    p.add_argument("--target", default=f"localhost:{SCHEDULER_PORT}")
    p.add_argument("--mode", choices=["partial", "sequential"], default="partial")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--max-rounds", type=int, default=2)
    args = p.parse_args()
    try:
        asyncio.run(
            run_once(
                args.target,
                args.prompt,
                partial=args.mode == "partial",
                max_new_tokens=args.max_new_tokens,
                max_rounds=args.max_rounds,
            )
        )
    except grpc.aio.AioRpcError as e:
        sys.exit(f"run failed: {e.code().name}: {e.details()}")


if __name__ == "__main__":
    main()
