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
import json
from dataclasses import dataclass

from conveyor_common.types import Envelope, PartialMode
from scheduler.envelopes import CallClosed, CallOpened, CallText, ScanEvent
from scheduler.parsers import ParseFailure
from scheduler.parsers.plan_steps import STEP_REF, split_call
from scheduler.tools import ToolInfo

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
