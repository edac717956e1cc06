"""The engine's prefill order: least prompt left first, overtaking bounded."""

import collections
from dataclasses import dataclass

from llm_worker.engines.prefill_order import bring_cheapest_forward


@dataclass
class Req:
    name: str
    cost: int
    overtaken: int = 0
    prefilled: int = 0


def _line(*reqs: Req) -> collections.deque[Req]:
    return collections.deque(reqs)


def _names(line) -> list[str]:
    return [r.name for r in line]


def _order(line, limit=16, lookahead=64) -> None:
    bring_cheapest_forward(line, lambda r: r.cost, limit, lookahead)


def test_the_cheapest_goes_first_and_counts_who_it_passed():
    line = _line(Req("long", 500), Req("mid", 300), Req("short", 70), Req("last", 90))
    _order(line)
    assert _names(line) == ["short", "long", "mid", "last"]
    assert [r.overtaken for r in line] == [0, 1, 1, 0]


def test_ties_keep_arrival_order():
    line = _line(Req("a", 100), Req("b", 50), Req("c", 50))
    _order(line)
    assert _names(line) == ["b", "a", "c"]


def test_a_request_passed_limit_times_is_passed_no_more():
    line = _line(Req("long", 500, overtaken=2), Req("short", 10))
    _order(line, limit=2)
    assert _names(line) == ["long", "short"]
    # Behind one that may still be passed, the cheapest ahead of the starved one wins.
    line = _line(Req("a", 400), Req("b", 100), Req("starved", 500, overtaken=2), Req("c", 5))
    _order(line, limit=2)
    assert _names(line) == ["b", "a", "starved", "c"]


def test_a_prompt_part_prefilled_keeps_the_head():
    line = _line(Req("chunked", 900, prefilled=256), Req("short", 10))
    _order(line)
    assert _names(line) == ["chunked", "short"]


def test_only_the_lookahead_is_searched():
    line = _line(Req("a", 300), Req("b", 200), Req("c", 1))
    _order(line, lookahead=2)
    assert _names(line) == ["b", "a", "c"]


def test_a_long_prompt_waits_at_most_limit_prefills_behind_a_stream_of_short_ones():
    line = _line(Req("long", 1000))
    served = []
    for i in range(10):
        line.append(Req(f"short{i}", 10))
        _order(line, limit=3)
        served.append(line.popleft().name)
    assert served.index("long") == 3, served
