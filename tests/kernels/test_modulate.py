import pytest
import torch

from emerdiff_fast.kernels import modulate, modulate_torch

# Both sides round the same fp32 sum once. Triton's interpreter converts fp32 -> bf16 with
# its own rounding, which can land one bf16 ulp (2^-8 relative) away from torch's RTNE.
RTOL = {torch.float32: 0.0, torch.bfloat16: 2.0 ** -7, torch.float16: 0.0}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, c, k, b", [(16, 64, 4, 9), (37, 70, 5, 3), (1, 1, 2, 1), (100, 130, 30, 61)])
def test_modulate_matches_torch(dtype, n, c, k, b, triton_ran, kernel_device):
    g = torch.Generator().manual_seed(n * c + b)
    shared = torch.randn(n, c, generator=g).to(kernel_device, dtype)
    masks = (torch.rand(k, n, generator=g) > 0.5).to(kernel_device, dtype)
    index = torch.randint(k, (b,), generator=g).to(kernel_device)
    coef = (torch.randint(-1, 2, (b,), generator=g) * 10.0).to(kernel_device, dtype)
    with triton_ran("modulate"):
        out = modulate(shared, masks, index, coef)
    assert out.shape == (b, n, c) and out.dtype == dtype
    torch.testing.assert_close(out, modulate_torch(shared, masks, index, coef), rtol=RTOL[dtype], atol=0)
    # semantics, from first principles: member j = shared + coef_j * mask_{index_j}
    j = b - 1
    expected = (shared.float() + coef[j].float() * masks[index[j]].float()[:, None]).to(dtype)
    torch.testing.assert_close(out[j], expected, rtol=RTOL[dtype], atol=0)


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = modulate(torch.empty(7, 5), torch.empty(3, 7), torch.empty(4, dtype=torch.int64), torch.empty(4))
    assert out.shape == (4, 7, 5)


def test_kill_switch(monkeypatch):
    from emerdiff_fast.kernels import triton_enabled

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_enabled(torch.empty(1))
    monkeypatch.setenv("EMERDIFF_DISABLE_TRITON", "1")
    assert not triton_enabled(torch.empty(1))


def test_launches_are_guarded_to_the_tensors_device(monkeypatch):
    """A tensor on cuda:1 launches under torch.cuda.device(cuda:1) (queries mocked: no GPU
    here); CPU tensors need no guard."""
    from types import SimpleNamespace

    from emerdiff_fast.kernels._dispatch import launch_guard

    entered = []

    @__import__("contextlib").contextmanager
    def fake_device(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    with launch_guard(SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))):
        pass
    with launch_guard(torch.empty(1)):
        pass
    assert entered == [torch.device("cuda", 1)]
