"""The `validate` tools: check a function call's arguments as each one completes.

A `ValidateTool` takes a function's JSON schema (and optional predicates) and
checks the call's arguments one by one, in PARTIAL_MODE_JSON_FIELDS: a unit is
one complete top-level field (`Unit.field` is its key, `Unit.text` its raw JSON
value), and each element of an array field is a unit of its own, named
`"key[i]"`, sent before the field itself. The first invalid unit gets an
outcome with a `Verdict`: the gateway sends an AbortVerdict and ends the call,
so the scheduler stops decoding the rest of a call that is already doomed.

What is checked, unit by unit:
- the raw JSON parses (NaN and Infinity are refused, as JSON refuses them);
- the key is an argument of the function: one of `properties`, or matching
  `patternProperties`; with `additionalProperties: false` any other key is an
  unknown argument (a schema there checks the value of such a key);
- the key was not given twice;
- the value is valid against its subschema, with `jsonschema` (formats such as
  `date` checked); an array element against its `prefixItems[i]` / `items`
  subschema (an element whose subschema sits behind a `$ref` is checked when its
  field completes);
- then the predicates of that key: `(value, seen) -> str | None`, where `seen`
  holds the fields already complete (parsed values), for what a schema cannot
  say: a date not in the past, a return after the departure. Predicates under
  `"key[]"` check each element of array `key`. A predicate runs only once the
  schema has accepted the value. Its message completes the sentence
  `<field> <value> ...`, e.g. "is in the past (today is 2026-03-01)". A
  cross-field check should be given to both fields: it runs on whichever
  completes second.

At the end of the call `finish` validates the whole arguments object against
the schema, which adds what no single field shows: `required`, and other
object-level keywords (`dependentRequired`, `minProperties`...). A call missing
a required argument is a failed call, not a verdict: decoding is over by then,
so there is nothing left to abort, and a call result cannot say ok=False when
every unit was ok. `finish` raises `ToolFailure(BAD_REQUEST)`, so the call ends
with a ToolError whose message names the missing arguments (the model reads it
as `error (BAD_REQUEST): ...`). A valid call returns a one-line summary.

A session holds one call's state (the fields seen so far), so it serves one
call: the tool sets `session_per_call`, and the gateway opens a fresh session
for each call, even for calls that share a session key, and closes it when
that call ends (a session is a plain object: no process). A session that
still saw a second call would stop it with a ToolFailure rather than mix
their arguments.

`book_flight_tool()` is the built-in instance for the benchmark's validation
workload. Airport codes are checked against the `airportsdata` package (the
IATA codes of about 7,900 real airports, shipped with the package).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import date
from types import MappingProxyType
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from jsonschema.validators import validator_for

from tool_gateway.tools.base import (
    PartialMode,
    Tool,
    ToolErrorCode,
    ToolFailure,
    ToolSession,
    ToolSpec,
    Unit,
    UnitOutcome,
    Verdict,
)

Predicate = Callable[[Any, Mapping[str, Any]], str | None]

SHOWN_CHARS = 60  # how much of a value a message quotes
_ELEMENT = re.compile(r"(?s)(.*)\[(\d+)\]")
_JSON_TYPES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "object": "an object",
    "array": "an array",
    "null": "null",
}
_FORMATS = {
    "date": "a valid date (YYYY-MM-DD)",
    "date-time": "a valid date and time (RFC 3339, e.g. 2026-03-01T09:30:00Z)",
    "time": "a valid time (RFC 3339, e.g. 09:30:00Z)",
    "email": "a valid email address",
}


class ValidateTool(Tool):
    session_per_call = True  # a session holds one call's fields
    """Validates the arguments of any function described by a JSON schema.

    `parameters` is the function's arguments schema (an object schema; its
    `$schema` picks the draft, 2020-12 by default). `predicates` maps an
    argument (or `"name[]"` for each element of array argument `name`) to
    checks `(value, seen_fields) -> error message | None`. Raises
    `jsonschema.SchemaError` for an invalid schema and ValueError for a
    predicate on an argument the schema does not have.
    """

    def __init__(
        self,
        name: str,
        description: str,
        parameters: dict,
        predicates: dict[str, list[Predicate]] | None = None,
    ):
        cls = validator_for(parameters, default=Draft202012Validator)
        cls.check_schema(parameters)
        if parameters.get("type", "object") != "object":
            raise ValueError(f"{name}: the parameters schema must describe an object")
        self.spec = ToolSpec(
            name=name,
            description=description,
            parameters=parameters,
            partial_mode=PartialMode.JSON_FIELDS,
            partial_safe=True,
        )
        self.validator = cls(parameters, format_checker=cls.FORMAT_CHECKER)
        self.properties: dict[str, Any] = parameters.get("properties", {})
        patterns = parameters.get("patternProperties", {})
        self.patterns = {re.compile(p): schema for p, schema in patterns.items()}
        self.additional = parameters.get("additionalProperties", True)
        self.predicates = {key: list(checks) for key, checks in (predicates or {}).items()}
        for key in self.predicates:
            base = key.removesuffix("[]")
            if base not in self.properties and not self._matches_pattern(base):
                raise ValueError(f"{name}: a predicate for {key!r}, which is not an argument")

    async def open_session(self, session_key: str) -> ValidateSession:
        return ValidateSession(self)

    def _matches_pattern(self, key: str) -> bool:
        return any(p.search(key) for p in self.patterns)

    def subschemas(self, key: str) -> list[Any] | None:
        """The schemas a field's value must satisfy; None: not an argument."""
        found = [self.properties[key]] if key in self.properties else []
        found += [schema for pattern, schema in self.patterns.items() if pattern.search(key)]
        if found:
            return found
        if self.additional is False:
            return None
        return [] if self.additional is True else [self.additional]


def _element_schema(schema: Any, index: int) -> Any:
    """The subschema an array's element `index` must satisfy (True: none known)."""
    if not isinstance(schema, dict):
        return True
    prefix = schema.get("prefixItems")
    if isinstance(prefix, list) and index < len(prefix):
        return prefix[index]
    items = schema.get("items", True)
    if isinstance(items, list):  # draft 4-7 tuple validation
        return items[index] if index < len(items) else schema.get("additionalItems", True)
    return items


class ValidateSession(ToolSession):
    def __init__(self, tool: ValidateTool):
        self._tool = tool
        self._seen: dict[str, Any] = {}  # complete fields of the current call
        self._in_call = False  # a call's first unit ran and the call has not ended
        self._closed = False

    async def run_unit(self, unit: Unit) -> UnitOutcome:
        if self._closed:
            raise ToolFailure(ToolErrorCode.INTERNAL, "the validate session was closed")
        if unit.index == 0:
            if self._in_call:
                raise ToolFailure(
                    ToolErrorCode.INTERNAL,
                    f"{self._tool.spec.name}: two calls reached one validation session at "
                    "once; this one was stopped so their arguments would not mix",
                )
            self._seen = {}
            self._in_call = True
        started = time.perf_counter()
        verdict = self._check(unit)
        duration = time.perf_counter() - started
        if verdict is None:
            return UnitOutcome(unit.index, ok=True, value="ok", duration_seconds=duration)
        self._in_call = False  # the verdict ends the call
        return UnitOutcome(
            unit.index,
            ok=False,
            exception=f"invalid argument: {verdict.reason}",
            duration_seconds=duration,
            verdict=verdict,
        )

    async def finish(self, full_text: str, outcomes: Sequence[UnitOutcome]) -> str:
        self._in_call = False
        seen, self._seen = self._seen, {}
        name = self._tool.spec.name
        errors = list(self._tool.validator.iter_errors(seen))
        required = [e.validator_value for e in errors if e.validator == "required" and not e.path]
        if required:  # jsonschema reports each missing key with the whole list
            names = list(dict.fromkeys(k for keys in required for k in keys if k not in seen))
            raise ToolFailure(
                ToolErrorCode.BAD_REQUEST,
                f"{name}: missing required argument{'s' if len(names) > 1 else ''}: "
                f"{', '.join(names)}",
            )
        if errors:
            problem = _describe(best_match(errors))
            raise ToolFailure(ToolErrorCode.BAD_REQUEST, f"{name}: invalid arguments: {problem}")
        if not seen:
            return f"{name}: the call is valid (no arguments)"
        return f"{name}: all {len(seen)} arguments are valid ({', '.join(seen)})"

    async def cancel(self) -> None:
        self._in_call = False

    async def close(self) -> None:
        self._closed = True
        self._seen = {}

    # ---- checks ----------------------------------------------------------

    def _check(self, unit: Unit) -> Verdict | None:
        name = unit.field
        if not name:
            raise ToolFailure(
                ToolErrorCode.BAD_REQUEST,
                f"unit {unit.index} has no field name: {self._tool.spec.name} takes the "
                "arguments one JSON field per unit (PARTIAL_MODE_JSON_FIELDS)",
            )
        tool = self._tool
        key, index = name, None
        element = _ELEMENT.fullmatch(name)
        if element and name not in tool.properties:
            key, index = element.group(1), int(element.group(2))
        try:
            value = json.loads(unit.text, parse_constant=_refuse_constant)
        except ValueError as e:
            detail = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            return Verdict(f"{name} is not valid JSON ({detail}): {_clip(unit.text)}", name)
        schemas = tool.subschemas(key)
        if schemas is None:
            return Verdict(
                f"{key} is not an argument of {tool.spec.name} "
                f"(it takes: {', '.join(tool.properties) or 'no arguments'})",
                name,
            )
        if key in self._seen:
            return Verdict(f"{key} is given twice", name)
        if index is not None:
            # An element's schema behind a $ref is left to the check of its field.
            schemas = [
                _element_schema(s, index)
                for s in schemas
                if not (isinstance(s, dict) and "$ref" in s)
            ]
        for schema in schemas:
            error = best_match(tool.validator.evolve(schema=schema).iter_errors(value))
            if error is not None:
                return Verdict(_describe(error, name), name)
        for predicate in tool.predicates.get(key if index is None else f"{key}[]", ()):
            try:
                problem = predicate(value, MappingProxyType(self._seen))
            except Exception as e:
                raise ToolFailure(
                    ToolErrorCode.INTERNAL,
                    f"{tool.spec.name}: the check of {name} failed: {type(e).__name__}: {e}",
                ) from e
            if problem:
                return Verdict(f"{name} {_show(value)} {problem}", name)
        if index is None:
            self._seen[key] = value
        return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _clip(text: str, limit: int = SHOWN_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show(value: Any) -> str:
    return _clip(json.dumps(value, ensure_ascii=False))


def _where(field: str, path: Sequence[str | int]) -> str:
    return field + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _describe(error: ValidationError, field: str = "") -> str:
    """One schema error in words: `<field> <value> <what is wrong>`."""
    kind, limit, value = error.validator, error.validator_value, error.instance
    if not field and not error.path:
        return error.message  # about the arguments object itself
    where = _where(field, error.absolute_path) if field else error.json_path
    if kind == "type":
        wanted = [limit] if isinstance(limit, str) else list(limit)
        expected = " or ".join(_JSON_TYPES.get(t, t) for t in wanted)
        problem = f"is {_JSON_TYPES[_json_type(value)]}, expected {expected}"
    elif kind == "enum":
        problem = f"is not one of {', '.join(_show(v) for v in limit)}"
    elif kind == "const":
        problem = f"should be {_show(limit)}"
    elif kind == "format":
        problem = f"is not {_FORMATS.get(limit, f'a valid {limit}')}"
    elif kind == "pattern":
        problem = f"does not match the pattern {limit}"
    elif kind == "minLength":
        problem = "is empty" if limit == 1 else f"is shorter than {limit} characters"
    elif kind == "maxLength":
        problem = f"is longer than {limit} characters"
    elif kind == "minimum":
        problem = f"is less than the minimum of {limit}"
    elif kind == "maximum":
        problem = f"is more than the maximum of {limit}"
    elif kind == "exclusiveMinimum":
        problem = f"should be more than {limit}"
    elif kind == "exclusiveMaximum":
        problem = f"should be less than {limit}"
    elif kind == "minItems":
        problem = f"has {len(value)} items, fewer than the minimum of {limit}"
    elif kind == "maxItems":
        problem = f"has {len(value)} items, more than the maximum of {limit}"
    elif kind == "uniqueItems":
        problem = "has repeated items"
    elif kind is None:  # a `false` schema: here, an array item past the allowed ones
        problem = "is not allowed here"
    else:
        return f"{where}: {error.message}" if where else error.message
    return f"{where} {_show(value)} {problem}"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


# ---- book_flight: the benchmark's validation workload -------------------------

CABINS = ("economy", "premium_economy", "business", "first")
MAX_PASSENGERS = 9  # what airline booking sites allow in one booking

BOOK_FLIGHT_PARAMETERS = {
    "type": "object",
    "properties": {
        "origin": {
            "type": "string",
            "pattern": "^[A-Z]{3}$",
            "description": 'IATA code of the departure airport, e.g. "JFK".',
        },
        "destination": {
            "type": "string",
            "pattern": "^[A-Z]{3}$",
            "description": 'IATA code of the arrival airport, e.g. "LHR".',
        },
        "departure_date": {
            "type": "string",
            "format": "date",
            "description": "Date of the outbound flight, YYYY-MM-DD, today or later.",
        },
        "return_date": {
            "type": "string",
            "format": "date",
            "description": (
                "Date of the return flight, YYYY-MM-DD, on or after the departure date. "
                "Leave it out for a one-way trip."
            ),
        },
        "passengers": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_PASSENGERS,
            "description": "Number of travellers.",
        },
        "cabin": {
            "type": "string",
            "enum": list(CABINS),
            "description": "Cabin class; economy when left out.",
        },
        "passenger_names": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 100},
            "minItems": 1,
            "maxItems": MAX_PASSENGERS,
            "description": "Full name of each traveller as on their passport, one per passenger.",
        },
    },
    "required": ["origin", "destination", "departure_date", "passengers", "passenger_names"],
    "additionalProperties": False,
}


def iata_airport_codes() -> frozenset[str]:
    """The IATA codes of the airports in the `airportsdata` package."""
    import airportsdata

    return frozenset(airportsdata.load("IATA"))


def book_flight_tool(
    today: Callable[[], date] = date.today, airports: Collection[str] | None = None
) -> ValidateTool:
    """The `book_flight` function of the validation workload. `today` is the
    clock for "not in the past"; `airports` the known IATA codes (default: the
    `airportsdata` list, loaded here, once)."""
    known = frozenset(airports) if airports is not None else iata_airport_codes()

    def known_airport(code: str, seen: Mapping[str, Any]) -> str | None:
        if code not in known:
            return "is not a known IATA airport code"
        return None

    def not_the_origin(code: str, seen: Mapping[str, Any]) -> str | None:
        if seen.get("origin") == code:
            return "is the same airport as the origin"
        return None

    def not_the_destination(code: str, seen: Mapping[str, Any]) -> str | None:
        if seen.get("destination") == code:
            return "is the same airport as the destination"
        return None

    def not_in_past(value: str, seen: Mapping[str, Any]) -> str | None:
        now = today()
        if date.fromisoformat(value) < now:
            return f"is in the past (today is {now.isoformat()})"
        return None

    def not_after_return(value: str, seen: Mapping[str, Any]) -> str | None:
        back = seen.get("return_date")
        if back is not None and date.fromisoformat(value) > date.fromisoformat(back):
            return f"is after the return_date {back}"
        return None

    def not_before_departure(value: str, seen: Mapping[str, Any]) -> str | None:
        out = seen.get("departure_date")
        if out is not None and date.fromisoformat(value) < date.fromisoformat(out):
            return f"is before the departure_date {out}"
        return None

    def one_name_each(count: int, seen: Mapping[str, Any]) -> str | None:
        names = seen.get("passenger_names")
        if names is not None and len(names) != count:
            return f"does not match the {len(names)} passenger_names given"
        return None

    def as_many_as_passengers(names: list, seen: Mapping[str, Any]) -> str | None:
        count = seen.get("passengers")
        if count is not None and len(names) != count:
            return f"has {len(names)} names for {count} passengers"
        return None

    def a_real_name(name: str, seen: Mapping[str, Any]) -> str | None:
        if not name.strip():
            return "is blank: each passenger needs a full name"
        return None

    return ValidateTool(
        name="book_flight",
        description=(
            "Books a flight between two airports for up to 9 passengers, one way or return. "
            "Each argument is checked as soon as it is written."
        ),
        parameters=BOOK_FLIGHT_PARAMETERS,
        predicates={
            "origin": [known_airport, not_the_destination],
            "destination": [known_airport, not_the_origin],
            "departure_date": [not_in_past, not_after_return],
            "return_date": [not_in_past, not_before_departure],
            "passengers": [one_name_each],
            "passenger_names": [as_many_as_passengers],
            "passenger_names[]": [a_real_name],
        },
    )
