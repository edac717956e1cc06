"""The `python` tool: a persistent interpreter per session, in a sandbox.

Each session is one process running `python_repl.py`; units travel to it as
length-prefixed JSON on its stdin and results come back on its stdout (see
that file). A unit that overruns the unit timeout, or is cancelled mid-run,
kills the process: an interpreter stuck in user code cannot be interrupted
safely, and the protocol would be out of step anyway.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tool_gateway.config import GatewayConfig
from tool_gateway.metrics import SESSIONS
from tool_gateway.sandbox import (
    Limits,
    PidsCgroups,
    Sandbox,
    death_signal,
    find_sandbox,
    kill_group,
    pids_cgroups,
    spawn,
)
from tool_gateway.tools.base import (
    PartialMode,
    Tool,
    ToolErrorCode,
    ToolFailure,
    ToolSession,
    ToolSpec,
    Unit,
    UnitOutcome,
)

REPL_PATH = Path(__file__).resolve().parent.parent / "python_repl.py"
STARTUP_TIMEOUT_S = 30.0
EXIT_WAIT_S = 2.0
STDERR_TAIL_BYTES = 4096

SPEC = ToolSpec(
    name="python",
    description=(
        "Runs Python 3 code in a persistent interpreter: variables, functions and imports "
        "stay defined for later calls. Output printed with print() is returned, and so is "
        "the value of each top-level expression. There is no network access; only /tmp is "
        "writable."
    ),
    parameters={
        "type": "object",
        "properties": {"code": {"type": "string", "description": "The Python code to run."}},
        "required": ["code"],
    },
    partial_mode=PartialMode.PYTHON_STATEMENTS,
    partial_safe=True,
    command_field="code",
)


class PythonTool(Tool):
    spec = SPEC

    def __init__(
        self, *, sandbox: Sandbox | None, limits: Limits, unit_timeout: float, output_cap: int
    ):
        self.sandbox = sandbox  # None: unsandboxed (only with --allow-unsandboxed)
        self.limits = limits
        self.unit_timeout = unit_timeout
        self.output_cap = output_cap

    @classmethod
    async def from_config(cls, config: GatewayConfig) -> PythonTool:
        """Checks the sandbox first; raises SandboxUnavailable when there is
        none and running without one is not allowed."""
        return cls(
            sandbox=await find_sandbox(config.allow_unsandboxed),
            limits=Limits(
                cpu_seconds=config.cpu_seconds,
                memory_bytes=config.memory_mb << 20,
                processes=config.max_processes,
            ),
            unit_timeout=config.unit_timeout,
            output_cap=config.output_cap,
        )

    async def open_session(self, session_key: str) -> PythonSession:
        # Unsandboxed there is no private /tmp: give each session a directory.
        workdir = None if self.sandbox else tempfile.mkdtemp(prefix="conveyor-python-")
        command = [sys.executable, "-I", str(REPL_PATH), str(self.output_cap)]
        cgroup = pids_cgroups().new(self.limits.processes)
        try:
            proc = await spawn(
                command, self.limits, self.sandbox, cwd=workdir or "/tmp", cgroup=cgroup
            )
        except OSError as e:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            PidsCgroups.remove(cgroup)
            raise ToolFailure(ToolErrorCode.SANDBOX, f"could not start the interpreter: {e}") from e
        session = PythonSession(proc, self, workdir, cgroup)
        try:
            await session.wait_ready()
        except BaseException:
            await session.close()
            raise
        return session


class PythonSession(ToolSession):
    def __init__(
        self, proc: asyncio.subprocess.Process, tool: PythonTool, workdir: str | None, cgroup: str
    ):
        self._proc = proc
        self._tool = tool
        self._workdir = workdir
        self._cgroup = cgroup
        self._lock = asyncio.Lock()  # one unit at a time: the protocol is request/reply
        self._dead: str | None = None  # why no unit can run any more
        self._closed = False
        self._stderr = bytearray()
        self._stderr_task = asyncio.create_task(self._drain_stderr())
        SESSIONS.labels(SPEC.name).inc()

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def alive(self) -> bool:
        return self._dead is None and self._proc.returncode is None

    async def wait_ready(self) -> None:
        try:
            hello = await asyncio.wait_for(self._receive(), STARTUP_TIMEOUT_S)
        except TimeoutError:
            self._kill("it did not start")
            raise ToolFailure(
                ToolErrorCode.SANDBOX,
                f"the Python interpreter did not start within {STARTUP_TIMEOUT_S:g} s",
            ) from None
        except (asyncio.IncompleteReadError, ConnectionError):
            reason = await self._death_reason()
            raise ToolFailure(ToolErrorCode.SANDBOX, f"could not start: {reason}") from None
        if not hello.get("ready"):
            self._kill("it spoke out of turn")
            raise ToolFailure(ToolErrorCode.INTERNAL, f"unexpected first message {hello!r}")

    async def run_unit(self, unit: Unit) -> UnitOutcome:
        async with self._lock:
            if not self.alive:
                raise ToolFailure(ToolErrorCode.SANDBOX, self._dead or "the interpreter is gone")
            timeout = self._tool.unit_timeout
            try:
                reply = await asyncio.wait_for(self._exchange(unit), timeout)
            except TimeoutError:
                self._kill(f"unit {unit.index} ran past the {timeout:g} s unit timeout")
                raise ToolFailure(
                    ToolErrorCode.TIMEOUT,
                    f"unit {unit.index} ran past the {timeout:g} s unit timeout; the "
                    "interpreter was killed and its variables are lost",
                ) from None
            except (asyncio.IncompleteReadError, ConnectionError):
                reason = await self._death_reason()
                self._kill(reason)
                raise ToolFailure(ToolErrorCode.SANDBOX, reason) from None
            except asyncio.CancelledError:
                self._kill("a unit was cancelled while running")
                raise
        return UnitOutcome(
            index=unit.index,
            ok=reply["ok"],
            stdout=reply["stdout"],
            stderr=reply["stderr"],
            value=reply["value"],
            exception=reply["exception"],
            duration_seconds=reply["duration"],
            truncated=reply["truncated"],
        )

    async def finish(self, full_text: str, outcomes: Sequence[UnitOutcome]) -> str:
        return summarize(outcomes, self._tool.output_cap)

    async def cancel(self) -> None:
        self._kill("the call was cancelled")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._kill("the session was closed")
        await self._proc.wait()
        PidsCgroups.remove(self._cgroup)
        self._stderr_task.cancel()
        if self._workdir:
            await asyncio.to_thread(shutil.rmtree, self._workdir, True)
        SESSIONS.labels(SPEC.name).dec()

    # ---- protocol ------------------------------------------------------

    async def _exchange(self, unit: Unit) -> dict:
        body = json.dumps({"index": unit.index, "code": unit.text}).encode("utf-8")
        assert self._proc.stdin is not None
        self._proc.stdin.write(len(body).to_bytes(4, "big") + body)
        await self._proc.stdin.drain()
        while "progress" in (reply := await self._receive()):
            self.report(unit.index, reply["progress"])  # output while the unit runs
        return reply

    async def _receive(self) -> dict:
        assert self._proc.stdout is not None
        header = await self._proc.stdout.readexactly(4)
        return json.loads(await self._proc.stdout.readexactly(int.from_bytes(header, "big")))

    # ---- process -------------------------------------------------------

    def _kill(self, reason: str) -> None:
        if self._dead is None:
            self._dead = f"the interpreter was stopped earlier: {reason}"
        kill_group(self._proc)

    async def _drain_stderr(self) -> None:
        """Keeps the tail of what the process wrote to fd 2 (bwrap's own errors,
        a crash report), for the error message when it dies."""
        assert self._proc.stderr is not None
        while chunk := await self._proc.stderr.read(4096):
            self._stderr += chunk
            del self._stderr[:-STDERR_TAIL_BYTES]

    async def _death_reason(self) -> str:
        """Why the interpreter's pipe closed, in words for the model and people."""
        try:
            await asyncio.wait_for(self._proc.wait(), EXIT_WAIT_S)
            await asyncio.wait_for(asyncio.shield(self._stderr_task), EXIT_WAIT_S)
        except TimeoutError:
            self._kill("its pipe closed")
            return "the Python interpreter stopped answering; it was killed"
        code = self._proc.returncode
        assert code is not None
        sig = death_signal(code, sandboxed=self._tool.sandbox is not None)
        limits = self._tool.limits
        if sig == signal.SIGXCPU:
            why = f"used up its CPU time limit ({limits.cpu_seconds} s per session)"
        elif sig == signal.SIGKILL:
            why = (
                "was killed (SIGKILL): it hit the hard CPU time limit, ran out of memory "
                f"(limit {limits.memory_bytes >> 20} MiB), or the code killed it"
            )
        elif sig is not None:
            why = f"died of signal {signal.Signals(sig).name}"
        else:
            why = f"exited with code {code}"
        message = f"the Python interpreter {why}; its variables are lost"
        tail = self._stderr.decode("utf-8", "replace").strip()
        return f"{message}. Its last error output:\n{tail[-1000:]}" if tail else message


def summarize(outcomes: Sequence[UnitOutcome], cap: int) -> str:
    """The tool message for the model: what the units printed, the values of
    expressions and the exceptions, in unit order, like a notebook cell."""
    parts: list[str] = []
    for o in outcomes:
        for text in (o.stdout, o.stderr, o.value, o.exception):
            if text:
                parts.append(text if text.endswith("\n") else text + "\n")
        if o.truncated:
            parts.append("[output truncated]\n")
    text = "".join(parts).rstrip("\n")
    return _cut_middle(text, cap) if text else "(no output)"


def _cut_middle(text: str, cap: int) -> str:
    """Keeps the head and the tail (where a final exception is) within cap bytes."""
    data = text.encode("utf-8")
    if len(data) <= cap:
        return text
    half = cap // 2
    head = data[:half].decode("utf-8", "ignore")
    tail = data[-half:].decode("utf-8", "ignore")
    return f"{head}\n[... {len(data) - 2 * half} bytes cut ...]\n{tail}"
