"""The `validate` tools: book_flight through the gateway's gRPC API (units made
by the scheduler's own JSON_FIELDS parser), and ValidateTool's checks directly."""

from __future__ import annotations

import json
from datetime import date

import grpc
import jsonschema
import pytest
from conveyor.v1 import common_pb2, tool_gateway_pb2, tool_gateway_pb2_grpc

from conveyor_common.server import stop_server
from scheduler.parsers import ParseFailure, arguments_parser_for
from tests.test_gateway import Stream, last, results
from tool_gateway.config import GatewayConfig
from tool_gateway.registry import ToolRegistry
from tool_gateway.server import create_server
from tool_gateway.tools.base import PartialMode, ToolErrorCode, ToolFailure, Unit
from tool_gateway.tools.validate_tool import ValidateTool, book_flight_tool

pb = tool_gateway_pb2
TODAY = date(2026, 3, 1)
VALID = {
    "origin": "JFK",
    "destination": "LHR",
    "departure_date": "2026-04-01",
    "return_date": "2026-04-10",
    "passengers": 2,
    "cabin": "business",
    "passenger_names": ["Ada Lovelace", "Alan Turing"],
}


@pytest.fixture(scope="module")
def book_flight() -> ValidateTool:
    return book_flight_tool(today=lambda: TODAY)  # the real airportsdata list


@pytest.fixture(scope="module")
async def gateway_port(book_flight):
    server, port = await create_server(
        GatewayConfig(), "127.0.0.1", 0, registry=ToolRegistry([book_flight])
    )
    yield port
    await stop_server(server, 0)


@pytest.fixture
async def stub(gateway_port):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway_port}") as channel:
        yield tool_gateway_pb2_grpc.ToolGatewayServiceStub(channel)


def field_units(arguments: dict | str) -> list[tuple[str, str]]:
    """(field, raw JSON) of each unit, as the scheduler's parser makes them
    from the arguments streamed one character at a time."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    parser = arguments_parser_for("JSON_FIELDS")
    units = []
    for ch in text:
        units += parser.feed(ch)
    units += parser.finish()
    assert [u.index for u in units] == list(range(len(units)))
    return [(u.field, u.text) for u in units]


def send_fields(stream: Stream, call_id: str, fields: list[tuple[str, str]]) -> None:
    for i, (field, text) in enumerate(fields):
        stream.send(call_id, unit=pb.CommandUnit(index=i, text=text, field=field))


async def call(stream: Stream, call_id: str, arguments: dict, session_key: str = ""):
    fields = field_units(arguments)
    stream.open(call_id, tool="book_flight", session_key=session_key)
    send_fields(stream, call_id, fields)
    stream.close(call_id, len(fields))
    return await stream.wait(call_id)


def kinds(events) -> list[str]:
    return [e.WhichOneof("event") for e in events]


# ---- through the gateway ------------------------------------------------------


async def test_book_flight_is_listed_as_a_json_fields_tool(stub):
    tools = {
        t.name: t
        for t in (await stub.ListTools(pb.ToolGatewayServiceListToolsRequest(), timeout=5)).tools
    }
    spec = tools["book_flight"]
    assert spec.partial_mode == common_pb2.PARTIAL_MODE_JSON_FIELDS and spec.partial_safe
    schema = json.loads(spec.parameters_json_schema)
    assert schema["additionalProperties"] is False
    assert "passenger_names" in schema["required"]


async def test_a_valid_call_passes_every_unit(stub):
    # Array elements are units of their own, before the array field itself.
    fields = [field for field, _ in field_units(VALID)]
    assert fields == [
        "origin",
        "destination",
        "departure_date",
        "return_date",
        "passengers",
        "cabin",
        "passenger_names[0]",
        "passenger_names[1]",
        "passenger_names",
    ]
    stream = Stream(stub)
    events = await call(stream, "a", VALID)
    assert "abort_verdict" not in kinds(events)
    units = results(events)
    assert [u.index for u in units] == list(range(9))
    assert all(u.ok and u.value == "ok" and not u.exception for u in units)
    end = last(events).call_result
    assert end.ok and end.units_executed == 9
    assert end.output.startswith("book_flight: all 7 arguments are valid")
    await stream.end()


async def test_an_unknown_airport_first_aborts_and_later_units_are_dropped(stub):
    stream = Stream(stub)
    fields = field_units(dict(VALID, origin="XYZ"))
    stream.open("a", tool="book_flight")
    send_fields(stream, "a", fields[:3])  # units on their way before the verdict
    events = await stream.wait("a")
    for i, (field, text) in enumerate(fields[3:], 3):  # and units after it
        stream.send("a", unit=pb.CommandUnit(index=i, text=text, field=field))
    stream.close("a", len(fields))
    assert kinds(events) == ["unit_started", "unit_result", "abort_verdict", "call_result"]
    verdict = events[2].abort_verdict
    assert verdict.field == "origin" and verdict.unit_index == 0
    assert verdict.reason == 'origin "XYZ" is not a known IATA airport code'
    assert not events[1].unit_result.ok and "XYZ" in events[1].unit_result.exception
    end = last(events).call_result
    assert not end.ok and end.units_executed == 1
    assert end.output == "aborted (argument 'origin'): " + verdict.reason
    # The stream goes on; once it has ended, the doomed call still has no more events.
    assert last(await call(stream, "b", VALID)).call_result.ok
    await stream.end()
    assert kinds(stream.events["a"]) == kinds(events)


async def test_a_blank_passenger_name_aborts_at_that_element(stub):
    stream = Stream(stub)
    events = await call(stream, "a", dict(VALID, passenger_names=["Ada Lovelace", ""]))
    verdict = next(e.abort_verdict for e in events if e.WhichOneof("event") == "abort_verdict")
    assert verdict.field == "passenger_names[1]" and verdict.unit_index == 7
    assert verdict.reason == 'passenger_names[1] "" is empty'
    assert [u.ok for u in results(events)] == [True] * 7 + [False]
    assert not last(events).call_result.ok
    await stream.end()


async def test_a_return_before_the_departure_aborts_at_the_return_date(stub):
    stream = Stream(stub)
    events = await call(stream, "a", dict(VALID, return_date="2026-03-20"))
    verdict = next(e.abort_verdict for e in events if e.WhichOneof("event") == "abort_verdict")
    assert verdict.field == "return_date" and verdict.unit_index == 3
    assert verdict.reason == 'return_date "2026-03-20" is before the departure_date 2026-04-01'
    await stream.end()


async def test_a_field_that_is_not_json_aborts(stub):
    stream = Stream(stub)
    stream.open("a", tool="book_flight")
    send_fields(stream, "a", [("origin", '"JFK"'), ("passengers", "2x"), ("cabin", '"first"')])
    stream.close("a", 3)
    events = await stream.wait("a")
    assert kinds(events)[-2:] == ["abort_verdict", "call_result"]
    verdict = events[-2].abort_verdict
    assert verdict.field == "passengers" and verdict.unit_index == 1
    assert verdict.reason.startswith("passengers is not valid JSON") and "2x" in verdict.reason
    assert len(results(events)) == 2
    await stream.end()


async def test_an_unknown_argument_aborts(stub):
    stream = Stream(stub)
    events = await call(stream, "a", {"origin": "JFK", "seat": "12A", "destination": "LHR"})
    verdict = events[-2].abort_verdict
    assert verdict.field == "seat" and verdict.unit_index == 1
    assert verdict.reason.startswith("seat is not an argument of book_flight (it takes: origin,")
    assert len(results(events)) == 2
    await stream.end()


async def test_a_missing_required_argument_fails_the_call_at_its_end(stub):
    stream = Stream(stub)
    events = await call(stream, "a", {"origin": "JFK", "destination": "LHR", "passengers": 1})
    assert all(u.ok for u in results(events)) and "abort_verdict" not in kinds(events)
    error = last(events).error
    assert error.code == common_pb2.TOOL_ERROR_CODE_BAD_REQUEST
    assert error.message == (
        "book_flight: missing required arguments: departure_date, passenger_names"
    )
    await stream.end()


async def test_calls_sharing_a_session_key_do_not_share_arguments(stub):
    stream = Stream(stub)
    # Call a is open with a departure on May 10 when call b, same key, arrives.
    stream.open("a", tool="book_flight", session_key="run")
    send_fields(stream, "a", [("departure_date", '"2026-05-10"')])
    await stream.wait("a", kind="unit_result")
    # b's own departure is March 20: its return on April 1 is valid for b.
    b = dict(VALID, departure_date="2026-03-20", return_date="2026-04-01")
    assert last(await call(stream, "b", b, session_key="run")).call_result.ok
    stream.send("a", unit=pb.CommandUnit(index=1, text='"2026-05-01"', field="return_date"))
    stream.close("a", 2)
    events = await stream.wait("a")
    assert events[-2].abort_verdict.reason == (
        'return_date "2026-05-01" is before the departure_date 2026-05-10'
    )
    await stream.end()


# ---- the session directly ------------------------------------------------------


async def run_fields(tool: ValidateTool, fields: list[tuple[str, str]]):
    """Runs units until the first verdict; returns the outcomes and the session."""
    session = await tool.open_session("")
    outcomes = []
    for i, (field, text) in enumerate(fields):
        outcome = await session.run_unit(Unit(i, text, field))
        outcomes.append(outcome)
        if outcome.verdict is not None:
            break
    return outcomes, session


async def verdict_for(tool: ValidateTool, arguments: dict | str):
    outcomes, _ = await run_fields(tool, field_units(arguments))
    return outcomes[-1].verdict


@pytest.mark.parametrize(
    ("change", "field", "reason"),
    [
        (
            {"departure_date": "2026-13-45"},
            "departure_date",
            'departure_date "2026-13-45" is not a valid date (YYYY-MM-DD)',
        ),
        (
            {"departure_date": "2026-02-28"},
            "departure_date",
            'departure_date "2026-02-28" is in the past (today is 2026-03-01)',
        ),
        ({"passengers": "two"}, "passengers", 'passengers "two" is a string, expected an integer'),
        ({"passengers": 0}, "passengers", "passengers 0 is less than the minimum of 1"),
        ({"passengers": 10}, "passengers", "passengers 10 is more than the maximum of 9"),
        (
            {"passengers": 3},
            "passenger_names",
            'passenger_names ["Ada Lovelace", "Alan Turing"] has 2 names for 3 passengers',
        ),
        (
            {"cabin": "coach"},
            "cabin",
            'cabin "coach" is not one of "economy", "premium_economy", "business", "first"',
        ),
        ({"origin": "jfk"}, "origin", 'origin "jfk" does not match the pattern ^[A-Z]{3}$'),
        (
            {"destination": "JFK"},
            "destination",
            'destination "JFK" is the same airport as the origin',
        ),
        (
            {"passenger_names": ["Ada Lovelace", "   "]},
            "passenger_names[1]",
            'passenger_names[1] "   " is blank: each passenger needs a full name',
        ),
        (
            {"passenger_names": ["Ada Lovelace", 7]},
            "passenger_names[1]",
            "passenger_names[1] 7 is an integer, expected a string",
        ),
    ],
)
async def test_each_argument_gets_a_clear_verdict(book_flight, change, field, reason):
    verdict = await verdict_for(book_flight, dict(VALID, **change))
    assert verdict is not None
    assert (verdict.field, verdict.reason) == (field, reason)


async def test_cross_field_checks_run_on_whichever_field_comes_second(book_flight):
    # The return date written first: the departure after it is caught.
    late = {"return_date": "2026-04-01", "departure_date": "2026-04-05"}
    verdict = await verdict_for(book_flight, late)
    assert verdict.field == "departure_date"
    assert verdict.reason == 'departure_date "2026-04-05" is after the return_date 2026-04-01'
    names_first = {"passenger_names": ["Ada Lovelace"], "passengers": 2}
    verdict = await verdict_for(book_flight, names_first)
    assert verdict.reason == "passengers 2 does not match the 1 passenger_names given"
    same_day = {"departure_date": "2026-04-01", "return_date": "2026-04-01"}
    outcomes, _ = await run_fields(book_flight, field_units(same_day))
    assert all(o.ok for o in outcomes)


async def test_a_field_given_twice_gets_a_verdict(book_flight):
    # The scheduler's parser already refuses a key given twice; a gateway
    # client that sends both units anyway gets the tool's verdict.
    with pytest.raises(ParseFailure, match="duplicate key 'cabin'"):
        field_units('{"cabin": "first", "cabin": "economy"}')
    outcomes, _ = await run_fields(book_flight, [("cabin", '"first"'), ("cabin", '"economy"')])
    verdict = outcomes[-1].verdict
    assert (verdict.field, verdict.reason) == ("cabin", "cabin is given twice")


async def test_the_clock_is_injected_and_read_at_each_check():
    today = [date(2026, 3, 1)]
    tool = book_flight_tool(today=lambda: today[0], airports={"JFK", "LHR"})
    fields = [("departure_date", '"2026-03-01"')]
    assert (await run_fields(tool, fields))[0][0].ok  # today itself is fine
    today[0] = date(2026, 3, 2)
    assert "in the past (today is 2026-03-02)" in (await run_fields(tool, fields))[0][0].exception
    # The injected airport list replaces the real one.
    outcomes, _ = await run_fields(tool, [("origin", '"CDG"')])
    assert outcomes[0].verdict.reason == 'origin "CDG" is not a known IATA airport code'


async def test_finish_summarizes_a_valid_call_and_names_missing_arguments(book_flight):
    outcomes, session = await run_fields(book_flight, field_units(VALID))
    assert await session.finish(json.dumps(VALID), outcomes) == (
        "book_flight: all 7 arguments are valid (origin, destination, departure_date, "
        "return_date, passengers, cabin, passenger_names)"
    )
    outcomes, session = await run_fields(book_flight, field_units({"origin": "JFK"}))
    with pytest.raises(ToolFailure) as failure:
        await session.finish("", outcomes)
    assert failure.value.code == ToolErrorCode.BAD_REQUEST
    assert failure.value.message == (
        "book_flight: missing required arguments: destination, departure_date, passengers, "
        "passenger_names"
    )


async def test_a_session_refuses_a_second_call_mixed_into_the_first(book_flight):
    session = await book_flight.open_session("key")
    assert book_flight.session_per_call  # so the gateway never hands it to another call
    assert (await session.run_unit(Unit(0, '"JFK"', "origin"))).ok
    with pytest.raises(ToolFailure) as failure:
        await session.run_unit(Unit(0, '"JFK"', "origin"))
    assert failure.value.code == ToolErrorCode.INTERNAL


async def test_a_unit_without_a_field_is_a_bad_request(book_flight):
    session = await book_flight.open_session("")
    with pytest.raises(ToolFailure) as failure:
        await session.run_unit(Unit(0, json.dumps(VALID)))
    assert failure.value.code == ToolErrorCode.BAD_REQUEST


# ---- ValidateTool for any function --------------------------------------------


def no_weekend(value: str, seen) -> str | None:
    return "falls on a weekend" if date.fromisoformat(value).weekday() >= 5 else None


def before_end(value: str, seen) -> str | None:
    end = seen.get("end")
    return f"is after the end {end}" if end is not None and value > end else None


EVENT_SCHEMA = {
    "type": "object",
    "$defs": {"day": {"type": "string", "format": "date"}},
    "properties": {
        "title": {"type": "string", "maxLength": 20},
        "start": {"$ref": "#/$defs/day"},
        "end": {"$ref": "#/$defs/day"},
        "tags": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
        "span": {"type": "array", "prefixItems": [{"type": "integer"}] * 2, "items": False},
        "where": {
            "type": "object",
            "properties": {"room": {"type": "integer"}},
            "required": ["room"],
        },
    },
    "patternProperties": {"^x-": {"type": "string"}},
    "additionalProperties": {"type": "number"},
    "required": ["title"],
    "dependentRequired": {"end": ["start"]},
}


@pytest.fixture(scope="module")
def schedule() -> ValidateTool:
    return ValidateTool(
        "schedule",
        "Puts an event in the calendar.",
        EVENT_SCHEMA,
        predicates={"start": [no_weekend, before_end], "tags[]": [lambda v, s: None]},
    )


def test_the_tool_describes_itself_and_checks_its_own_definition(schedule):
    assert schedule.spec.name == "schedule" and schedule.spec.parameters is EVENT_SCHEMA
    assert schedule.spec.partial_mode == PartialMode.JSON_FIELDS and schedule.spec.partial_safe
    with pytest.raises(jsonschema.SchemaError):
        ValidateTool("bad", "", {"type": "object", "properties": {"a": {"type": "strnig"}}})
    with pytest.raises(ValueError, match="'titel'"):
        ValidateTool("typo", "", EVENT_SCHEMA, predicates={"titel": [no_weekend]})
    with pytest.raises(ValueError, match="object"):
        ValidateTool("list", "", {"type": "array"})


@pytest.mark.parametrize(
    ("arguments", "field", "reason"),
    [
        # A property given by $ref is resolved against the whole schema.
        ({"start": "2026-02-30"}, "start", 'start "2026-02-30" is not a valid date (YYYY-MM-DD)'),
        ({"start": "2026-03-14"}, "start", 'start "2026-03-14" falls on a weekend'),
        (
            {"end": "2026-03-10", "start": "2026-03-12"},
            "start",
            'start "2026-03-12" is after the end 2026-03-10',
        ),
        ({"title": "x" * 21}, "title", f'title "{"x" * 21}" is longer than 20 characters'),
        ({"tags": ["a", 1]}, "tags[1]", "tags[1] 1 is an integer, expected a string"),
        ({"tags": ["a", "a"]}, "tags", 'tags ["a", "a"] has repeated items'),
        ({"span": [1, "2"]}, "span[1]", 'span[1] "2" is a string, expected an integer'),
        ({"span": [1, 2, 3]}, "span[2]", "span[2] 3 is not allowed here"),
        ({"where": {"room": "B"}}, "where", 'where.room "B" is a string, expected an integer'),
        ({"where": {}}, "where", "where: 'room' is a required property"),
        ({"x-note": 5}, "x-note", "x-note 5 is an integer, expected a string"),
        # additionalProperties is a schema: other keys are checked by it.
        ({"extra": "no"}, "extra", 'extra "no" is a string, expected a number'),
        (
            [("priority", "NaN")],  # Python's json would take it; JSON does not
            "priority",
            "priority is not valid JSON (NaN is not a JSON value): NaN",
        ),
    ],
)
async def test_any_schema_and_predicates(schedule, arguments, field, reason):
    fields = arguments if isinstance(arguments, list) else field_units(arguments)
    outcomes, _ = await run_fields(schedule, fields)
    verdict = outcomes[-1].verdict
    assert verdict is not None
    assert (verdict.field, verdict.reason) == (field, reason)


async def test_any_schema_valid_fields_and_object_level_checks_at_finish(schedule):
    arguments = {"title": "Standup", "start": "2026-03-16", "x-note": "daily", "extra": 2.5}
    outcomes, session = await run_fields(schedule, field_units(arguments))
    assert all(o.ok for o in outcomes)
    assert await session.finish("", outcomes) == (
        "schedule: all 4 arguments are valid (title, start, x-note, extra)"
    )
    # dependentRequired is about the whole object: it shows only at the end.
    outcomes, session = await run_fields(schedule, field_units({"title": "T", "end": "2026-03-16"}))
    assert all(o.ok for o in outcomes)
    with pytest.raises(ToolFailure) as failure:
        await session.finish("", outcomes)
    assert failure.value.code == ToolErrorCode.BAD_REQUEST
    assert failure.value.message == (
        "schedule: invalid arguments: 'start' is a dependency of 'end'"
    )


async def test_a_predicate_that_crashes_fails_the_call_as_internal():
    def broken(value, seen):
        raise KeyError("oops")

    tool = ValidateTool(
        "t", "", {"type": "object", "properties": {"a": {}}}, predicates={"a": [broken]}
    )
    session = await tool.open_session("")
    with pytest.raises(ToolFailure) as failure:
        await session.run_unit(Unit(0, "1", "a"))
    assert failure.value.code == ToolErrorCode.INTERNAL
    assert "KeyError" in failure.value.message
