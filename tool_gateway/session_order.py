"""The order in which units run in a session that several calls share.

Calls sharing a session each run in their own task, so without a rule the
units of two calls would run in whichever order their tasks reached the
session: call 2's `print(a + b)` could run between call 1's `a = 6` and
`b = 7`. The rule is the stream's order: each unit takes a ticket when it
arrives, and a unit runs only when every earlier ticket of its session has
run or been given back. A call that ends early (failure, cancel, abort,
timeout) gives back the tickets it still holds, so it never blocks the
calls behind it.

No deadlock: a call runs its own units in order, so the oldest ticket of a
session always belongs to a unit whose call is ready to run it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict


class Ticket:
    """One unit's place in its session's queue."""

    __slots__ = ("key", "number", "turn")

    def __init__(self, key: tuple[str, str], number: int):
        self.key = key
        self.number = number
        self.turn = asyncio.Event()  # set when every earlier ticket is done


class SessionOrder:
    """Tickets per shared session, in the order units arrived on the stream."""

    def __init__(self) -> None:
        self._numbers = itertools.count()
        self._queues: dict[tuple[str, str], OrderedDict[int, Ticket]] = {}

    def take(self, key: tuple[str, str]) -> Ticket:
        """The next ticket of the session `key` (called as the unit arrives)."""
        ticket = Ticket(key, next(self._numbers))
        queue = self._queues.setdefault(key, OrderedDict())
        queue[ticket.number] = ticket
        if len(queue) == 1:
            ticket.turn.set()
        return ticket

    async def wait(self, ticket: Ticket) -> None:
        """Returns once it is this ticket's turn."""
        await ticket.turn.wait()

    def done(self, ticket: Ticket) -> None:
        """The unit ran, or will never run: the next ticket's turn may come.
        Idempotent, and fine for a ticket whose turn has not come."""
        queue = self._queues.get(ticket.key)
        if queue is None or queue.pop(ticket.number, None) is None:
            return
        if not queue:
            del self._queues[ticket.key]
            return
        next(iter(queue.values())).turn.set()
