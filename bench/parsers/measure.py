"""Cutting an input into realistic deltas and timing parsers over them.

A delta is one token's text under the default model's tokenizer, as the
worker streams it: a token that ends inside a UTF-8 character adds nothing
until the character is complete, so deltas never split a character.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

NS_PER_US = 1000.0


# ---- deltas -------------------------------------------------------------------


def load_tokenizer():
    """The default model's tokenizer, from the local model cache, and its label."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from llm_worker.model_cache import resolve

    hf_logging.set_verbosity_error()  # no "sequence longer than max length" noise
    source = resolve("")
    return AutoTokenizer.from_pretrained(source.path), source.label


def token_deltas(text: str, tokenizer) -> list[str]:
    """`text` cut after each token: every delta is one token's text (tokens
    that complete no new character are merged into the next delta)."""
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    deltas: list[str] = []
    start = 0
    for _, end in enc["offset_mapping"]:
        if end > start:
            deltas.append(text[start:end])
            start = end
    if start < len(text):
        deltas.append(text[start:])
    assert "".join(deltas) == text
    return deltas


# ---- statistics ---------------------------------------------------------------


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence."""
    if not sorted_values:
        return 0.0
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


@dataclass
class Timing:
    median_us: float
    p99_us: float
    mean_us: float  # total time of a pass / deltas in it
    samples: int  # per-delta timings behind the median and p99
    sampled: bool = False  # True: only an evenly spaced sample of deltas was timed
    errors: int = 0  # baselines: prefixes the parser raised on (timed all the same)

    def as_dict(self) -> dict:
        return asdict(self)


def _timing(per_delta_ns: list[int], mean_us: float, **kw) -> Timing:
    values = sorted(per_delta_ns)
    return Timing(
        median_us=statistics.median(values) / NS_PER_US,
        p99_us=percentile(values, 99) / NS_PER_US,
        mean_us=mean_us,
        samples=len(values),
        **kw,
    )


# ---- our incremental parsers --------------------------------------------------


@dataclass
class ParserRun:
    timing: Timing
    totals_ms: list[float] = field(default_factory=list)


def check_parser(make: Callable[[], object], deltas: Sequence[str]) -> int:
    """Runs the whole input once (untimed, also a warm-up); returns the unit
    count. Raises whatever the parser raises on this input."""
    parser = make()
    units = 0
    for d in deltas:
        units += len(parser.feed(d))
    return units + len(parser.finish())


def passes_for(n: int, reps: int, min_samples: int) -> int:
    """At least `reps` passes, more for short inputs (up to 100) until
    `min_samples` per-delta timings."""
    return max(reps, min(100, -(-min_samples // n))) if n else 0


class _Timer:
    """One input's passes: each is a pass with time.perf_counter_ns around
    every feed() and a pass with no per-delta timer, timed as a whole (every
    feed plus finish). A fresh parser each pass."""

    def __init__(self, make: Callable[[], object], deltas: Sequence[str]):
        self.make, self.deltas = make, deltas
        self.pooled: list[int] = []
        self.totals_ms: list[float] = []

    def one_pass(self) -> None:
        clock, deltas = time.perf_counter_ns, self.deltas
        feed = self.make().feed
        ns = [0] * len(deltas)
        for i, d in enumerate(deltas):
            t0 = clock()
            feed(d)
            ns[i] = clock() - t0
        self.pooled += ns

        parser = self.make()
        feed = parser.feed
        t0 = clock()
        for d in deltas:
            feed(d)
        parser.finish()
        self.totals_ms.append((clock() - t0) / 1e6)

    def result(self) -> ParserRun:
        mean_us = statistics.median(self.totals_ms) * 1000.0 / len(self.deltas)
        return ParserRun(_timing(self.pooled, mean_us), self.totals_ms)


def time_parsers(
    make: Callable[[], object],
    inputs: Sequence[Sequence[str]],
    reps: int,
    min_samples: int = 0,
) -> list[ParserRun]:
    """Times one parser over several inputs (the sizes of one mode) side by
    side: their passes are interleaved, each input's spread evenly over the
    whole run, so a slower or busier stretch of the machine weighs on every
    size alike and the ratios between sizes stay honest. Per input: the
    median and p99 of all per-delta timings, and the mean = median over
    passes of (untimed pass total / deltas). gc stays on, as in a server, but
    is collected only once up front: a full collection before each short pass
    would leave it cold-cache and inflate small inputs."""
    timers = [_Timer(make, deltas) for deltas in inputs]
    needed = [passes_for(len(deltas), reps, min_samples) for deltas in inputs]
    rounds = max(needed, default=0)
    gc.collect()
    for deltas in inputs:
        check_parser(make, deltas)  # warm-up
    for r in range(rounds):
        for timer, k in zip(timers, needed, strict=True):
            if (r + 1) * k // rounds > r * k // rounds:
                timer.one_pass()
    return [timer.result() for timer in timers]


def time_parser(
    make: Callable[[], object], deltas: Sequence[str], reps: int, min_samples: int = 0
) -> ParserRun:
    """time_parsers for a single input."""
    return time_parsers(make, [deltas], reps, min_samples)[0]


# ---- baselines: re-parse the whole prefix at every delta -----------------------


def _partial_json_parser() -> Callable[[str], object]:
    import partial_json_parser

    return partial_json_parser.loads


def _jiter() -> Callable[[str], object]:
    import jiter

    def parse(prefix_bytes):
        return jiter.from_json(prefix_bytes, partial_mode="trailing-strings")

    return parse


# name -> (loader of the parse function, whether it takes the prefix as bytes)
BASELINES: dict[str, tuple[Callable[[], Callable], bool]] = {
    "partial_json_parser": (_partial_json_parser, False),
    "jiter": (_jiter, True),
}


def sample_indices(n: int, k: int) -> list[int]:
    """k deterministic, evenly spaced indices in [0, n) (all of them if k >= n)."""
    if k >= n:
        return list(range(n))
    if k <= 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def time_baseline(
    name: str, text: str, deltas: Sequence[str], sample: int | None, reps: int = 1
) -> Timing:
    """Per-delta time of re-parsing text[:end] after each delta, as servers
    that re-parse their buffer do. Only the parse call is timed (jiter's
    prefix is encoded to bytes outside the timer). With `sample`, only that
    many evenly spaced deltas are timed: the mean is then the mean of the
    sample, an estimate of the full run's total / deltas."""
    load, wants_bytes = BASELINES[name]
    parse = load()
    clock = time.perf_counter_ns
    ends: list[int] = []
    pos = 0
    for d in deltas:
        pos += len(d)
        ends.append(pos)
    indices = sample_indices(len(deltas), sample) if sample else list(range(len(deltas)))
    ns: list[int] = []
    errors = 0
    for _ in range(reps):
        gc.collect()
        for i in indices:
            prefix = text[: ends[i]]
            arg = prefix.encode("utf-8") if wants_bytes else prefix
            t0 = clock()
            try:
                parse(arg)
            except Exception:  # an unparsable prefix (e.g. empty) costs its time all the same
                t1 = clock()
                errors += 1
            else:
                t1 = clock()
            ns.append(t1 - t0)
    mean_us = statistics.fmean(ns) / NS_PER_US
    return _timing(ns, mean_us, sampled=bool(sample) and len(indices) < len(deltas), errors=errors)
