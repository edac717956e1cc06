"""The `calculator` tool: values and refusals of `evaluate`, its guards against
expressions that would run for ever, and the tool through the gateway's gRPC
API with units made by the scheduler's own LINES parser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conveyor.v1 import common_pb2, tool_gateway_pb2, tool_gateway_pb2_grpc

from conveyor_common.server import stop_server
from scheduler.parsers import arguments_parser_for
from tests.test_gateway import Stream, last, results
from tool_gateway.config import GatewayConfig
from tool_gateway.registry import ToolRegistry
from tool_gateway.server import create_server
from tool_gateway.tools.base import Unit
from tool_gateway.tools.calculator_tool import (
    MAX_DIGITS,
    CalculatorError,
    CalculatorTool,
    evaluate,
    format_value,
)

pb = tool_gateway_pb2
REPO = Path(__file__).resolve().parent.parent


def calc(expression: str) -> str:
    return format_value(evaluate(expression))


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("-2 ** 2", "-4"),  # ** binds tighter than unary minus
        ("2 ** 3 ** 2", "512"),  # and to the right
        ("(2 ** 3) ** 2", "64"),
        ("10 - 4 - 3", "3"),  # - to the left
        ("2 ** 64 - 1", "18446744073709551615"),  # ints stay exact
        ("2 ** 200 // 3 ** 50", str(2**200 // 3**50)),
        ("-7 % 3", "2"),
        ("7 / 2", "3.5"),
        ("10 / 5", "2.0"),
        ("0.1 + 0.2", "0.30000000000000004"),
        ("1e308 * 10", "inf"),
        ("sqrt(16) + log10(1000)", "7.0"),
        ("log(8, 2)", "3.0"),
        ("log2(1024) + log(e)", "11.0"),
        ("exp(0) + sin(0) + cos(0) + tan(0)", "2.0"),
        ("degrees(atan2(1, 1))", "45.0"),
        ("degrees(asin(1)) + degrees(acos(1)) + atan(0)", "90.0"),
        ("radians(180) == pi", "True"),
        ("tau / 2 == pi", "True"),
        ("floor(-2.5) + ceil(2.5) + fabs(-1)", "1.0"),
        ("factorial(25)", "15511210043330985984000000"),
        ("gcd(84, 36)", "12"),
        ("hypot(3, 4)", "5.0"),
        ("abs(-3) + round(2.5) + round(3.14159, 2)", "8.14"),
        ("min(3, 1, 2) + max(3, 1, 2)", "4"),
        ("1 < 2 <= 2 < 3", "True"),
        ("1 < 2 > 3", "False"),
        ("-inf < 0 != 1", "True"),
        ("  2 + 2  # a comment", "4"),
        ("+".join(["1"] * 900), "900"),  # a long sum is no deep nesting
    ],
)
def test_values(expression, value):
    assert calc(expression) == value


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("1 / 0", "ZeroDivisionError: division by zero"),
        ("1 // 0", "ZeroDivisionError: division by zero"),
        ("1.5 / 0", "ZeroDivisionError: division by zero"),
        ("5 % 0", "ZeroDivisionError: modulo by zero"),
        ("sqrt(-1)", "ValueError: sqrt(): math domain error"),
        ("factorial(-1)", "ValueError: factorial() not defined for negative values"),
        ("exp(1000)", "OverflowError: math range error"),
        ("2.0 ** 5000", "OverflowError: the result is too large for a float"),
        ("(-8) ** (1 / 3)", "ValueError: the result is not a real number"),
        ("__import__('os')", "NameError: unknown function '__import__'; the functions are abs,"),
        ("os.system('ls')", "NotAllowed: attribute access (.system)"),
        ("(1).real", "NotAllowed: attribute access (.real)"),
        ("math.sqrt(4)", "NotAllowed: attribute access (.sqrt)"),
        ("lambda: 1", "NotAllowed: lambda"),
        ("(lambda: 1)()", "NotAllowed: calling anything but a function by its name"),
        ("'a' * 3", "NotAllowed: str values such as 'a'"),
        ("x + 1", "NameError: unknown name 'x'; the names defined are pi, e, tau, inf"),
        ("[1, 2]", "NotAllowed: lists"),
        ("().__class__", "NotAllowed: attribute access (.__class__)"),
        ("[c for c in ()]", "NotAllowed: comprehensions"),
        ("2 ^ 3", "NotAllowed: the operator ^ (for powers write **)"),
        ("1 << 10", "NotAllowed: the operator <<"),
        ("1 if 1 else 2", "NotAllowed: if-else expressions"),
        ("(y := 2)", "NotAllowed: assignment (:=)"),
        ("True + 1", "NotAllowed: bool values such as True"),
        ("2j", "NotAllowed: complex numbers are not supported"),
        ("round(2.5, ndigits=1)", "NotAllowed: keyword arguments (in round())"),
        ("min(*[1, 2])", "NotAllowed: unpacking (*)"),
        ("min(2)", "TypeError: min() takes two or more numbers"),
        ("1 +", "SyntaxError: invalid syntax"),
        ("import os", "SyntaxError: invalid syntax"),
        ("(1 + 2", "SyntaxError: '(' was never closed"),
    ],
)
def test_refusals_and_errors_are_clear(expression, message):
    with pytest.raises(CalculatorError) as error:
        evaluate(expression)
    assert str(error.value).startswith(message)


def test_size_limits():
    assert len(calc(f"10 ** {MAX_DIGITS - 1}")) == MAX_DIGITS  # the largest allowed
    for too_large in (
        f"10 ** {MAX_DIGITS}",
        f"10 ** {MAX_DIGITS - 1} * 10",
        f"10 ** {MAX_DIGITS - 1} + 9 * 10 ** {MAX_DIGITS - 1}",
    ):
        with pytest.raises(CalculatorError, match="^OverflowError: .*limit is 4300 digits"):
            evaluate(too_large)
    with pytest.raises(CalculatorError, match="nested more than 100 levels"):
        evaluate("-" * 150 + "1")
    with pytest.raises(CalculatorError, match="has 2001 characters; the limit is 2000"):
        evaluate("1" + " " * 2000)


# Each of these would run for minutes or fill memory if it were computed.
DENIAL_OF_SERVICE = [
    ("2**10**10", "2 ** 10000000000 would have about 3.01e+09 digits"),
    ("9**9**9**9", "9 ** 387420489 would have about 3.7e+08 digits"),
    ("(-3)**(10**12)", "-3 ** 1000000000000 would have about 4.77e+11 digits"),
    ("(10**4000)*(10**4000)", "the product has too many digits"),
    ("factorial(10**6)", "factorial() takes numbers up to 1000, not 1000000"),
    ("factorial(factorial(20))", "factorial() takes numbers up to 1000"),
    ("round(1, -10**9)", "round() takes at most 4300 digits, not -1000000000"),
    ("2.0**(10**400)", "int too large to convert to float"),
]


def test_huge_results_are_refused_at_once():
    """In a child process, so that a broken guard fails this test (on the
    hang guard) instead of freezing the test run."""
    script = (
        "import json, sys, time\n"
        "from tool_gateway.tools.calculator_tool import CalculatorError, evaluate\n"
        "out = []\n"
        "for expression in json.loads(sys.argv[1]):\n"
        "    started = time.perf_counter()\n"
        "    try:\n"
        "        evaluate(expression)\n"
        "        out.append([expression, 'no error', 0.0])\n"
        "    except CalculatorError as e:\n"
        "        out.append([expression, str(e), time.perf_counter() - started])\n"
        "print(json.dumps(out))\n"
    )
    expressions = [expression for expression, _ in DENIAL_OF_SERVICE]
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(expressions)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,  # a hang guard only
        check=True,
    )
    outcomes = json.loads(done.stdout)
    for (expression, message, seconds), (_, expected) in zip(
        outcomes, DENIAL_OF_SERVICE, strict=True
    ):
        assert message.startswith("OverflowError: ") and expected in message, expression
        assert seconds < 2.0, expression  # generous: a hang guard, not a speed test


async def test_the_session_evaluates_each_line_and_skips_comments():
    session = await CalculatorTool().open_session("")
    texts = ["6 * 7", "# just a note", "1/0", "2 ** 0.5"]
    outcomes = [await session.run_unit(Unit(i, text)) for i, text in enumerate(texts)]
    assert [(o.ok, o.value) for o in outcomes] == [
        (True, "42"),
        (True, ""),
        (False, ""),
        (True, "1.4142135623730951"),
    ]
    assert outcomes[2].exception == "ZeroDivisionError: division by zero"
    # The expressions are taken from the full text when they line up with the units.
    full_text = json.dumps({"expression": "\n".join(texts) + "\n"})
    assert await session.finish(full_text, outcomes) == (
        "6 * 7 = 42\n1/0: ZeroDivisionError: division by zero\n2 ** 0.5 = 1.4142135623730951"
    )
    assert await session.finish("6 * 7\n\n# just a note\n1/0\r\n2 ** 0.5", outcomes) == (
        "6 * 7 = 42\n1/0: ZeroDivisionError: division by zero\n2 ** 0.5 = 1.4142135623730951"
    )
    # Otherwise the results alone, in order.
    assert await session.finish("", outcomes) == (
        "42\nZeroDivisionError: division by zero\n1.4142135623730951"
    )


# ---- through the gateway ------------------------------------------------------


@pytest.fixture(scope="module")
async def gateway_port():
    server, port = await create_server(
        GatewayConfig(), "127.0.0.1", 0, registry=ToolRegistry([CalculatorTool()])
    )
    yield port
    await stop_server(server, 0)


@pytest.fixture
async def stub(gateway_port):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port}") as channel:
        yield tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)


async def test_calculator_is_listed_as_a_lines_tool(stub):
    tools = {
        t.name: t
        for t in (await stub.ListTools(pb.ToolGatewayServiceListToolsRequest(), timeout=5)).tools
    }
    spec = tools["calculator"]
    assert spec.partial_mode == common_pb2.PARTIAL_MODE_LINES
    assert spec.partial_safe and spec.command_field == "expression"
    assert json.loads(spec.parameters_json_schema)["required"] == ["expression"]


async def test_each_line_is_a_unit_and_a_failed_line_does_not_stop_the_next(stub):
    expression = "2**64 - 1\n0.1 + 0.2\n1/0\n__import__('os')\n10**5000\nsqrt(16) * (1 + 2)\n"
    arguments = json.dumps({"expression": expression})
    parser = arguments_parser_for("LINES", "expression")
    units = []
    for ch in arguments:  # streamed a character at a time, as a model writes it
        units += parser.feed(ch)
    units += parser.finish()
    assert [u.text for u in units] == expression.splitlines()
    stream = Stream(stub)
    stream.open("a", tool="calculator")
    for u in units:
        stream.send("a", unit=pb.CommandUnit(index=u.index, text=u.text, field=u.field))
    stream.send("a", close=pb.CloseCall(full_text=arguments, unit_count=len(units)))
    events = await stream.wait("a")
    big, point, zero, sneaky, huge, after = results(events)
    assert (big.ok, big.value) == (True, "18446744073709551615")
    assert (point.ok, point.value) == (True, "0.30000000000000004")
    assert not zero.ok and zero.exception == "ZeroDivisionError: division by zero"
    assert not sneaky.ok and sneaky.exception.startswith("NameError: unknown function '__import__'")
    assert not huge.ok and huge.exception.startswith("OverflowError: 10 ** 5000 would have")
    assert (after.ok, after.value) == (True, "12.0")
    end = last(events).call_result
    assert not end.ok and end.units_executed == 6  # a line failed
    assert end.output.splitlines()[0] == "2**64 - 1 = 18446744073709551615"
    assert end.output.splitlines()[2] == "1/0: ZeroDivisionError: division by zero"
    assert end.output.splitlines()[-1] == "sqrt(16) * (1 + 2) = 12.0"
    stream.open("b", tool="calculator")
    stream.units("b", "6 * 7")
    stream.close("b", 1)
    result = last(await stream.wait("b")).call_result
    assert result.ok and result.output == "42"  # no full text: the value alone
    await stream.end()
