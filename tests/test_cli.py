"""The `conveyor` console script against the in-process stack (tiny model):
tools, a run as JSON lines with its flags, a chat of two turns, and a clear
failure when nothing listens."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest

from conveyor_common.cli import RunOptions, run_request

ROOT = Path(__file__).resolve().parents[1]
CONVEYOR = Path(sys.executable).with_name("conveyor")


async def _conveyor(*args: str, stdin: str = "") -> tuple[int, str, str]:
    if not CONVEYOR.is_file():
        pytest.fail(f"no {CONVEYOR}: the console script comes with `make install`")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'gen'}:{ROOT}", "LOG_FORMAT": "json"}
    proc = await asyncio.create_subprocess_exec(
        str(CONVEYOR),
        *args,
        env=env,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 240)
    return proc.returncode, out.decode(), err.decode()


async def test_tools_lists_each_tool_with_its_arguments(scheduler):
    rc, out, err = await _conveyor("tools", "--target", scheduler)
    assert rc == 0, err
    assert "python  (python_statements, runs while decoding)" in out
    assert "- code: string" in out
    rc, out, _ = await _conveyor("tools", "--target", scheduler, "--json")
    names = [json.loads(line)["name"] for line in out.splitlines()]
    assert "python" in names and names == sorted(names)


async def test_run_json_prints_one_event_per_line_ending_with_run_finished(scheduler):
    rc, out, err = await _conveyor(
        "run", "Say hi.", "--target", scheduler, "--json", "--tools", "python",
        "--mode", "sequential", "--temperature", "0.7", "--seed", "3",
        "--max-new-tokens", "8", "--max-rounds", "1",
    )  # fmt: skip
    assert rc == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [int(e.get("sequence", 0)) for e in events] == list(range(len(events)))
    assert "runFinished" in events[-1] and "tokenDelta" in json.dumps(events)


def test_run_flags_make_the_request():
    request = run_request(
        "hello",
        RunOptions(system="S", partial=False, tools=["python"], temperature=0.5, seed=7),
    )
    assert [m.content for m in request.messages] == ["S", "hello"]
    assert list(request.tool_names) == ["python"] and request.mode == 2
    assert request.sampling.temperature == 0.5 and request.sampling.seed == 7


async def test_chat_runs_each_line_and_carries_the_conversation(scheduler):
    rc, out, err = await _conveyor(
        "chat", "--target", scheduler, "--max-new-tokens", "6", "--max-rounds", "1",
        stdin="first question\n\nsecond question\n/exit\nnever sent\n",
    )  # fmt: skip
    assert rc == 0, err
    assert out.count("run finished") == 2


async def test_chat_history_holds_each_turn_and_its_answer(scheduler):
    from conveyor_common.cli import chat

    class Out:
        def __init__(self):
            self.text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return False

    options = RunOptions(max_new_tokens=6, max_rounds=1)
    assert await chat(scheduler, options, iter(["one\n", "two\n"]), Out()) == 2
    from conveyor.v1 import common_pb2

    roles = [m.role for m in options.history]
    assert roles == [common_pb2.ROLE_USER, common_pb2.ROLE_ASSISTANT] * 2
    assert [m.content for m in options.history][::2] == ["one", "two"]
    # The second run was sent the first turn and its answer.
    assert run_request("three", options).messages[1].content == "one"


async def test_a_scheduler_that_is_not_there_is_a_clear_failure():
    rc, _, err = await _conveyor("tools", "--target", "127.0.0.1:1")
    assert rc == 2 and "conveyor tools failed: UNAVAILABLE" in err
