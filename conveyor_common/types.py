"""Plain data types shared across the services' cores (the edges convert
protobuf to these; the cores never touch *_pb2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FinishReason(str, Enum):
    """Mirrors conveyor.v1.FinishReason without the prefix."""

    STOP = "STOP"
    LENGTH = "LENGTH"
    STOP_STRING = "STOP_STRING"
    ABORTED = "ABORTED"
    CANCELLED = "CANCELLED"
    TOOL_ERROR = "TOOL_ERROR"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    MAX_ROUNDS = "MAX_ROUNDS"
    ERROR = "ERROR"
    FORCED_END = "FORCED_END"


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant" | "tool"
    content: str
    name: str = ""
    tool_call_id: str = ""


@dataclass(frozen=True)
class ToolDef:
    """A tool as the model sees it (OpenAI function style)."""

    name: str
    description: str = ""
    parameters: dict = field(default_factory=dict)

    def as_openai(self) -> dict:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters or {"type": "object", "properties": {}},
            },
        }


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_new_tokens: int = 0  # 0: the server default
    stop: tuple[str, ...] = ()
