"""Folder runs keep the device busy: images are read and decoded on a background thread, and
outputs are encoded (PNG, npz) and written on another, each with a bounded queue, so the
segmenter never waits on PIL or the disk. PIL's decoders, zlib and file I/O release the
GIL, so the threads overlap with the model's work even on a CPU."""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator


class StageClock:
    """Seconds spent per stage, summed across threads (for the end-of-run overlap line)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def timed(self, stage: str, fn: Callable, *args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with self._lock:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


def prefetched(items: Iterable, load: Callable, depth: int = 2) -> Iterator[tuple[object, Future]]:
    """(item, future of load(item)) in order, with up to `depth` loads running ahead on one
    background thread. The caller takes future.result() where it handles per-item errors."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="emerdiff-read") as pool:
        it = iter(items)
        pending: deque = deque()
        for item in it:
            pending.append((item, pool.submit(load, item)))
            if len(pending) >= depth:
                break
        while pending:
            item, future = pending.popleft()
            for nxt in it:
                pending.append((nxt, pool.submit(load, nxt)))
                break
            yield item, future
        # leaving the block (also on Ctrl-C or an error in the caller) waits for loads in flight


class BackgroundWriter:
    """Runs write jobs in order on one thread, at most `depth` queued (submit blocks beyond
    that, so results never pile up in memory). close() drains every queued job, also after
    Ctrl-C: a submitted image is written completely (each file atomically, npz last)."""

    def __init__(self, depth: int = 4):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emerdiff-write")
        self._slots = threading.BoundedSemaphore(depth)
        self._futures: list[Future] = []

    def submit(self, fn: Callable, *args, **kwargs) -> Future:
        self._slots.acquire()
        future = self._pool.submit(fn, *args, **kwargs)
        future.add_done_callback(lambda _: self._slots.release())
        self._futures.append(future)
        return future

    def close(self) -> None:
        """Wait for every job; the first failure is raised."""
        self._pool.shutdown(wait=True)
        for f in self._futures:
            f.result()
