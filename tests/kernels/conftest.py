import contextlib

import pytest


@pytest.fixture
def triton_ran():
    """`with triton_ran("modulate"): ...` fails unless the op's Triton kernel launched (not
    its PyTorch fallback), so these tests cannot pass with Triton missing or killed."""
    from emerdiff_fast.kernels._dispatch import LAUNCHES

    @contextlib.contextmanager
    def check(op: str, times: int = 1):
        before = LAUNCHES[op]
        yield
        assert LAUNCHES[op] == before + times, f"{op}: the Triton kernel did not run (its fallback did)"

    return check
