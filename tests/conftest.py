import contextlib
import os

import torch  # (importing torch does not load triton)

# Without CUDA, Triton kernels run on CPU tensors through the interpreter, which must be
# chosen before triton loads; with CUDA they run natively (gpu_session.sh unsets it).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

KERNEL_DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]

# Under pytest-xdist (`-n 2`, README's test command) each worker gets one core's share of
# threads: two workers each using every core slow each other down far more than 2x.
if os.environ.get("PYTEST_XDIST_WORKER") and not torch.cuda.is_available():
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    threads = max(1, (os.cpu_count() or 1) // workers)
    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # and the subprocesses the tests start


@pytest.fixture(scope="session")
def tiny_pipe():
    from emerdiff_fast import load_pipeline

    return load_pipeline("tiny")


@pytest.fixture(scope="session")
def photo_path(tmp_path_factory):
    """A real photograph shipped with scikit-image (the astronaut), written as PNG."""
    from PIL import Image
    from skimage import data

    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    Image.fromarray(data.astronaut()).resize((96, 80)).save(path)
    return path


@pytest.fixture
def rand_image():
    def make(seed=0, h=100, w=140):
        return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))
    return make


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


@pytest.fixture
def our_log(caplog):
    """caplog for the "emerdiff_fast" logger, also after the CLI set it not to propagate."""
    import logging

    logger = logging.getLogger("emerdiff_fast")
    old_level, old_propagate = logger.level, logger.propagate
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # else caplog's root handler records every line a second time
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old_level)
    logger.propagate = old_propagate


@pytest.fixture(params=KERNEL_DEVICES)
def kernel_device(request):
    """Where the kernel tests run: natively on CUDA when there is a GPU, else on the CPU under
    Triton's interpreter. A GPU run under the interpreter would test nothing of the GPU."""
    if request.param == "cuda":
        assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET on a GPU machine"
    else:
        assert os.environ.get("TRITON_INTERPRET") == "1", "CPU kernel tests need TRITON_INTERPRET=1"
    return torch.device(request.param)


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


def _global_settings() -> dict:
    """What a test could change for the tests after it in the same worker."""
    import torch._dynamo
    import torch._inductor.config

    return {"dynamo": torch._dynamo.config.get_config_copy(), "inductor": torch._inductor.config.get_config_copy(),
            "dtype": torch.get_default_dtype(), "grad": torch.is_grad_enabled(),
            "tf32": (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)}


@pytest.fixture(autouse=True)
def settings_left_as_found():
    """Every test leaves torch's settings as it found them, so the suite passes in any order
    (library settings change through the library's own context managers, e.g.
    torch._dynamo.config.patch, which restore them)."""
    before = _global_settings()
    yield
    after = _global_settings()
    changed = sorted(f"{group}.{key}" if isinstance(before[group], dict) else group
                     for group in before
                     for key in (set(before[group]) | set(after[group]) if isinstance(before[group], dict) else [None])
                     if (before[group].get(key, "<missing>") != after[group].get(key, "<missing>")
                         if isinstance(before[group], dict) else before[group] != after[group]))
    assert not changed, f"the test left global settings changed: {changed}"


@pytest.fixture
def triton_off(monkeypatch):
    """The fast path's PyTorch fallbacks (the kill switch, EMERDIFF_DISABLE_TRITON=1), also in
    the subprocesses a test starts: for tests whose point is not the kernels (the CLI, the
    docs, evaluation, the mini model's quality). On the CPU the kernels run under Triton's
    interpreter, where k-means alone costs ~8 s per mini-model image; they have their own
    tests (tests/kernels), and the equivalence tests (test_fast, test_aspect, test_families)
    run them in the fast path."""
    monkeypatch.setenv("EMERDIFF_DISABLE_TRITON", "1")
