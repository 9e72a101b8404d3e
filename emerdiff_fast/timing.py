"""Stage timers that synchronise the device at stage boundaries only (never in the loop)."""
from __future__ import annotations

import contextlib
import time

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(timings: dict, name: str, device):
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
