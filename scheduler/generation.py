"""One generation pass of a run: the worker's stream of deltas, out to the
client as TokenDelta events and through the envelope scanner into the call
table, until the model stops or an abort verdict stops it."""

from __future__ import annotations

import contextlib
import time

from conveyor_common.types import Envelope, FinishReason, Message
from scheduler.calls import CallTable
from scheduler.envelopes import EnvelopeScanner, ScanContext, formats_named
from scheduler.events import TokenDelta
from scheduler.plans import PlanScanner
from scheduler.tools import fence_tools
from scheduler.worker_client import WorkerClient, WorkerDone


class Generation:
    def __init__(self, run, round_no: int, worker: WorkerClient, table: CallTable):
        self.id = f"{run.spec.run_id}-r{round_no}"  # the worker's request id, for Abort
        self.round = round_no
        self.output_started = False  # a token delta went out
        self._run = run
        self._worker = worker
        self._table = table

    def _scanner(self):
        spec = self._run.spec
        if Envelope.PLAN in spec.envelopes:
            return PlanScanner()
        context = ScanContext(
            fence_tools=fence_tools(spec.tools),
            tool_schemas={name: tool.parameters for name, tool in spec.tools.items()},
        )
        return EnvelopeScanner(formats_named(spec.envelopes), context)

    async def run(self, messages: list[Message]) -> tuple[str, WorkerDone]:
        """The round's output text, and how the worker ended it."""
        table = self._table
        scanner = self._scanner()
        with self._run.spans.round(self.round):
            text, done = await self._decode(messages, scanner)
        if table.abort is None:  # an aborted call was cut on purpose: no parse error
            for event in scanner.finish():
                table.on_scan(self.round, event)
        return text, done or WorkerDone(FinishReason.ABORTED, 0, 0.0, 0.0)

    async def _decode(self, messages: list[Message], scanner) -> tuple[str, WorkerDone | None]:
        """The worker's stream, out as events and into the scanner."""
        spec, table = self._run.spec, self._table
        forced = spec.forced_completions
        parts: list[str] = []
        done: WorkerDone | None = None
        table.decoding = True
        start = time.perf_counter()
        stream = self._worker.generate(
            self.id,
            messages,
            list(spec.tools.values()),
            spec.sampling,
            forced[self.round] if self.round < len(forced) else None,
            timeout=self._run.remaining(),
        )
        try:
            # aclosing: leaving the loop early must cancel the worker's stream now.
            async with contextlib.aclosing(stream):
                async for item in stream:
                    if table.abort is not None:
                        break  # a verdict came while this delta was on its way
                    if isinstance(item, WorkerDone):
                        done = item
                        self._run.timing.prompted(item.prompt_tokens)
                        break
                    table.delta_at = time.perf_counter()
                    self.output_started = True
                    parts.append(item.text)
                    self._run.emit(TokenDelta(self.round, item.text, item.token_count))
                    self._run.timing.tokens(item.token_count)
                    for event in scanner.feed(item.text):
                        table.on_scan(self.round, event)
                    if table.abort is not None:
                        break  # leaving the stream stops decoding
        finally:
            table.decoding = False
            self._run.timing.decoded(start, time.perf_counter())
        return "".join(parts), done
