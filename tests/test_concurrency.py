"""The overlap helpers keep order, bound what is queued, and never swallow an error."""

from __future__ import annotations

import threading
import time

import pytest

from generator.concurrency import BackgroundCalls, prefetched


def test_prefetched_keeps_order_and_runs_ahead_on_another_thread():
    produced_on = []

    def items():
        for i in range(10):
            produced_on.append(threading.get_ident())
            yield i

    assert list(prefetched(items(), depth=3)) == list(range(10))
    assert set(produced_on) and threading.get_ident() not in produced_on
    assert list(prefetched(iter([]), depth=2)) == []
    assert list(prefetched(items(), depth=0)) == list(range(10))


def test_prefetched_raises_the_producers_error_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("bad image 3")

    seen = []
    with pytest.raises(ValueError, match="bad image 3"):
        for item in prefetched(items(), depth=2):
            seen.append(item)
    assert seen == [1, 2]


def test_prefetched_stays_at_most_depth_items_ahead():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    stream = prefetched(items(), depth=2)
    assert next(stream) == 0
    time.sleep(0.05)
    assert len(produced) <= 1 + 2  # the item handed out and at most two ahead
    stream.close()


def test_background_calls_run_in_order_and_drain_waits_for_all():
    done = []
    with BackgroundCalls(depth=2) as calls:
        for i in range(20):
            calls.submit(lambda i=i: (time.sleep(0.001), done.append(i)))
    assert done == list(range(20))


def test_background_call_error_is_raised_in_the_caller_and_stops_later_calls():
    done = []

    def fail():
        raise OSError(28, "No space left on device")

    calls = BackgroundCalls(depth=1)
    calls.submit(done.append, 1)
    calls.submit(fail)
    with pytest.raises(OSError, match="No space left"):
        for i in range(2, 50):
            calls.submit(done.append, i)
            time.sleep(0.001)
    with pytest.raises(OSError):
        calls.drain()
    calls.close()
    assert done[0] == 1 and len(done) < 48


def test_background_calls_bound_the_queue():
    gate = threading.Event()
    calls = BackgroundCalls(depth=2)
    calls.submit(gate.wait)
    calls.submit(lambda: None)
    blocked = threading.Thread(target=calls.submit, args=(lambda: None,))
    blocked.start()
    blocked.join(0.1)
    assert blocked.is_alive(), "a third call should wait while two are queued"
    gate.set()
    blocked.join(5)
    assert not blocked.is_alive()
    calls.drain()
    calls.close()
