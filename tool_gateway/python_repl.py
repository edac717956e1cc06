"""The interpreter loop that runs inside the sandbox (stdlib only; started as a
script: `python -I python_repl.py OUTPUT_CAP`).

Protocol: each message is a 4-byte big-endian length and that many bytes of
UTF-8 JSON. The gateway writes requests {"seq", "code"} to our stdin; we
write {"ready": true} once, then one reply per request to our stdout, echoing
its seq, and before it, while the unit runs, {"seq", "progress": text} with
what it printed since the last one (at most every PROGRESS_INTERVAL_S). Each
text of a reply (stdout, stderr, value, exception) is at most OUTPUT_CAP bytes
of UTF-8, and so is a unit's progress, all frames together. Before any user
code runs, both pipes move to private high fds and fds 0 and 1 point at
/dev/null, so nothing the user does by accident with print, sys.stdout,
os.write(1) or a child process can corrupt the protocol. Code that means to can
still write to the private fds: the gateway trusts nothing it reads here.
"""

from __future__ import annotations

import ast
import builtins
import codecs
import fcntl
import io
import json
import linecache
import os
import sys
import threading
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout

# Above the fds user code usually touches, below RLIMIT_NOFILE (256).
_PRIVATE_FD_MIN = 200
PROGRESS_INTERVAL_S = 0.2


class _Progress:
    """Streams what a running unit prints: collects it, and a flusher thread
    sends it every PROGRESS_INTERVAL_S, so a print is seen while the unit
    goes on, and a tight print loop costs a frame per interval, not per line."""

    def __init__(self, send) -> None:
        self._send = send
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending: list[str] = []
        self._sent = 0  # UTF-8 bytes passed on, up to the output cap
        self._cap = 0
        self._seq = 0  # the request whose unit is running
        self._wake = threading.Condition()
        threading.Thread(target=self._flusher, daemon=True).start()

    def start(self, seq: int, cap: int) -> None:
        with self._wake:
            self._pending, self._sent, self._cap, self._seq = [], 0, cap, seq

    def add(self, data: bytes) -> None:
        with self._wake:
            room = self._cap - self._sent
            if room > 0:
                # Counted decoded: an undecodable byte becomes a 3-byte U+FFFD.
                text, _ = _cap(self._decoder.decode(data[:room]), room)
                self._sent += len(text.encode("utf-8"))
                self._pending.append(text)

    def stop(self) -> None:
        """The unit ended: its result carries everything; drop the rest."""
        with self._wake:
            self._pending, self._cap = [], 0
            self._decoder.reset()

    def _flusher(self) -> None:
        while True:
            time.sleep(PROGRESS_INTERVAL_S)
            with self._wake:
                text, self._pending = "".join(self._pending), []
                if text:
                    self._send({"seq": self._seq, "progress": text})


class _CappedSink(io.RawIOBase):
    """Keeps the first `cap` bytes written and counts the rest away."""

    def __init__(self, cap: int, progress: _Progress | None = None):
        self.cap = cap
        self.data = bytearray()
        self.truncated = False
        self.progress = progress

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        room = self.cap - len(self.data)
        if len(b) > room:
            self.truncated = True
        if room > 0:
            self.data += bytes(memoryview(b)[:room])
        if self.progress is not None:
            self.progress.add(bytes(b))
        return len(b)


class _Capture:
    """A text stream for sys.stdout/sys.stderr with a byte cap. It has a
    .buffer (some code writes bytes) and never fails on odd characters."""

    def __init__(self, cap: int, progress: _Progress | None = None):
        self.sink = _CappedSink(cap, progress)
        self.stream = io.TextIOWrapper(
            io.BufferedWriter(self.sink),
            encoding="utf-8",
            errors="backslashreplace",  # lone surrogates become \udcff, not an error
            write_through=True,
            line_buffering=True,  # each line reaches the sink (and progress) at once
        )

    def text(self) -> str:
        try:
            self.stream.flush()
        except (ValueError, OSError):  # the user closed it
            pass
        return self.sink.data.decode("utf-8", "replace")


def _clean(text: str) -> str:
    """Valid UTF-8 for the gateway (protobuf strings must be)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _cap(text: str, cap: int) -> tuple[str, bool]:
    data = text.encode("utf-8")
    if len(data) <= cap:
        return text, False
    return data[:cap].decode("utf-8", "ignore"), True


_UNIT_PREFIX = "<unit "


def _format_exception(exc: BaseException) -> str:
    """The traceback from the user's first frame on: this loop's frames and
    the compiler's (for a SyntaxError) are cut."""
    tb = exc.__traceback__
    while tb is not None and not tb.tb_frame.f_code.co_filename.startswith(_UNIT_PREFIX):
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


class Interpreter:
    def __init__(self, output_cap: int, progress: _Progress | None = None):
        self.cap = output_cap
        self.namespace: dict = {"__name__": "__main__", "__builtins__": builtins}
        self.serial = 0
        self.progress = progress

    def run(self, seq: int, code: str) -> dict:
        self.serial += 1
        filename = f"{_UNIT_PREFIX}{self.serial}>"
        # Tracebacks show the source of every unit, earlier ones included.
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        out, err = _Capture(self.cap, self.progress), _Capture(self.cap)
        if self.progress is not None:
            self.progress.start(seq, self.cap)
        value = exception = ""
        start = time.perf_counter()
        with redirect_stdout(out.stream), redirect_stderr(err.stream):
            try:
                tree = ast.parse(code, filename, "exec")
                if len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr):
                    expr = ast.Expression(tree.body[0].value)
                    result = eval(compile(expr, filename, "eval"), self.namespace)
                    if result is not None:
                        value = repr(result)
                else:
                    exec(compile(tree, filename, "exec"), self.namespace)
            except BaseException as e:  # SystemExit and KeyboardInterrupt are user errors too
                exception = _format_exception(e)
        duration = time.perf_counter() - start
        stdout = out.text()
        if self.progress is not None:
            self.progress.stop()
        # Capped once decoded too: each undecodable byte became a 3-byte U+FFFD.
        texts = {
            "stdout": _cap(stdout, self.cap),
            "stderr": _cap(err.text(), self.cap),
            "value": _cap(_clean(value), self.cap),
            "exception": _cap(_clean(exception), self.cap),
        }
        cut = out.sink.truncated or err.sink.truncated or any(c for _, c in texts.values())
        return {
            "seq": seq,
            "ok": not exception,
            **{name: text for name, (text, _) in texts.items()},
            "duration": duration,
            "truncated": cut,
        }


def _private(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _PRIVATE_FD_MIN)


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, left)
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(fd: int) -> dict | None:
    header = _read_exactly(fd, 4)
    if header is None:
        return None
    body = _read_exactly(fd, int.from_bytes(header, "big"))
    return None if body is None else json.loads(body)


_send_lock = threading.Lock()  # the progress flusher sends from its own thread


def _send(fd: int, message: dict) -> None:
    body = json.dumps(message).encode("utf-8")
    view = memoryview(len(body).to_bytes(4, "big") + body)
    with _send_lock:
        while view:
            view = view[os.write(fd, view) :]


def main() -> None:
    output_cap = int(sys.argv[1])
    proto_in, proto_out = _private(0), _private(1)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdin = open(os.devnull)  # input() gets EOF, never a protocol byte
    sys.stdout = open(os.devnull, "w")  # output of background threads between units
    sys.path.insert(0, "")  # like the python REPL: modules in the working directory
    interpreter = Interpreter(output_cap, _Progress(lambda m: _send(proto_out, m)))
    _send(proto_out, {"ready": True})
    while (request := _receive(proto_in)) is not None:
        _send(proto_out, interpreter.run(request["seq"], request["code"]))


if __name__ == "__main__":
    main()
