"""A run's timing breakdown: decode intervals, tool intervals, and how much
tool time ran under decoding (the saving partial execution is after)."""

from __future__ import annotations

import time

from scheduler.events import Timing


class TimingRecorder:
    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._decode: list[tuple[float, float]] = []
        self._tools: list[tuple[float, float]] = []
        self._lags: list[float] = []
        self._tokens = 0
        self._prompt_tokens = 0

    def decoded(self, start: float, end: float) -> None:
        self._decode.append((start, end))

    def tool_ran(self, end: float, duration: float) -> None:
        """A unit's result arrived at `end` after running `duration` seconds."""
        self._tools.append((end - duration, end))

    def dispatched(self, lag: float) -> None:
        self._lags.append(lag)

    def tokens(self, n: int) -> None:
        self._tokens += n

    def prompted(self, n: int) -> None:
        """A round's prompt was `n` tokens (each round's counts)."""
        self._prompt_tokens += n

    def hidden_seconds(self) -> float:
        return sum(
            max(0.0, min(t_end, d_end) - max(t_start, d_start))
            for t_start, t_end in self._tools
            for d_start, d_end in self._decode  # rounds never overlap each other
        )

    def summary(self) -> Timing:
        total = time.perf_counter() - self._start
        hidden = self.hidden_seconds()
        return Timing(
            decode_seconds=sum(end - start for start, end in self._decode),
            tool_seconds=sum(end - start for start, end in self._tools),
            hidden_tool_seconds=hidden,
            total_seconds=total,
            sequential_estimate_seconds=total + hidden,
            units_dispatched=len(self._lags),
            parse_lag_seconds=sum(self._lags) / len(self._lags) if self._lags else 0.0,
            rounds=len(self._decode),
            completion_tokens=self._tokens,
            prompt_tokens=self._prompt_tokens,
        )
