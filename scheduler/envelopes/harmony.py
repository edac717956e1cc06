"""gpt-oss's harmony format: the output is a sequence of messages,
`<|start|>{header}<|message|>{content}<|end|>`, and a tool call is a message
whose header names a recipient:

    <|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json
    <|message|>{"city": "Paris"}<|call|>

(the model writes it on one line).

The rules, from OpenAI's "harmony response format" guide (openai/harmony
docs/format.md):
- The header runs from `<|start|>` to `<|message|>`: the role, then
  `<|channel|>` and the channel, a recipient `to=NAME` (in the role part or
  after the channel: "the recipient might be defined in the role or channel
  section of the header"), and a content type (`json`, `<|constrain|>json`,
  `code`). The first message of a completion may lack `<|start|>assistant`
  (the prompt ends with it), so a header may also begin at `<|channel|>` or
  at ` to=functions.` / ` to=python`.
- A message without a recipient (the analysis chain of thought, a commentary
  preamble, the final answer) is not a call: its content is skipped.
  Recipients that are roles (a tool's reply `to=assistant`) are not calls
  either.
- `to=functions.NAME` calls the function tool NAME: CallOpened(HARMONY, NAME,
  ARGUMENTS), the content (a JSON object) streamed as the call's text.
- `to=python` is the built-in python tool, whose content is the code itself:
  CallOpened(HARMONY, <the run's python tool: fence_tools["python"]>,
  COMMAND), so the code streams into the statement parser. A run without a
  python tool gets an ARGUMENTS call of "python", which the run reports as
  an unknown tool.
- Any other recipient (`browser.search`) names a tool as it is; an unknown
  one is the run's "unknown tool" error.
- A message ends at `<|call|>`, `<|end|>` or `<|return|>`; a `<|start|>` or
  `<|channel|>` inside content (a message the model never ended) ends it too,
  and begins the next one. Output that ends inside a call closes it with what
  it has (its parser says whether that is complete: an unfinished JSON object
  is a parse error).
- A "header" that runs past MAX_HEADER characters without `<|message|>` was
  not one: the text after its first MAX_HEADER characters is plain again.
"""

from __future__ import annotations

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

START = "<|start|>"
CHANNEL = "<|channel|>"
MESSAGE = "<|message|>"
CONSTRAIN = "<|constrain|>"
END = "<|end|>"
CALL = "<|call|>"
RETURN = "<|return|>"
FUNCTIONS = "functions."
# A first message whose header starts in its role part, without <|start|>assistant.
ROLE_RECIPIENTS = (" to=functions.", " to=python")

MAX_HEADER = 1024  # a longer "header" is not one: its text is left as plain text

_RECIPIENT = re.compile(r"(?:^|[\s>])to=([^\s<]+)")
_NOT_CALLS = frozenset({"assistant", "user", "system", "developer", "all"})
_ENDS = (CALL, END, RETURN)  # end a message, consumed
_STARTS = (START, CHANNEL)  # begin the next message: left for the scanner
_CONTENT_ENDS = _ENDS + _STARTS
# A header holds <|channel|>; it ends at <|message|>, or (no message) at a new
# <|start|> or an end token.
_HEADER_ENDS = (MESSAGE, START, *_ENDS)

# Region states.
_HEADER, _CONTENT, _SKIP = "header", "content", "skip"


def recipient(header: str) -> str | None:
    """The message's recipient, from its header text (None: no recipient)."""
    m = _RECIPIENT.search(header.replace(CONSTRAIN, " ").replace(CHANNEL, " "))
    return m.group(1) if m else None


def call_for(to: str, context: ScanContext) -> CallOpened | None:
    """The call a message to this recipient is, or None if it is not one."""
    if to in _NOT_CALLS:
        return None
    if to.startswith(FUNCTIONS):
        return CallOpened(Envelope.HARMONY, to[len(FUNCTIONS) :], CallBody.ARGUMENTS)
    if to == "python":
        tool = context.fence_tools.get("python")
        if tool:
            return CallOpened(Envelope.HARMONY, tool, CallBody.COMMAND)
    return CallOpened(Envelope.HARMONY, to, CallBody.ARGUMENTS)


_HEADER_MARKERS = MarkerSet(_HEADER_ENDS)
_CONTENT_MARKERS = MarkerSet(_CONTENT_ENDS)


class HarmonyRegion(Region):
    """One harmony message, from its header's start to its end token."""

    def __init__(self, marker: str, context: ScanContext):
        self._context = context
        self._state = _HEADER
        # The header so far: a <|start|> is not part of it, the other
        # markers that open a header are.
        self._header = "" if marker == START else marker
        self._buf = ""  # a partial token held back
        self._open = False

    def feed(self, text: str) -> tuple[list[ScanEvent], str | None]:
        events: list[ScanEvent] = []
        buf = self._buf + text
        self._buf = ""
        if self._state == _HEADER:
            room = MAX_HEADER - len(self._header)  # buf[room:] is past the limit
            at, token = _HEADER_MARKERS.earliest(buf)
            if at < 0 or at > room:
                keep = _HEADER_MARKERS.held(buf) if at < 0 else 0
                if len(buf) - keep > room:
                    # Too long for a header: it was not one, and what follows
                    # its first MAX_HEADER characters is plain text again.
                    return events, buf[room:]
                self._header += buf[: len(buf) - keep]
                self._buf = buf[len(buf) - keep :]
                return events, None
            self._header += buf[:at]
            if token != MESSAGE:  # a header without content: no message
                return events, buf[at:] if token == START else buf[at + len(token) :]
            buf = buf[at + len(token) :]
            to = recipient(self._header)
            opened = call_for(to, self._context) if to is not None else None
            if opened is not None:
                events.append(opened)
                self._open = True
            self._state = _CONTENT if self._open else _SKIP
        at, token = _CONTENT_MARKERS.earliest(buf)
        if at < 0:
            keep = _CONTENT_MARKERS.held(buf)
            self._text(buf[: len(buf) - keep], events)
            self._buf = buf[len(buf) - keep :]
            return events, None
        self._text(buf[:at], events)
        self._close(events)
        return events, buf[at:] if token in _STARTS else buf[at + len(token) :]

    def finish(self) -> list[ScanEvent]:
        events: list[ScanEvent] = []
        if self._state == _HEADER:
            # The output ended inside a header: a call if it names a recipient.
            to = recipient(self._header + self._buf)
            opened = call_for(to, self._context) if to is not None else None
            if opened is not None:
                events.append(opened)
                self._open = True
        else:
            self._text(self._buf, events)
        self._buf = ""
        self._close(events)
        return events

    def _text(self, text: str, events: list[ScanEvent]) -> None:
        if text and self._open:
            events.append(CallText(text))

    def _close(self, events: list[ScanEvent]) -> None:
        if self._open:
            events.append(CallClosed())
            self._open = False


FORMAT = EnvelopeFormat(
    name=Envelope.HARMONY,
    starts=(START, CHANNEL, *ROLE_RECIPIENTS),
    region=lambda marker, context: HarmonyRegion(marker, context),
)
