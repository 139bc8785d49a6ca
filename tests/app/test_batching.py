"""The batching policy shared by the embedded dispatcher and the Redis worker (app.batching)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest

from app.batching import BatchCollector, batch_caps


@dataclass(eq=False)
class Item:
    arrived: float = field(default_factory=time.monotonic)
    dropped: bool = False


def test_caps_never_exceed_the_largest_batch():
    assert batch_caps(["a", "b", "c"], 8, {"a": 2, "b": 20}) == {"a": 2, "b": 8, "c": 8}
    assert batch_caps(["a"], 0) == {"a": 1}


def test_the_longest_waiting_model_is_served_first_and_skipped_jobs_are_left_out():
    c: BatchCollector[Item] = BatchCollector(["a", "b"], 2, 0.0, dropped=lambda i: i.dropped)
    old, new = Item(arrived=1.0), Item(arrived=2.0)
    c.put("b", Item(arrived=0.5, dropped=True))  # its request went away
    c.put("b", new)
    c.put("a", old)
    assert c.oldest() == "a"
    c.put("a", Item(dropped=True))
    c.put("a", Item())
    c.put("a", Item())
    batch = c.take("a")
    assert batch[0] is old and len(batch) == 2 and not any(i.dropped for i in batch)  # skipped, not counted
    assert c.depth("a") == 1 and c.peek("a") == list(c.queues["a"])


def test_a_batch_waits_until_full_or_its_delay_has_passed():
    c: BatchCollector[Item] = BatchCollector(["a"], 3, 0.05)
    c.put("a", Item())
    c.put("a", Item())  # two jobs at once: the next is expected at once too
    waits: list[float] = []
    t0 = time.monotonic()
    c.fill("a", lambda left: waits.append(left) or time.sleep(left), lambda: False)
    assert time.monotonic() - t0 >= 0.05 and len(waits) == 1
    c = BatchCollector(["a"], 3, 30.0)
    c.put("a", Item())
    c.put("a", Item())
    calls: list[object] = []
    c.fill("a", lambda left: calls.append(left) or c.put("a", Item()), lambda: False)  # fills up at once
    assert c.depth("a") == 3 and len(calls) <= 2
    c.discard("a", c.peek("a")[:2])
    assert c.depth("a") == 1
    c.fill("a", lambda left: calls.append("never"), lambda: True)  # stopping: no wait
    assert "never" not in calls


def test_a_batch_stops_waiting_once_another_consumer_has_taken_the_jobs():
    """Several inference threads share the queues: when another one takes the jobs while this one waits for
    company, this one stops waiting (and takes nothing) instead of waiting out the old job's delay and then
    sending whatever came meanwhile without its company."""
    c: BatchCollector[Item] = BatchCollector(["a"], 4, 30.0)
    c.put("a", Item())
    c.put("a", Item())
    waits: list[float] = []

    def another_thread_takes_them(left: float) -> None:
        waits.append(left)
        assert c.take("a")

    c.fill("a", another_thread_takes_them, lambda: False)
    assert waits and len(waits) == 1 and c.take("a") == []
    now = [100.0]
    c = BatchCollector(["a"], 4, 0.05, clock=lambda: now[0])
    c.put("a", Item(arrived=100.0))
    c.put("a", Item(arrived=100.0))
    waits.clear()

    def taken_then_a_new_job(left: float) -> None:
        waits.append(left)
        if len(waits) == 1:  # 40 ms later another thread takes the batch, and a new job comes
            now[0] = 100.04
            assert len(c.take("a")) == 2
            c.put("a", Item(arrived=100.04))
        else:
            now[0] += left

    c.fill("a", taken_then_a_new_job, lambda: False)
    # the new job waits for company its own delay, not what was left of the jobs taken before it
    assert waits == [pytest.approx(0.05), pytest.approx(0.05)]


def test_a_batch_waits_only_when_the_models_jobs_come_closer_together_than_its_delay():
    now = [100.0]
    c: BatchCollector[Item] = BatchCollector(["a"], 8, 0.005, clock=lambda: now[0])
    waits: list[float] = []

    def wait(left: float) -> None:
        waits.append(left)
        now[0] += left

    c.put("a", Item(arrived=now[0]))  # a model's first job: nothing known yet, so it waits as always (a new
    c.fill("a", wait, lambda: False)  # service's first requests often come together)
    assert waits == [pytest.approx(0.005)] and c.expected_gap("a") == 0.0
    c.take("a")
    for _ in range(3):  # one part at a time, 40 ms apart (a forward's time): company is not coming
        now[0] += 0.040
        c.put("a", Item(arrived=now[0]))
        c.fill("a", wait, lambda: False)
        c.take("a")
    assert len(waits) == 1 and c.expected_gap("a") == pytest.approx(0.040, abs=0.006)
    for _ in range(5):  # then a burst, 1 ms apart: the median gap follows within a few jobs
        now[0] += 0.001
        c.put("a", Item(arrived=now[0]))
    assert c.expected_gap("a") == pytest.approx(0.001)
    c.take("a")
    now[0] += 0.001
    c.put("a", Item(arrived=now[0]))
    c.fill("a", wait, lambda: False)  # nobody comes: it waits out its delay, once
    assert waits[1:] == [pytest.approx(0.005)]
    c.take("a")
    for _ in range(3):  # the load ends: one part at a time again; from the third such job on, no waiting
        now[0] += 0.040
        c.put("a", Item(arrived=now[0]))
        c.fill("a", wait, lambda: False)
        c.take("a")
    assert len(waits) == 4 and c.expected_gap("a") > c.max_delay_s
