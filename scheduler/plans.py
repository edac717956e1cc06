"""LLMCompiler-style plans: the model writes numbered steps, each a tool call
whose arguments may name earlier steps' results (`$1`, `${2}`):

    $1 = search("population of Paris")
    $2 = search("population of Rome")
    $3 = calculator("$1 + $2")
    $4 = join()

With the plan envelope the whole model output is one plan call. Each step is
a unit of it (PlanStepParser); the run starts a step as soon as the step is
complete and every step it names has a result (in PARTIAL mode while the
model still writes the rest; in SEQUENTIAL mode once the plan is complete),
so independent steps run in parallel. A step runs as an ordinary call of its
tool: its arguments are bound (`$n` replaced by step n's output), mapped onto
the tool's parameters, and cut into units by the tool's own arguments parser.
`join()` ends a plan and calls no tool.
"""

from __future__ import annotations

import ast
import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conveyor_common.types import Envelope, PartialMode
from scheduler.envelopes import CallClosed, CallOpened, CallText, ScanEvent
from scheduler.events import CallOutcome, ParseError, RunEvent
from scheduler.parsers import ParsedUnit, ParseFailure, arguments_parser_for, check_unit, parser_for
from scheduler.parsers.plan_steps import STEP_REF, split_call
from scheduler.tools import ToolInfo

if TYPE_CHECKING:
    from scheduler.calls import Call, CallTable

PLAN_TOOL = ToolInfo(
    name="plan",
    description="An LLMCompiler-style plan; each step calls a tool.",
    partial_mode=PartialMode.PLAN_STEPS,
    partial_safe=True,
)
JOIN = "join"


class PlanScanner:
    """The envelope of a plan: the whole output is one call."""

    def __init__(self) -> None:
        self._open = False

    def feed(self, text: str) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        if not self._open:
            self._open = True
            events.append(CallOpened(Envelope.PLAN, PLAN_TOOL.name))
        if text:
            events.append(CallText(text))
        return events

    def finish(self) -> list[ScanEvent]:
        return [CallClosed()] if self._open else []

    @property
    def in_call(self) -> bool:
        return self._open


@dataclass(frozen=True)
class BoundStep:
    tool: str
    args: list
    kwargs: dict


def bind(call_text: str, results: dict[int, str]) -> BoundStep:
    """`calculator("$1 + $2")` with results {1: "3", 2: "4"} →
    BoundStep("calculator", ["3 + 4"], {}). A bare `$n` argument becomes
    step n's output; `$n` inside a string is replaced in place. Arguments
    must be Python literals: a plan names data, it runs no code."""
    name, args_text = split_call(call_text)
    try:
        tree = ast.parse(f"_({_deps_to_names(args_text)})", mode="eval").body
    except SyntaxError as e:
        raise ParseFailure(f"step {call_text[:60]!r}: arguments are not valid: {e.msg}") from None

    def value(node: ast.expr):
        if isinstance(node, ast.Name) and node.id.startswith("__step_"):
            n = int(node.id.removeprefix("__step_"))
            return results[n]
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return STEP_REF.sub(lambda m: results[int(m.group(1) or m.group(2))], node.value)
        if isinstance(node, ast.List | ast.Tuple):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.Dict):
            return {value(k): value(v) for k, v in zip(node.keys, node.values, strict=True)}
        try:
            return ast.literal_eval(node)
        except ValueError:
            raise ParseFailure(
                f"step {call_text[:60]!r}: {ast.unparse(node)!r} is not a literal or a $n"
            ) from None

    return BoundStep(
        name,
        [value(a) for a in tree.args],
        {k.arg: value(k.value) for k in tree.keywords if k.arg is not None},
    )


def _deps_to_names(args_text: str) -> str:
    """Turns `$1` / `${1}` outside string literals into the name `__step_1`;
    strings are left alone (their `$n` is replaced after parsing)."""
    out: list[str] = []
    i, n = 0, len(args_text)
    while i < n:
        c = args_text[i]
        if c in "'\"":
            quote = args_text[i : i + 3] if args_text[i : i + 3] == c * 3 else c
            j = i + len(quote)
            while j < n and not args_text.startswith(quote, j):
                j += 2 if args_text[j] == "\\" else 1
            out.append(args_text[i : j + len(quote)])
            i = j + len(quote)
        elif c == "$":
            m = STEP_REF.match(args_text, i)
            if m is None:
                raise ParseFailure(f"a '$' not followed by a step number in {args_text[:60]!r}")
            out.append(f"__step_{m.group(1) or m.group(2)}")
            i = m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def arguments_for(tool: ToolInfo, step: BoundStep) -> str:
    """The step's arguments as the JSON object the tool takes: positional
    arguments fill the tool's parameters in schema order, keywords by name."""
    properties = list((tool.parameters or {}).get("properties", {}))
    if len(step.args) > len(properties):
        raise ParseFailure(
            f"{tool.name} takes {len(properties)} argument(s) "
            f"({', '.join(properties) or 'none'}); the step gives {len(step.args)}"
        )
    arguments = dict(zip(properties, step.args, strict=False))
    for key, val in step.kwargs.items():
        if key in arguments:
            raise ParseFailure(f"{tool.name}: argument {key!r} given twice")
        arguments[key] = val
    # A parameter that takes a list gets a lone value as a list of one
    # (`search("x")` for a tool whose `queries` is an array).
    for key, val in arguments.items():
        schema = tool.parameters.get("properties", {}).get(key, {})
        if schema.get("type") == "array" and not isinstance(val, list):
            arguments[key] = [val]
    return json.dumps(arguments)


def summary(steps: dict[int, tuple[str, str]]) -> str:
    """What the model reads back: each step with its output."""
    return "\n".join(f"${n} = {text}\n→ {output}" for n, (text, output) in sorted(steps.items()))


# ---- running a plan ---------------------------------------------------------


@dataclass
class _Plan:
    """A plan call's steps: each one's (ok, output), as it ends, and its text."""

    results: dict[int, asyncio.Future] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)
    tool_steps: int = 0  # steps other than join(): a plan without any is a final answer


class PlanRunner:
    """Runs the plan calls of a run: the call table sends it a plan's steps
    as units, and each step runs as a call of its tool in the same table."""

    def __init__(
        self,
        table: CallTable,
        emit: Callable[[RunEvent], None],
        spawn: Callable[[Coroutine], None],
    ):
        self._table = table
        self._emit = emit
        self._spawn = spawn
        self._plans: dict[str, _Plan] = {}

    def start(self, call: Call) -> None:
        """A plan call opened: its steps come in as its units."""
        self._plans[call.call_id] = _Plan()
        self._table.started(call, PLAN_TOOL, self)
        call.parser = parser_for(PLAN_TOOL.partial_mode)

    # CallTarget: where the table sends a plan call's units.

    def unit(self, call: Call, unit: ParsedUnit) -> None:
        plan = self._plans[call.call_id]
        n = int(unit.field)
        plan.results[n] = asyncio.get_running_loop().create_future()
        plan.texts[n] = unit.text
        if not unit.text.lstrip().startswith(JOIN + "("):
            plan.tool_steps += 1
        self._spawn(self._run_step(call, plan, n, unit))

    def close(self, call: Call, full_text: str) -> None:
        plan = self._plans[call.call_id]
        call.final_answer = not plan.tool_steps
        self._spawn(self._finish(call, plan))

    def cancel(self, call: Call, reason: str) -> None:
        pass  # its steps are calls of their own, cancelled as such

    async def _run_step(self, call: Call, plan: _Plan, n: int, unit: ParsedUnit) -> None:
        """Waits for the steps this one names, then runs it as a call of its tool."""
        result = plan.results[n]
        try:
            inputs = {}
            for d in unit.depends_on:
                dep = plan.results.get(d)
                if dep is None:
                    raise ParseFailure(f"step ${n} uses ${d}, which the plan has not defined")
                ok, output = await dep
                if not ok:
                    raise ParseFailure(f"step ${n} needs ${d}, which failed")
                inputs[d] = output
            step = bind(unit.text, inputs)
            if step.tool == JOIN:
                result.set_result((True, ""))
                return
            tool = self._table.tools.get(step.tool)
            if tool is None:
                known = ", ".join(sorted(self._table.tools)) or "none"
                raise ParseFailure(f"step ${n}: unknown tool {step.tool!r}; available: {known}")
            result.set_result(await self._step_call(call, n, tool, arguments_for(tool, step)))
        except ParseFailure as e:
            result.set_result((False, str(e)))

    async def _step_call(self, plan: Call, n: int, tool: ToolInfo, arguments: str):
        table = self._table
        call = table.new_call(f"{plan.call_id}.{n}", plan.round, plan.envelope, step=True)
        # A session of its own: independent steps of one tool run in parallel
        # (a shared interpreter would run them one after another).
        table.start_tool_call(call, tool, session_key="")
        parser = arguments_parser_for(tool.partial_mode, tool.command_field)
        call.parser, call.text = parser, [arguments]
        try:
            units = parser.feed(arguments) + parser.finish()
            for unit in units:
                check_unit(tool.partial_mode, unit.text)
        except ParseFailure as e:
            table.parse_failed(call, str(e))
        else:
            for unit in units:
                table.dispatch(call, unit, time.perf_counter())
            table.close(call)
        outcome = await call.outcome
        if isinstance(outcome, ParseError):
            return False, f"error: {outcome.message}"
        if outcome.error_code:
            return False, f"error ({outcome.error_code}): {outcome.error_message}"
        return outcome.ok, outcome.output

    async def _finish(self, call: Call, plan: _Plan) -> None:
        """The plan is complete and its steps dispatched: its outcome, once
        every step has ended, is what the model reads back."""
        results = [await plan.results[n] for n in sorted(plan.results)]
        outputs = {
            n: (plan.texts[n], output)
            for n, (_, output) in zip(sorted(plan.results), results, strict=True)
        }
        outcome = CallOutcome(
            call.call_id,
            all(ok for ok, _ in results),
            output=summary(outputs),
            units_executed=len(results),
        )
        self._emit(outcome)
        if not call.outcome.done():
            call.outcome.set_result(outcome)
