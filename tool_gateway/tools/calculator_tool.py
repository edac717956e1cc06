"""The `calculator` tool: safe arithmetic, one expression per line.

Each line of the `expression` argument is one unit (PARTIAL_MODE_LINES, the
argument streamed into the lines parser), evaluated the moment its line is
complete. Nothing is run with eval or exec: a line is parsed with
`ast.parse(mode="eval")` and the tree is walked by `evaluate`, which knows only
- numbers (int and float literals; integers stay exact, `/` gives a float);
- `+ - * / // % **`, unary `+ -`, parentheses and comparisons
  (`< <= > >= == !=`, chains included, giving True or False);
- the names `pi`, `e`, `tau`, `inf`;
- calls, with positional arguments only, of `abs round min max` and these
  `math` functions: sqrt log log10 log2 exp sin cos tan asin acos atan atan2
  floor ceil fabs factorial gcd hypot degrees radians.
Anything else (other names, attributes, subscripts, lambdas, strings...) is
refused with a message that says what is not allowed. An expression cannot
span lines. A line holding only a comment is no expression (ok, no value).

What keeps a line from running for long or eating memory: a line has at most
MAX_EXPRESSION_CHARS characters and MAX_DEPTH levels of nesting; an integer
result may have at most MAX_DIGITS digits, which is checked before computing
(`**` by logarithms, `*` by bit lengths, `factorial` by its argument, `round`
by its digits), so `2**10**10` is refused at once instead of filling memory.
Float arithmetic follows IEEE rules (`1e308 * 10` is `inf`); a float power or
a math function that overflows is reported as an OverflowError.

A unit's outcome has the result in `value` (`repr` of the number: `4`,
`0.30000000000000004`), or ok=False and the error in `exception`, e.g.
`ZeroDivisionError: division by zero`. A failed line does not stop the next
one. The session is stateless, so calls may share it.
"""

from __future__ import annotations

import ast
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from tool_gateway.tools.base import (
    PartialMode,
    Tool,
    ToolSession,
    ToolSpec,
    Unit,
    UnitOutcome,
)

MAX_EXPRESSION_CHARS = 2000
MAX_DEPTH = 100  # levels of nesting: calls, signs, bracketed operations (a+b+c+... is one)
MAX_DIGITS = 4300  # Python's own limit for printing an int (sys.get_int_max_str_digits)
MAX_BITS = int(MAX_DIGITS * math.log2(10))  # an int this wide has at most MAX_DIGITS digits
MAX_FACTORIAL = 1000  # 1000! has 2568 digits

Number = int | float | bool


class CalculatorError(Exception):
    """A line the calculator will not or cannot evaluate; str() is the message
    for the model, starting with the kind of error."""


def _refuse(what: str) -> CalculatorError:
    return CalculatorError(f"NotAllowed: {what}; only arithmetic on numbers is")


def _too_large(what: str) -> CalculatorError:
    return CalculatorError(f"OverflowError: {what}; the limit is {MAX_DIGITS} digits")


def _checked(value: Any) -> Number:
    """A result, once it is known to be a real number of allowed size."""
    if isinstance(value, complex):
        raise CalculatorError("ValueError: the result is not a real number")
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise _too_large("the result has too many digits")
    return value


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1:
        digits = exponent * math.log10(abs(base))
        if digits > MAX_DIGITS:
            raise _too_large(
                f"{_clip(base)} ** {_clip(exponent)} would have about {digits:.3g} digits"
            )
    return _checked(base**exponent)


def _multiply(left: Number, right: Number) -> Number:
    if isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_BITS + 1:
            raise _too_large("the product has too many digits")
    return _checked(left * right)


def _factorial(n: Number) -> int:
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if not isinstance(n, int) or isinstance(n, bool):
        raise CalculatorError("ValueError: factorial() takes a whole number")
    if n > MAX_FACTORIAL:
        raise CalculatorError(
            f"OverflowError: factorial() takes numbers up to {MAX_FACTORIAL}, not {_clip(n)}"
        )
    return math.factorial(n)


def _round(number: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return round(number)
    if not isinstance(ndigits, int) or isinstance(ndigits, bool):
        raise CalculatorError("TypeError: round()'s second argument must be a whole number")
    if abs(ndigits) > MAX_DIGITS:
        raise CalculatorError(
            f"OverflowError: round() takes at most {MAX_DIGITS} digits, not {_clip(ndigits)}"
        )
    return round(number, ndigits)


def _at_least_two(name: str, pick: Callable) -> Callable:
    def call(*args: Number) -> Number:
        if len(args) < 2:
            raise CalculatorError(f"TypeError: {name}() takes two or more numbers")
        return pick(args)

    return call


_FUNCTIONS: dict[str, Callable] = {
    name: getattr(math, name)
    for name in (
        "sqrt log log10 log2 exp sin cos tan asin acos atan atan2 floor ceil fabs gcd hypot "
        "degrees radians"
    ).split()
}
_FUNCTIONS |= {
    "factorial": _factorial,
    "abs": abs,
    "round": _round,
    "min": _at_least_two("min", min),
    "max": _at_least_two("max", max),
}
_CONSTANTS = {"pi": math.pi, "e": math.e, "tau": math.tau, "inf": math.inf}
_BINARY: dict[type[ast.operator], Callable[[Number, Number], Number]] = {
    ast.Add: lambda a, b: _checked(a + b),
    ast.Sub: lambda a, b: _checked(a - b),
    ast.Mult: _multiply,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: _power,
}
_COMPARE: dict[type[ast.cmpop], Callable[[Number, Number], bool]] = {
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
}
_NODE_NAMES = {
    ast.Attribute: "attribute access",
    ast.Subscript: "indexing",
    ast.Lambda: "lambda",
    ast.NamedExpr: "assignment (:=)",
    ast.IfExp: "if-else expressions",
    ast.BoolOp: "and/or",
    ast.List: "lists",
    ast.Tuple: "tuples",
    ast.Set: "sets",
    ast.Dict: "dicts",
    ast.ListComp: "comprehensions",
    ast.SetComp: "comprehensions",
    ast.DictComp: "comprehensions",
    ast.GeneratorExp: "comprehensions",
    ast.JoinedStr: "strings",
    ast.Starred: "unpacking (*)",
    ast.Await: "await",
    ast.Yield: "yield",
    ast.YieldFrom: "yield",
}
_OPERATOR_NAMES = {
    ast.MatMult: "@",
    ast.LShift: "<<",
    ast.RShift: ">>",
    ast.BitOr: "|",
    ast.BitXor: "^ (for powers write **)",
    ast.BitAnd: "&",
    ast.Invert: "~",
    ast.Not: "not",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}


def evaluate(expression: str) -> Number:
    """The value of one arithmetic expression; raises CalculatorError."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(
            f"NotAllowed: the expression has {len(expression)} characters; "
            f"the limit is {MAX_EXPRESSION_CHARS}"
        )
    try:
        with warnings.catch_warnings():  # "5(2)" warns "not callable" on stderr
            warnings.simplefilter("ignore")
            tree = ast.parse(expression.strip(), "<expression>", mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"SyntaxError: {e.msg}") from None
    except (ValueError, MemoryError, RecursionError) as e:  # a NUL byte, absurd nesting
        raise CalculatorError(f"SyntaxError: {e}") from None
    _check_depth(tree)
    try:
        return _eval(tree.body)
    except CalculatorError:
        raise
    except ZeroDivisionError as e:
        message = str(e)
        if message in ("integer division or modulo by zero", "float division by zero"):
            message = "division by zero"
        elif message in ("float modulo", "float divmod()", "integer modulo by zero"):
            message = "modulo by zero"
        raise CalculatorError(f"ZeroDivisionError: {message}") from None
    except OverflowError as e:
        message = str(e)
        if message.startswith("("):  # (34, 'Numerical result out of range')
            message = "the result is too large for a float"
        raise CalculatorError(f"OverflowError: {message}") from None
    except (ArithmeticError, ValueError, TypeError) as e:
        raise CalculatorError(f"{type(e).__name__}: {e}") from None
    except RecursionError:
        raise CalculatorError("NotAllowed: the expression is nested too deeply") from None


def _check_depth(tree: ast.AST) -> None:
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise CalculatorError(
                f"NotAllowed: the expression is nested more than {MAX_DEPTH} levels deep"
            )
        if isinstance(node, ast.BinOp):  # its left side is walked in a loop
            stack += [(node.left, depth), (node.right, depth + 1)]
        else:
            stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float):
            if isinstance(value, complex):
                raise CalculatorError("NotAllowed: complex numbers are not supported")
            raise _refuse(f"{type(value).__name__} values such as {_clip(value)}")
        return value
    if isinstance(node, ast.BinOp):
        # A chain a + b - c ... nests down its left side: walked in a loop, so a
        # long sum needs no recursion (and counts as one level, see _check_depth).
        chain: list[ast.BinOp] = []
        while isinstance(node, ast.BinOp):
            chain.append(node)
            node = node.left
        value = _eval(node)
        for link in reversed(chain):
            op = _BINARY.get(type(link.op))
            if op is None:
                raise _refuse(f"the operator {_OPERATOR_NAMES.get(type(link.op), '?')}")
            value = op(value, _eval(link.right))
        return value
    if isinstance(node, ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return -_eval(node.operand)
        if isinstance(node.op, ast.UAdd):
            return +_eval(node.operand)
        raise _refuse(f"the operator {_OPERATOR_NAMES.get(type(node.op), '?')}")
    if isinstance(node, ast.Compare):
        left = _eval(node.left)
        for op_node, right_node in zip(node.ops, node.comparators, strict=True):
            op = _COMPARE.get(type(op_node))
            if op is None:
                raise _refuse(f"the operator {_OPERATOR_NAMES.get(type(op_node), '?')}")
            right = _eval(right_node)
            if not op(left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Name):
        if node.id in _CONSTANTS:
            return _CONSTANTS[node.id]
        raise CalculatorError(
            f"NameError: unknown name {node.id!r}; the names defined are {', '.join(_CONSTANTS)}"
        )
    if isinstance(node, ast.Call):
        return _call(node)
    if isinstance(node, ast.Attribute):
        raise _refuse(f"attribute access (.{node.attr})")
    raise _refuse(_NODE_NAMES.get(type(node), type(node).__name__))


def _call(node: ast.Call) -> Number:
    if not isinstance(node.func, ast.Name):
        if isinstance(node.func, ast.Attribute):
            raise _refuse(f"attribute access (.{node.func.attr})")
        raise _refuse("calling anything but a function by its name")
    name = node.func.id
    function = _FUNCTIONS.get(name)
    if function is None:
        raise CalculatorError(
            f"NameError: unknown function {name!r}; the functions are "
            f"{', '.join(sorted(_FUNCTIONS))}"
        )
    if node.keywords:
        raise _refuse(f"keyword arguments (in {name}())")
    args = [_eval(arg) for arg in node.args]  # a Starred argument is refused here
    try:
        return _checked(function(*args))
    except (ValueError, TypeError) as e:
        message = str(e).replace(f"_{name}(", f"{name}(")  # our wrappers' own names
        message = message if f"{name}(" in message else f"{name}(): {message}"
        raise CalculatorError(f"{type(e).__name__}: {message}") from None


def _clip(value: Any, limit: int = 40) -> str:
    if isinstance(value, int) and value.bit_length() > 128:
        return f"<an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits>"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_value(value: Number) -> str:
    """The result as the model reads it: repr of the number."""
    try:
        return repr(value)
    except ValueError as e:  # an int past the interpreter's printing limit
        raise CalculatorError(f"OverflowError: {e}") from None


SPEC = ToolSpec(
    name="calculator",
    description=(
        "Evaluates arithmetic exactly and safely. Write one expression per line; each line is "
        "evaluated on its own as soon as it is written. Supports + - * / // % ** and "
        "parentheses, comparisons, the constants pi, e, tau and inf, and the functions "
        "sqrt, log (natural, or log(x, base)), log10, log2, exp, sin, cos, tan, asin, acos, "
        "atan, atan2, floor, ceil, fabs, factorial, gcd, hypot, degrees, radians, abs, round, "
        "min and max. Integers are exact; angles are in radians."
    ),
    parameters={
        "type": "object",
        "properties": {
            "expression": {
                "type": "string",
                "description": "One or more arithmetic expressions, one per line, e.g. "
                '"2**64 - 1\\nsqrt(2) * 10".',
            }
        },
        "required": ["expression"],
    },
    partial_mode=PartialMode.LINES,
    partial_safe=True,
    command_field="expression",
)


class CalculatorTool(Tool):
    spec = SPEC

    async def open_session(self, session_key: str) -> CalculatorSession:
        return CalculatorSession()


class CalculatorSession(ToolSession):
    """Stateless: each line is evaluated on its own, so calls may share it."""

    async def run_unit(self, unit: Unit) -> UnitOutcome:
        started = time.perf_counter()
        text = unit.text.strip()
        if not text or text.startswith("#"):
            return UnitOutcome(unit.index, ok=True)  # a comment: nothing to evaluate
        try:
            value = format_value(evaluate(text))
        except CalculatorError as e:
            return UnitOutcome(
                unit.index,
                ok=False,
                exception=str(e),
                duration_seconds=time.perf_counter() - started,
            )
        return UnitOutcome(
            unit.index, ok=True, value=value, duration_seconds=time.perf_counter() - started
        )

    async def finish(self, full_text: str, outcomes: Sequence[UnitOutcome]) -> str:
        """One line per expression: `expression = value`, or `expression:
        error`. The expressions are recovered from the call's full text (the
        arguments object, or the lines themselves) when they line up with the
        units; otherwise the results are listed alone, in order."""
        lines = _expression_lines(full_text)
        if len(lines) != len(outcomes):
            lines = [""] * len(outcomes)
        parts = []
        for line, outcome in zip(lines, outcomes, strict=True):
            line = line.strip()
            if outcome.ok and not outcome.value:
                continue  # a comment
            if outcome.ok:
                parts.append(f"{line} = {outcome.value}" if line else outcome.value)
            else:
                parts.append(f"{line}: {outcome.exception}" if line else outcome.exception)
        return "\n".join(parts) if parts else "(no expression)"

    async def cancel(self) -> None:
        pass

    async def close(self) -> None:
        pass


def _expression_lines(full_text: str) -> list[str]:
    """The lines the LINES parser makes units of (those not blank)."""
    text = full_text
    try:
        arguments = json.loads(full_text)
    except ValueError:
        pass
    else:
        if isinstance(arguments, dict) and isinstance(arguments.get("expression"), str):
            text = arguments["expression"]
    return [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
