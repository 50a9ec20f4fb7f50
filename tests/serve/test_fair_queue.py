"""The waiting line: turns go round-robin across tenants, and each tenant has its own cap."""

from dataclasses import dataclass

import pytest

from lorakit.serve.fair_queue import FairQueue, QueueFull


@dataclass(eq=False)
class Item:
    tenant: str | None
    label: str = ""


def test_turns_go_round_robin_across_tenants_with_requests_waiting():
    queue = FairQueue(max_waiting=100)
    for i in range(5):
        queue.put(Item("b", f"b{i}"))
    queue.put(Item("a", "a0"))
    queue.put(Item("c", "c0"))
    queue.put(Item("a", "a1"))
    order = [queue.take().label for _ in range(8)]
    assert order == ["b0", "a0", "c0", "b1", "a1", "b2", "b3", "b4"]
    assert queue.take() is None and len(queue) == 0


def test_a_tenant_at_its_cap_is_refused_and_others_are_not():
    queue = FairQueue(max_waiting=10)
    held = [Item("a") for _ in range(2)]
    for item in held:
        queue.put(item, tenant_limit=2)
    with pytest.raises(QueueFull, match="your limit"):
        queue.put(Item("a"), tenant_limit=2)
    queue.put(Item("b"), tenant_limit=2)
    running = queue.take()  # taking a row does not free the tenant's place: running requests count too
    with pytest.raises(QueueFull):
        queue.put(Item("a"), tenant_limit=2)
    queue.done(running)
    queue.put(Item("a"), tenant_limit=2)
    assert queue.held("a") == 2 and queue.held("b") == 1


def test_the_whole_line_has_its_own_cap():
    queue = FairQueue(max_waiting=2)
    queue.put(Item("a"))
    queue.put(Item("b"))
    with pytest.raises(QueueFull, match="already waiting"):
        queue.put(Item("c"))
