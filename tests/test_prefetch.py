"""Read-ahead and write-behind threads of folder runs (prefetch.py)."""
import threading
import time

import pytest

from emerdiff_fast.prefetch import BackgroundWriter, StageClock, prefetched

pytestmark = pytest.mark.usefixtures("triton_off")  # the kernels are not the point here (conftest)


def test_prefetch_keeps_order_runs_ahead_boundedly_and_defers_errors():
    started = []

    def load(i):
        started.append(i)
        if i == 3:
            raise ValueError("unreadable 3")
        return i * 10

    seen = []
    for item, future in prefetched(range(6), load, depth=2):
        time.sleep(0.02)
        assert len(started) <= item + 1 + 2  # never more than `depth` loads ahead of the current one
        try:
            seen.append(future.result())
        except ValueError as exc:
            seen.append(str(exc))
    assert seen == [0, 10, 20, "unreadable 3", 40, 50]


def test_writer_runs_jobs_in_order_off_the_caller_thread_and_drains():
    done, threads = [], set()
    writer = BackgroundWriter(depth=2)
    for i in range(5):
        writer.submit(lambda i=i: (time.sleep(0.01), threads.add(threading.current_thread().name), done.append(i)))
    writer.close()
    assert done == list(range(5)) and threading.current_thread().name not in threads


def test_writer_raises_the_first_failure():
    writer = BackgroundWriter()
    writer.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        writer.close()


def test_stage_clock_sums_across_threads():
    clock = StageClock()
    writer = BackgroundWriter()
    for _ in range(3):
        writer.submit(clock.timed, "write", time.sleep, 0.02)
    clock.timed("segment", time.sleep, 0.03)
    writer.close()
    assert clock.seconds["write"] >= 0.06 and clock.seconds["segment"] >= 0.03
