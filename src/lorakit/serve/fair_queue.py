"""Waiting requests, one line per tenant, served round-robin.

A free row goes to the next tenant in turn that has a request waiting, not to the oldest request
overall: a tenant with 20 requests queued takes one row in turn with a tenant that sent one, so
it cannot push others into long waits. Each tenant may also hold at most its own number of
requests, running and waiting together; beyond that only that tenant is told to retry.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    tenant: str | None


T = TypeVar("T", bound=Queued)


class QueueFull(Exception):
    """Too many requests are waiting (all tenants together, or this tenant)."""


class FairQueue(Generic[T]):
    """Thread-safe: requests are put by the server's threads and taken by the engine's."""

    def __init__(self, max_waiting: int) -> None:
        self.max_waiting = max_waiting
        self._lines: OrderedDict[str | None, deque[T]] = OrderedDict()  # the next tenant in turn first
        self._held: dict[str | None, int] = {}  # each tenant's requests, waiting and running
        self._size = 0
        self._lock = threading.Lock()

    def put(self, item: T, tenant_limit: int | None = None) -> None:
        """Queue ``item``; QueueFull when the queue or ``item``'s tenant is at its limit."""
        with self._lock:
            if self._size >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting; retry shortly")
            held = self._held.get(item.tenant, 0)
            if tenant_limit is not None and held >= tenant_limit:
                raise QueueFull(f"you have {held} requests running or waiting, your limit; retry when one finishes")
            self._lines.setdefault(item.tenant, deque()).append(item)
            self._held[item.tenant] = held + 1
            self._size += 1

    def take(self) -> T | None:
        """The next tenant's oldest waiting request (that tenant goes to the back of the turn)."""
        with self._lock:
            if not self._lines:
                return None
            tenant, line = next(iter(self._lines.items()))
            item = line.popleft()
            del self._lines[tenant]
            if line:
                self._lines[tenant] = line  # back of the turn
            self._size -= 1
            return item

    def done(self, item: T) -> None:
        """``item`` has left for good (finished, failed, cancelled): its tenant holds one fewer."""
        with self._lock:
            left = self._held.get(item.tenant, 0) - 1
            if left > 0:
                self._held[item.tenant] = left
            else:
                self._held.pop(item.tenant, None)

    def __len__(self) -> int:
        return self._size

    def held(self, tenant: str | None) -> int:
        return self._held.get(tenant, 0)
