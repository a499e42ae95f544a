"""Overlap the stages of extraction: decoding, the model, and writing.

Image decoding (PIL, in ``datasets``), the forward pass (torch) and Parquet encoding (Arrow,
zstd) all release the GIL for their heavy parts, so threads are enough to keep them busy at
the same time: the next batch is decoded while the model runs on this one, and this batch's
tables are encoded while the model runs on the next.

Order and errors are kept: items come out in the order they went in, and an exception in a
background thread is raised in the caller at its next call, so a failing write still aborts the
unit before anything is recorded as done.
"""

from __future__ import annotations

import concurrent.futures
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """``items`` in order, with up to ``depth`` of them produced ahead on a background thread."""
    if depth < 1:
        yield from items
        return
    iterator = iter(items)
    done = object()

    def produce():
        return next(iterator, done)

    # One producer thread: the iterator itself is not thread-safe, and order must hold.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
        pending = deque(pool.submit(produce) for _ in range(depth))
        try:
            while True:
                item = pending.popleft().result()
                if item is done:
                    return
                pending.append(pool.submit(produce))
                yield item
        finally:
            for future in pending:
                future.cancel()


class BackgroundCalls:
    """Run calls on one background thread, in submission order, at most ``depth`` queued.

    ``submit`` returns at once unless ``depth`` calls are already waiting (so memory held by
    queued arguments stays bounded); ``drain`` waits for all of them. The first exception of a
    call is raised by the next ``submit`` or ``drain``; later calls are then not run.
    """

    def __init__(self, depth: int = 2):
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer")
        self._pending: deque[concurrent.futures.Future] = deque()
        self._depth = max(1, depth)
        self._failed: BaseException | None = None

    def _reap(self, keep: int) -> None:
        while len(self._pending) > keep or (self._pending and self._pending[0].done()):
            future = self._pending.popleft()
            error = future.exception()
            if error is not None and self._failed is None:
                self._failed = error
        if self._failed is not None:
            for future in self._pending:
                future.cancel()
            raise self._failed

    def submit(self, call: Callable[..., object], *args, **kwargs) -> None:
        self._reap(keep=self._depth - 1)
        self._pending.append(self._pool.submit(call, *args, **kwargs))

    def drain(self) -> None:
        self._reap(keep=0)

    def close(self) -> None:
        """Wait for what is queued (without raising) and stop the thread."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> BackgroundCalls:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self.drain()
        finally:
            self.close()
        return False
