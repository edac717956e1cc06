"""Plain data types shared across the services' cores (the edges convert
protobuf to these; the cores never touch *_pb2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class PartialMode(str, Enum):
    """How a tool's command splits into units; mirrors conveyor.v1.PartialMode
    without the prefix. The one definition the scheduler and the gateway use."""

    WHOLE = "WHOLE"
    PYTHON_STATEMENTS = "PYTHON_STATEMENTS"
    JSON_FIELDS = "JSON_FIELDS"
    LINES = "LINES"
    PLAN_STEPS = "PLAN_STEPS"
    SQL_STATEMENTS = "SQL_STATEMENTS"

    def __str__(self) -> str:  # the bare name in f-strings, on every Python
        return self.value


class Envelope(str, Enum):
    """A way a model's output marks a tool call; mirrors conveyor.v1.Envelope."""

    TAG = "tag"  # Hermes: <tool_call>{"name": …, "arguments": …}</tool_call>
    FENCE = "fence"  # ```python … ``` (the language picks the tool)
    PLAN = "plan"  # LLMCompiler-style plan steps, the whole output
    LLAMA3_JSON = "llama3_json"  # {"name": …, "parameters": …}, bare or after <|python_tag|>
    PYTHONIC = "pythonic"  # [get_weather(city="Paris"), f(x=1)]
    MISTRAL = "mistral"  # [TOOL_CALLS][{…}] or [TOOL_CALLS]name[ARGS]{…}
    QWEN3_CODER = "qwen3_coder"  # <tool_call><function=f><parameter=x>…
    DEEPSEEK = "deepseek"  # <｜tool▁calls▁begin｜>…<｜tool▁sep｜>name + fenced JSON
    HARMONY = "harmony"  # gpt-oss: <|channel|>commentary to=functions.f … <|call|>

    def __str__(self) -> str:
        return self.value


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
    TOOL_CALLS = "TOOL_CALLS"


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
