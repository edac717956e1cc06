"""The `python` tool: a persistent interpreter per session, in a sandbox.

Each session is one process running `python_repl.py`; units travel to it as
length-prefixed JSON on its stdin and results come back on its stdout (see
that file). A unit that overruns the unit timeout, or is cancelled mid-run,
kills the process: an interpreter stuck in user code cannot be interrupted
safely, and the protocol would be out of step anyway.

Everything that comes out of the sandbox is untrusted: the user's code runs in
the REPL's process and can write frames of its own to the reply pipe. So a
frame's declared length is checked against max_frame_bytes() before its body
is read; its shape and types are checked; each text is capped to --output-cap
again (a unit's progress too, all frames together); and each frame must echo
the seq of the request it answers. A frame that fails any of this fails its
unit with a SANDBOX error and kills the interpreter, since its stream cannot be
trusted any more. A forged frame that passes is indistinguishable from the
REPL's own, which is fine: the code controls its own output anyway.

Memory: a session's reply pipe goes through asyncio's StreamReader, which
stops reading once it holds 2 x 64 KiB, plus one read of at most 256 KiB.
Reading a frame grows it to that frame, at most max_frame_bytes(output_cap) =
24 x output_cap + 1 KiB (1.5 MiB at the default 64 KiB), and the frame then
exists at most four times (the buffer, its copy, the decoded text, the parsed
JSON) until its texts are capped. So, however its code forges frames, one
session makes the gateway hold at most session_memory_bound(output_cap) =
4 x (24 x --output-cap + 1 KiB) + 384 KiB (about 6.4 MiB at the defaults).
At most --max-sessions interpreters live at once (a session past that fails
with a SANDBOX error saying so), so all of them together hold at most
--max-sessions x that: 820 MiB at the defaults (128 sessions, 64 KiB cap).
"""

from __future__ import annotations

import asyncio
import json
import math
import reprlib
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tool_gateway.config import DEFAULT_MAX_SESSIONS, GatewayConfig
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
SANDBOX_REPL_PATH = "/conveyor/python_repl.py"  # where a sandbox sees it, alone
STARTUP_TIMEOUT_S = 30.0
EXIT_WAIT_S = 2.0
STDERR_TAIL_BYTES = 4096

# The texts of a reply, each at most output_cap bytes of UTF-8.
TEXT_FIELDS = ("stdout", "stderr", "value", "exception")
JSON_ESCAPE_MAX = 6  # json.dumps writes a control character as \u00XX: 6 bytes for 1
FRAME_OVERHEAD = 1024  # the keys, seq, ok, duration and truncated


def max_frame_bytes(output_cap: int) -> int:
    """The longest frame the REPL sends: a reply's four texts, each at most
    output_cap bytes of UTF-8 and JSON-escaped, and the rest. (A progress
    frame holds one text.) A longer one is refused before it is read."""
    return len(TEXT_FIELDS) * JSON_ESCAPE_MAX * output_cap + FRAME_OVERHEAD


# asyncio's StreamReader pauses the pipe at 2 x 64 KiB and reads at most
# 256 KiB at a time; a frame exists at most this many times while it is read.
READER_BUFFER_BYTES = 2 * 64 * 1024 + 256 * 1024
FRAME_COPIES = 4  # the reader's buffer, its copy, the decoded text, the parsed JSON


def session_memory_bound(output_cap: int) -> int:
    """The most gateway memory one session's frames can hold, however its
    code forges them (see the module docstring)."""
    return FRAME_COPIES * max_frame_bytes(output_cap) + READER_BUFFER_BYTES


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
        self,
        *,
        sandbox: Sandbox | None,
        limits: Limits,
        unit_timeout: float,
        output_cap: int,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
    ):
        self.sandbox = sandbox  # None: unsandboxed (only with --allow-unsandboxed)
        self.limits = limits
        self.unit_timeout = unit_timeout
        self.output_cap = output_cap
        self.max_sessions = max_sessions
        self.live_sessions = 0  # started and not yet closed
        self.repl_source = REPL_PATH.read_bytes()

    @classmethod
    async def from_config(cls, config: GatewayConfig) -> PythonTool:
        """Checks the sandbox first; raises SandboxUnavailable when there is
        none and running without one is not allowed."""
        return cls(
            sandbox=await find_sandbox(config.allow_unsandboxed),
            limits=Limits(
                cpu_seconds=config.cpu_seconds,
                memory_bytes=config.memory_mb << 20,
                tmp_bytes=config.tmp_mb << 20,
                processes=config.max_processes,
            ),
            unit_timeout=config.unit_timeout,
            output_cap=config.output_cap,
            max_sessions=config.max_sessions,
        )

    async def open_session(self, session_key: str) -> PythonSession:
        if self.live_sessions >= self.max_sessions:
            raise ToolFailure(
                ToolErrorCode.SANDBOX,
                f"the gateway already runs {self.max_sessions} interpreters (its "
                "--max-sessions); try again when one has ended",
            )
        # Counted before the first await, so no concurrent open passes the
        # limit; a session, once made, gives its count back in close().
        self.live_sessions += 1
        made: list[PythonSession] = []
        try:
            return await self._start_session(made)
        except BaseException:
            if not made:
                self.live_sessions -= 1
            raise

    async def _start_session(self, made: list[PythonSession]) -> PythonSession:
        # Unsandboxed there is no private /tmp: give each session a directory.
        workdir = None if self.sandbox else tempfile.mkdtemp(prefix="conveyor-python-")
        # A sandbox gets the script alone, not the project folder around it.
        repl = SANDBOX_REPL_PATH if self.sandbox else str(REPL_PATH)
        command = [sys.executable, "-I", repl, str(self.output_cap)]
        cgroup = pids_cgroups().new(self.limits.processes)
        try:
            proc = await spawn(
                command,
                self.limits,
                self.sandbox,
                cwd=workdir or "/tmp",
                cgroup=cgroup,
                files={SANDBOX_REPL_PATH: self.repl_source},
            )
        except OSError as e:
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            PidsCgroups.remove(cgroup)
            raise ToolFailure(ToolErrorCode.SANDBOX, f"could not start the interpreter: {e}") from e
        session = PythonSession(proc, self, workdir, cgroup)
        made.append(session)
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
        self._seq = 0  # of the last request sent; its reply must echo it
        self._max_frame = max_frame_bytes(tool.output_cap)
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
            _check_shape(hello, READY_TYPES)
            if hello["ready"] is not True:
                raise ProtocolError("a first frame that is not ready")
        except ProtocolError as e:
            raise self._broken(e) from None
        except TimeoutError:
            self._kill("it did not start")
            raise ToolFailure(
                ToolErrorCode.SANDBOX,
                f"the Python interpreter did not start within {STARTUP_TIMEOUT_S:g} s",
            ) from None
        except (asyncio.IncompleteReadError, ConnectionError):
            reason = await self._death_reason()
            raise ToolFailure(ToolErrorCode.SANDBOX, f"could not start: {reason}") from None

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
            except ProtocolError as e:
                raise self._broken(e) from None
            except asyncio.CancelledError:
                self._kill("a unit was cancelled while running")
                raise
        return _outcome(unit.index, reply, self._tool.output_cap)

    async def finish(self, full_text: str, outcomes: Sequence[UnitOutcome]) -> str:
        return summarize(outcomes, self._tool.output_cap)

    async def cancel(self) -> None:
        self._kill("the call was cancelled")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._kill("the session was closed")
        await self._discard_replies()  # wait() waits for the pipes to close too
        await self._proc.wait()
        PidsCgroups.remove(self._cgroup)
        self._stderr_task.cancel()
        if self._workdir:
            await asyncio.to_thread(shutil.rmtree, self._workdir, True)
        SESSIONS.labels(SPEC.name).dec()
        self._tool.live_sessions -= 1

    # ---- protocol ------------------------------------------------------

    async def _exchange(self, unit: Unit) -> dict:
        """Sends the unit, streams its progress; returns its checked reply."""
        self._seq += 1
        body = json.dumps({"seq": self._seq, "code": unit.text}).encode("utf-8")
        assert self._proc.stdin is not None
        self._proc.stdin.write(len(body).to_bytes(4, "big") + body)
        await self._proc.stdin.drain()
        room = self._tool.output_cap  # for the unit's progress, all frames together
        while True:
            frame = await self._receive()
            kind = "progress" if "progress" in frame else "reply"
            _check_shape(frame, PROGRESS_TYPES if kind == "progress" else REPLY_TYPES)
            if frame["seq"] != self._seq:
                raise ProtocolError(
                    f"out of step: a {kind} for request {_short(frame['seq'])} came while "
                    f"request {self._seq} ran"
                )
            if kind == "reply":
                return frame
            text, _ = _cap_text(frame["progress"], room)
            room -= len(text.encode("utf-8"))
            self.report(unit.index, text)  # output while the unit runs

    async def _receive(self) -> dict:
        """The next frame: a JSON object no longer than the bound, which is
        checked before the body is read."""
        assert self._proc.stdout is not None
        size = int.from_bytes(await self._proc.stdout.readexactly(4), "big")
        if size > self._max_frame:
            raise ProtocolError(
                f"a frame of {size} bytes, more than the {self._max_frame} a reply can take"
            )
        body = await self._proc.stdout.readexactly(size)
        try:
            frame = json.loads(body)
        except (ValueError, RecursionError) as e:  # RecursionError: [[[[...
            raise ProtocolError(f"a frame that is not JSON ({_short(e)})") from None
        if not isinstance(frame, dict):
            raise ProtocolError(f"a frame that is a JSON {type(frame).__name__}, not an object")
        return frame

    async def _discard_replies(self) -> None:
        """Reads the dead interpreter's reply pipe to its end, so its transport
        closes: a reader left paused (on a refused frame) never sees EOF."""
        assert self._proc.stdout is not None
        try:
            await asyncio.wait_for(self._read_to_end(self._proc.stdout), EXIT_WAIT_S)
        except TimeoutError:
            pass  # a process outside the sandbox still holds it; GC closes it later

    @staticmethod
    async def _read_to_end(reader: asyncio.StreamReader) -> None:
        while await reader.read(1 << 16):
            pass

    def _broken(self, error: ProtocolError) -> ToolFailure:
        """The interpreter's stream cannot be trusted any more: it is killed."""
        self._kill(f"it broke the protocol: {error}")
        return ToolFailure(
            ToolErrorCode.SANDBOX,
            f"the Python interpreter broke the protocol: {error}; it was killed and its "
            "variables are lost",
        )

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


class ProtocolError(Exception):
    """The sandbox sent a frame the REPL never would."""


READY_TYPES: dict[str, type] = {"ready": bool}
PROGRESS_TYPES: dict[str, type] = {"seq": int, "progress": str}
REPLY_TYPES: dict[str, type] = {
    "seq": int,
    "ok": bool,
    **dict.fromkeys(TEXT_FIELDS, str),
    "duration": float,
    "truncated": bool,
}


_KINDS = {bool: "a bool", int: "an int", str: "a str", float: "a number >= 0"}


def _check_shape(frame: dict, types: dict[str, type]) -> None:
    """Raises ProtocolError unless `frame` has exactly these keys, of these types."""
    missing = [key for key in types if key not in frame]
    unknown = [key for key in frame if key not in types]
    if missing or unknown:
        problems = []
        if missing:
            problems.append("without " + ", ".join(map(repr, missing)))
        if unknown:
            named = ", ".join(reprlib.repr(key) for key in unknown[:3])
            problems.append(f"with unknown {named}{', ...' if len(unknown) > 3 else ''}")
        raise ProtocolError("a frame " + " and ".join(problems))
    for key, kind in types.items():
        value = frame[key]
        if kind is float:  # JSON has one kind of number: 1 and 1.0 both are one
            fits = type(value) in (int, float) and math.isfinite(value) and value >= 0
        else:
            fits = type(value) is kind  # so True is no int, and 1 no bool
        if not fits:
            raise ProtocolError(f"a frame whose {key!r} is {_short(value)}, not {_KINDS[kind]}")


def _short(value: object, limit: int = 60) -> str:
    """A forged value, cut to fit in an error message (reprlib never builds
    the whole repr of a big one)."""
    text = str(value) if isinstance(value, (int, BaseException)) else reprlib.repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _cap_text(text: str, cap: int) -> tuple[str, bool]:
    """At most cap bytes of valid UTF-8 (a lone surrogate, which JSON can
    carry and protobuf cannot, becomes \\udcxx), and whether it was cut."""
    data = text.encode("utf-8", "backslashreplace")
    if len(data) <= cap:
        return data.decode("utf-8"), False
    return data[:cap].decode("utf-8", "ignore"), True


def _outcome(index: int, reply: dict, cap: int) -> UnitOutcome:
    """A checked reply as an outcome, each text capped here too."""
    texts = {name: _cap_text(reply[name], cap) for name in TEXT_FIELDS}
    return UnitOutcome(
        index=index,
        ok=reply["ok"],
        **{name: text for name, (text, _) in texts.items()},
        duration_seconds=float(reply["duration"]),
        truncated=reply["truncated"] or any(cut for _, cut in texts.values()),
    )


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
