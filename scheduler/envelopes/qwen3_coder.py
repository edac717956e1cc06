"""Qwen3-Coder XML tool calls (Qwen3-Coder; Qwen3.5's templates write the same):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    <parameter=days>
    3
    </parameter>
    </function>
    </tool_call>

Each `<function=NAME>` is one call of the tool NAME, opened the moment its
name is complete; its parameters are transcoded, as they stream, into the
JSON arguments object text the run's arguments parser reads:
`{"city": "Paris", "days": 3}`. So each parameter is a unit, and a command
parameter (the python tool's `code`) streams into its statement parser while
the model is still writing it.

The rules, as Qwen3-Coder's chat template writes calls and its tool parser
(vLLM's qwen3coder_tool_parser) reads them:
- A value runs from just after `<parameter=NAME>` to the first
  `</parameter>`; one newline right after the opening tag and one right
  before the closing tag are layout, not value (the template writes
  `<parameter=x>\\nVALUE\\n</parameter>`). Everything else is the value,
  verbatim: `<`, `&`, even `</tool_call>` inside code are text.
- The XML carries no types: a value is typed by the tool's JSON schema
  (`ScanContext.tool_schemas`). A parameter whose schema type is string, or
  that the schema does not know, streams as a JSON string, escaped as it
  arrives. An integer, number, boolean or null parameter is converted when
  it closes (`3` -> 3, `True` -> true, `None`/`null` -> null); a value that
  is not of its type stays a string, as in Qwen3-Coder's own parser. An
  object or array parameter streams raw (so an array's elements are units as
  they complete) and is checked as JSON when it closes: if it is not, the
  call is closed there unfinished, which its parser reports as a parse error.
- Several `<function=…>` in one `<tool_call>` and several `<tool_call>`
  blocks per message are several calls. `</function>` closes the JSON
  object; a missing `</function>` before `</tool_call>` is forgiven. Text
  between the tags that is not a tag is skipped.
- Lenient forms the models are known to write: a `<function=…>` with no
  `<tool_call>` around it (that region ends at its `</function>`); a JSON
  object of arguments in place of the parameters; and Hermes JSON
  (`<tool_call>{"name": …, "arguments": …}</tool_call>`, or a list of such
  calls) behind the same marker, which the tag format's region reads (its
  calls are CALL_JSON calls of the tag envelope).
- Output that ends inside a call closes it with what it has: an unfinished
  object, which the arguments parser reports as a parse error.

The start marker `<tool_call>` is also the Hermes tag format's (tag.py): a
run enables one or the other, as its model writes, never both (the scanner
would open whichever is registered first), so this format has its own
region behind the same marker.
"""

from __future__ import annotations

import json
import math
import re

from conveyor_common.types import Envelope
from scheduler.envelopes.base import (
    CallBody,
    CallClosed,
    CallOpened,
    CallText,
    EnvelopeFormat,
    Region,
    ScanContext,
    ScanEvent,
)
from scheduler.envelopes.markers import MarkerSet
from scheduler.envelopes.tag import TagRegion

TOOL_CALL = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
FUNCTION = "<function="
FUNCTION_END = "</function>"
PARAMETER = "<parameter="
PARAMETER_END = "</parameter>"

MAX_NAME = 256  # a function or parameter name longer than this is cut there

_BLANKS = re.compile(r"\s*")
_NAME_END = re.compile(r"[>\n<]")
_JSON_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")

# How a parameter's value becomes JSON.
_STRING = "string"  # streamed as a JSON string
_SCALAR = "scalar"  # converted when it closes
_RAW = "raw"  # streamed as JSON text, checked when it closes

# Region states.
_CALLS = "calls"  # inside <tool_call>, between functions
_NAME = "name"  # after <function=
_BODY = "body"  # inside a function, between parameters
_PARAM_NAME = "param_name"  # after <parameter=
_VALUE = "value"  # inside a parameter's value
_JSON_BODY = "json_body"  # a function whose body is a JSON object, not parameters

_MORE, _GO, _END = "more", "go", "end"


def value_kind(schema: dict, name: str) -> tuple[str, str]:
    """How parameter `name` of a tool with this arguments schema is written
    in JSON: (kind, JSON type)."""
    props = schema.get("properties") if isinstance(schema, dict) else None
    prop = props.get(name) if isinstance(props, dict) else None
    if not isinstance(prop, dict):
        return _STRING, "string"
    kind = _type_of(prop)
    if kind in ("integer", "number", "boolean", "null"):
        return _SCALAR, kind
    if kind in ("object", "array"):
        return _RAW, kind
    return _STRING, "string"


def _type_of(prop: dict) -> str:
    """The first non-null type a property schema allows ("null" if only that)."""
    kind = prop.get("type")
    options = kind if isinstance(kind, list) else [kind] if kind is not None else []
    if kind is None:
        for key in ("anyOf", "oneOf"):
            alternatives = prop.get(key)
            if isinstance(alternatives, list):
                options = [a.get("type") for a in alternatives if isinstance(a, dict)]
                break
    names = [str(o).strip().lower() for o in options if isinstance(o, str)]
    for o in names:
        if o != "null":
            return o
    return "null" if names else ""


def scalar_json(value: str, kind: str) -> str:
    """A scalar parameter's value as JSON text of its schema type, or as a
    JSON string when it is not one (the tool's validation then says so)."""
    text = value.strip()
    if text.lower() in ("null", "none"):
        return "null"
    if kind == "boolean" and text.lower() in ("true", "false"):
        return text.lower()
    if kind == "integer" and text.isascii():
        try:
            return str(int(text))
        except ValueError:
            pass
    if kind == "number" and text.isascii():
        if _JSON_NUMBER.fullmatch(text):
            return text
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return json.dumps(number)
    return json.dumps(value, ensure_ascii=False)


def _escape(text: str) -> str:
    """Text as the inside of a JSON string (escaping is per character, so
    escaping the pieces of a text gives the escaped text)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


# The tags each state looks for (all begin with "<", but the value's end).
_CALL_TAGS = MarkerSet((FUNCTION, TOOL_CALL_END))
_BODY_TAGS = MarkerSet((PARAMETER, FUNCTION_END, TOOL_CALL_END))
_VALUE_END = MarkerSet((PARAMETER_END, "\n" + PARAMETER_END))
_JSON_BODY_END = MarkerSet((FUNCTION_END, TOOL_CALL_END))


class Qwen3CoderRegion(Region):
    """One `<tool_call>` block (or a bare `<function=…>`), read as it streams."""

    def __init__(self, bare: bool, context: ScanContext):
        self._schemas = context.tool_schemas
        self._bare = bare  # opened by a bare <function=: ends at its </function>
        self._state = _NAME if bare else _CALLS
        self._buf = ""  # text not yet consumed: a partial tag or name
        self._fresh = not bare  # nothing but blanks yet inside this <tool_call>
        self._hermes: TagRegion | None = None  # Hermes JSON behind the marker
        # the open function
        self._open = False  # a CallOpened went out and its CallClosed not yet
        self._schema: dict = {}
        self._fields = 0
        self._body_fresh = False  # nothing but blanks yet in the function's body
        # the open parameter
        self._kind, self._type = _STRING, "string"
        self._value_start = False  # the value's first character is still to come
        self._value: list[str] = []  # a scalar's or raw value's text, for its check

    # ---- Region ------------------------------------------------------------

    def feed(self, text: str) -> tuple[list[ScanEvent], str | None]:
        if self._hermes is not None:
            return self._hermes.feed(text)
        events: list[ScanEvent] = []
        buf, i = self._buf + text, 0
        while True:
            i, status = self._STEPS[self._state](self, buf, i, events)
            if status == _MORE:
                self._buf = buf[i:]
                return events, None
            if status == _END:
                self._buf = ""
                return events, buf[i:]
            if self._hermes is not None:  # _calls found Hermes JSON: TagRegion reads the rest
                self._buf = ""
                more, rest = self._hermes.feed(buf[i:])
                return events + more, rest

    def finish(self) -> list[ScanEvent]:
        if self._hermes is not None:
            return self._hermes.finish()
        events: list[ScanEvent] = []
        buf, self._buf = self._buf, ""
        if self._state == _NAME:  # the output ended inside a function's name
            self._open_call(buf.strip()[:MAX_NAME], events)
        elif self._state == _VALUE:
            self._value_piece(buf, events)
        elif self._state == _JSON_BODY and self._open and buf:
            events.append(CallText(buf))
        if self._open:
            events.append(CallClosed())  # unfinished: its parser says so
            self._open = False
        return events

    # ---- states: each consumes from buf[i:], returns (new i, status) --------

    def _calls(self, buf: str, i: int, events: list[ScanEvent]) -> tuple[int, str]:
        if self._fresh:
            i = _BLANKS.match(buf, i).end()
            if i == len(buf):
                return i, _MORE
            self._fresh = False
            if buf[i] in "{[":  # Hermes JSON: the tag format reads the rest
                self._hermes = TagRegion()
                return i, _GO
        at, marker = _CALL_TAGS.earliest(buf, i)
        if at < 0:
            return len(buf) - _CALL_TAGS.held(buf, i), _MORE
        if marker == TOOL_CALL_END:
            return at + len(marker), _END
        self._state = _NAME
        return at + len(marker), _GO

    def _name(self, buf: str, i: int, events: list[ScanEvent]) -> tuple[int, str]:
        name, i = self._read_name(buf, i)
        if name is None:
            return i, _MORE
        self._open_call(name, events)
        self._state, self._body_fresh = _BODY, True
        return i, _GO

    def _body(self, buf: str, i: int, events: list[ScanEvent]) -> tuple[int, str]:
        if self._body_fresh:
            i = _BLANKS.match(buf, i).end()
            if i == len(buf):
                return i, _MORE
            self._body_fresh = False
            if buf[i] == "{":  # a JSON arguments object instead of parameters
                self._state = _JSON_BODY
                return i, _GO
        at, marker = _BODY_TAGS.earliest(buf, i)
        if at < 0:
            return len(buf) - _BODY_TAGS.held(buf, i), _MORE
        if marker == PARAMETER:
            self._state = _PARAM_NAME
            return at + len(marker), _GO
        if self._open:
            events.append(CallText("}" if self._fields else "{}"))
        return self._function_ended(at, marker, events)

    def _param_name(self, buf: str, i: int, events: list[ScanEvent]) -> tuple[int, str]:
        name, i = self._read_name(buf, i)
        if name is None:
            return i, _MORE
        self._kind, self._type = value_kind(self._schema, name)
        if self._open:
            key = ("{" if not self._fields else ", ") + json.dumps(name, ensure_ascii=False)
            events.append(CallText(key + (': "' if self._kind == _STRING else ": ")))
            self._fields += 1
        self._value, self._value_start = [], True
        self._state = _VALUE
        return i, _GO

    def _in_value(self, buf: str, i: int, events: list[ScanEvent]) -> tuple[int, str]:
        if self._value_start:
            if i == len(buf):
                return i, _MORE
            self._value_start = False
            if buf[i] == "\n":  # the template's newline after the opening tag
                i += 1
        end = buf.find(PARAMETER_END, i)
        if end < 0:
            # A newline may still turn out to be the one before </parameter>.
            keep = _VALUE_END.held(buf, i)
            self._value_piece(buf[i : len(buf) - keep], events)
            return len(buf) - keep, _MORE
        value = buf[i:end]
        self._value_piece(value[:-1] if value.endswith("\n") else value, events)
        self._value_ended(events)
        self._state = _BODY
        return end + len(PARAMETER_END), _GO

    def _json_body(self, buf: str, i: int, events: list[ScanEvent]) -> tuple[int, str]:
        at, marker = _JSON_BODY_END.earliest(buf, i)
        if at < 0:
            end = len(buf) - _JSON_BODY_END.held(buf, i)
            if self._open and end > i:
                events.append(CallText(buf[i:end]))
            return end, _MORE
        if self._open and at > i:
            events.append(CallText(buf[i:at]))
        return self._function_ended(at, marker, events)

    _STEPS = {
        _CALLS: _calls,
        _NAME: _name,
        _BODY: _body,
        _PARAM_NAME: _param_name,
        _VALUE: _in_value,
        _JSON_BODY: _json_body,
    }

    # ---- helpers -------------------------------------------------------------

    def _read_name(self, buf: str, i: int) -> tuple[str | None, int]:
        """A tag's name: up to its ">" (or a newline or "<" that a malformed tag
        ends at, or MAX_NAME characters); None while it may go on."""
        m = _NAME_END.search(buf, i, i + MAX_NAME + 1)
        if m is None:
            if len(buf) - i > MAX_NAME:
                return buf[i : i + MAX_NAME].strip(), i + MAX_NAME
            return None, i
        end = m.start()
        return buf[i:end].strip(), end if buf[end] == "<" else end + 1

    def _open_call(self, name: str, events: list[ScanEvent]) -> None:
        events.append(CallOpened(Envelope.QWEN3_CODER, name, CallBody.ARGUMENTS))
        self._open, self._fields = True, 0
        schema = self._schemas.get(name)
        self._schema = schema if isinstance(schema, dict) else {}

    def _function_ended(self, at: int, marker: str, events: list[ScanEvent]) -> tuple[int, str]:
        if self._open:
            events.append(CallClosed())
            self._open = False
        self._state = _CALLS
        end = at + len(marker)
        return end, _END if marker == TOOL_CALL_END or self._bare else _GO

    def _value_piece(self, piece: str, events: list[ScanEvent]) -> None:
        if not piece:
            return
        if self._kind != _STRING:
            self._value.append(piece)
        if not self._open or self._kind == _SCALAR:
            return
        events.append(CallText(_escape(piece) if self._kind == _STRING else piece))

    def _value_ended(self, events: list[ScanEvent]) -> None:
        if not self._open:
            return
        if self._kind == _STRING:
            events.append(CallText('"'))
        elif self._kind == _SCALAR:
            events.append(CallText(scalar_json("".join(self._value), self._type)))
        else:
            try:
                json.loads("".join(self._value))
            except ValueError:
                # Not JSON: the call ends here unfinished, a parse error; the
                # rest of the function is read and skipped.
                events.append(CallClosed())
                self._open = False
        self._value = []


FORMAT = EnvelopeFormat(
    name=Envelope.QWEN3_CODER,
    starts=(TOOL_CALL, FUNCTION),
    region=lambda marker, context: Qwen3CoderRegion(marker == FUNCTION, context),
)
