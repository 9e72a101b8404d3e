import pytest
import torch

from emerdiff_fast.kernels import shared_attention, shared_attention_torch

# fp32: both sides sum in fp32 (different order). 16-bit: the kernel accumulates in fp32 and
# rounds once; torch's CPU bmm may round partial sums, so allow a few 16-bit ulps.
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2), torch.float16: (2e-3, 2e-3)}


def _inputs(heads, n, m, b, d, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(heads, n, m, generator=g) * 3, -1).to(device, dtype)
    v = torch.randn(b, m, heads * d, generator=g).to(device, dtype)
    return probs, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads, n, m, b, d", [
    (5, 64, 64, 9, 64),     # SD-like self-attention, member x channel columns span blocks
    (2, 37, 37, 3, 16),     # odd token count
    (3, 45, 77, 2, 24),     # cross-attention shape (M = 77 text tokens), d not a power of two
    (1, 1, 1, 1, 8),        # degenerate
])
def test_shared_attention_matches_torch(dtype, heads, n, m, b, d, triton_ran, kernel_device):
    probs, v = _inputs(heads, n, m, b, d, dtype, seed=heads * n + m + b, device=kernel_device)
    with triton_ran("shared_attention"):
        out = shared_attention(probs, v)
    assert out.shape == (b, n, heads * d) and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, shared_attention_torch(probs, v), atol=atol, rtol=rtol)
    # from first principles: member j, head h is P_h @ V_j[:, h*d:(h+1)*d]
    j, h = b - 1, heads - 1
    expected = probs[h].double() @ v[j, :, h * d:(h + 1) * d].double()
    torch.testing.assert_close(out[j, :, h * d:(h + 1) * d].double(), expected, atol=atol, rtol=rtol)


def test_shape_mismatch_is_a_clear_error(kernel_device):
    probs, v = _inputs(2, 8, 8, 2, 4, torch.float32, 0, kernel_device)
    with pytest.raises(ValueError, match="do not match"):
        shared_attention(probs, v[:, :5])


def test_fake_impl_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out = shared_attention(torch.empty(5, 7, 9), torch.empty(3, 9, 40))
    assert out.shape == (3, 7, 40)
