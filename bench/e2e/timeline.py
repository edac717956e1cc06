"""One run as the client saw it, and the ideal bound computed from it.

Every event is stamped when it arrives. The ideal bound of a request is the
latency it would have had if each unit had started the moment its text was
complete (its UnitDispatched in PARTIAL mode, which sends at once) and its
inputs were ready (the unit before it in its call; for a plan step, the steps
it names), with each tool taking the time it was measured to take, and with
decoding stopped at once by an abort verdict. Each round then ends at the
later of its last token and its last tool result; what the partial run spent
past that point is what no scheduler could have saved.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

# Object reprs carry memory addresses, which differ from run to run.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


@dataclass
class Stamped:
    at: float
    kind: str
    event: object  # the RunResponse


@dataclass
class RunTimeline:
    started: float
    events: list[Stamped] = field(default_factory=list)
    finished: float = 0.0

    @property
    def latency(self) -> float:
        return self.finished - self.started

    def final(self):
        return self.events[-1].event.run_finished

    def add(self, response) -> None:
        self.events.append(Stamped(time.perf_counter(), response.WhichOneof("event"), response))

    def unit_results(self) -> dict[tuple[str, int], tuple]:
        """Tool results without timing or object addresses, to check both
        modes agree."""
        out = {}
        for s in self.events:
            if s.kind == "unit_result":
                r = s.event.unit_result.result
                texts = (_ADDRESS.sub(" at 0x…", t) for t in (r.stdout, r.value, r.exception))
                out[(s.event.unit_result.call_id, r.index)] = (r.ok, *texts)
        return out

    def dispatch_to_start(self) -> list[float]:
        """Per unit: from the moment it could start (its dispatch reached the
        client, and the unit before it in its call had returned) to its tool
        starting (result arrival minus measured duration). Queueing behind
        an earlier unit of the call is left out; the return trip is in."""
        dispatched: dict[tuple[str, int], float] = {}
        returned: dict[tuple[str, int], float] = {}
        out = []
        for s in self.events:
            if s.kind == "unit_dispatched":
                d = s.event.unit_dispatched
                dispatched[(d.call_id, d.index)] = s.at
            elif s.kind == "unit_result":
                r = s.event.unit_result
                key = (r.call_id, r.result.index)
                returned[key] = s.at
                if key in dispatched:
                    ready = max(dispatched[key], returned.get((r.call_id, r.result.index - 1), 0))
                    out.append(max(0.0, s.at - r.result.duration_seconds - ready))
        return out

    def ideal_latency(self) -> float:
        """The ideal bound (see the module docstring); meant for a PARTIAL run."""
        rounds = [i for i, s in enumerate(self.events) if s.kind == "round_started"]
        saved = 0.0
        for n, first in enumerate(rounds):
            last = rounds[n + 1] if n + 1 < len(rounds) else len(self.events) - 1
            span = self.events[first : last + 1]
            actual_end = self.events[last].at
            saved += max(0.0, actual_end - _ideal_round_end(span))
        return self.latency - saved


def _ideal_round_end(span: list[Stamped]) -> float:
    decode_end = max((s.at for s in span if s.kind == "token_delta"), default=span[0].at)
    complete: dict[tuple[str, int], float] = {}  # unit -> its text was complete
    duration: dict[tuple[str, int], float] = {}
    plan_steps: dict[str, dict[int, tuple[float, tuple[int, ...]]]] = {}
    verdict = None
    for s in span:
        if s.kind == "unit_dispatched":
            d = s.event.unit_dispatched
            complete[(d.call_id, d.index)] = s.at
            if d.depends_on or (d.field.isdigit() and "." not in d.call_id):
                plan_steps.setdefault(d.call_id, {})[int(d.field)] = (s.at, tuple(d.depends_on))
        elif s.kind == "unit_result":
            r = s.event.unit_result
            duration[(r.call_id, r.result.index)] = r.result.duration_seconds
        elif s.kind == "abort_verdict" and verdict is None:
            v = s.event.abort_verdict
            verdict = (v.call_id, v.verdict.unit_index)

    ends: dict[tuple[str, int], float] = {}
    step_calls = {call for call, _ in complete if "." in call}
    for call in sorted({c for c, _ in complete} - set(plan_steps)):
        end = 0.0
        for index in sorted(i for c, i in complete if c == call):
            if call in step_calls:
                continue  # plan steps are scheduled below, as a whole
            start = max(complete[(call, index)], end)
            end = ends[(call, index)] = start + duration.get((call, index), 0.0)

    # A plan step starts when complete and the steps it names have ended; it
    # lasts as long as its own call's units took.
    for plan, steps in plan_steps.items():
        step_end: dict[int, float] = {}
        for n in sorted(steps):
            at, deps = steps[n]
            work = sum(d for (c, _), d in duration.items() if c == f"{plan}.{n}")
            start = max([at, *(step_end.get(d, at) for d in deps)])
            step_end[n] = start + work
            ends[(f"{plan}.{n}", 0)] = step_end[n]

    if verdict is not None and verdict in ends:
        return ends[verdict]  # decoding would have stopped right there
    return max([decode_end, *ends.values()])
