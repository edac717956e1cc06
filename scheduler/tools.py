"""What the scheduler knows of a tool (from the gateway's ListTools)."""

from __future__ import annotations

from dataclasses import dataclass, field

from conveyor_common.types import Envelope, PartialMode, ToolDef

# Fence languages a tool of each partial mode claims.
FENCE_LANGUAGES = {
    PartialMode.PYTHON_STATEMENTS: ("python", "py", "python3"),
    PartialMode.SQL_STATEMENTS: ("sql",),
}


@dataclass(frozen=True)
class ToolInfo:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=dict)
    partial_mode: PartialMode = PartialMode.WHOLE
    partial_safe: bool = False
    command_field: str = ""
    client: bool = False  # the client runs it: the run ends at the round that calls it

    def as_tool_def(self) -> ToolDef:
        return ToolDef(self.name, self.description, self.parameters)


def fence_tools(tools: dict[str, ToolInfo]) -> dict[str, str]:
    """Fence language -> tool name; a tool named like the language wins."""
    out: dict[str, str] = {}
    for tool in sorted(tools.values(), key=lambda t: t.name):
        for language in FENCE_LANGUAGES.get(tool.partial_mode, ()):
            if language not in out or tool.name == language:
                out[language] = tool.name
    return out


# The worker's names of the formats (GetModelInfo.tool_call_format); the
# others are named as their envelope.
_WORKER_FORMAT_NAMES = {"hermes": Envelope.TAG}


def model_envelope(tool_call_format: str) -> Envelope | None:
    """The envelope of the format a worker reports; None when unknown."""
    name = _WORKER_FORMAT_NAMES.get(tool_call_format, tool_call_format)
    try:
        envelope = Envelope(name)
    except ValueError:
        return None
    return None if envelope in (Envelope.FENCE, Envelope.PLAN) else envelope


def default_envelopes(
    tools: dict[str, ToolInfo], model: Envelope | None = Envelope.TAG
) -> frozenset[Envelope]:
    """The model's own tool-call format whenever there are tools (what its
    template teaches; Hermes tags when the model's is unknown); fences when a
    tool runs a fenced language (what small chat models write). Plans only on
    request: plan lines read like prose."""
    envelopes = {model or Envelope.TAG} if tools else set()
    if fence_tools(tools):
        envelopes.add(Envelope.FENCE)
    return frozenset(envelopes)
