"""gptext.ops.rope (rotary position embedding, gpt-oss's half-split layout) against the
reference and against the same rotation written as complex multiplication."""

import math

import pytest
import torch

import gptext
from gptext import reference

from conftest import DEVICES, assert_close, oracle

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _angles(batch, positions, half, device, offset=0):
    theta = 150000.0 ** (-torch.arange(half, dtype=torch.float64) / max(half, 1))
    pos = torch.arange(offset, offset + positions, dtype=torch.float64)[None, :, None] + torch.arange(batch)[:, None, None]
    angles = pos * theta  # each sequence its own positions (left padding shifts them)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def _complex(x, cos, sin):
    """The rotation as (x1 + i x2) * (cos + i sin), in complex128."""
    x1, x2 = x.double().chunk(2, dim=-1)
    z = torch.complex(x1, x2) * torch.complex(cos.double(), sin.double())[:, None]
    return torch.cat((z.real, z.imag), dim=-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 3, 5, 64), (1, 4, 1, 128), (3, 2, 7, 6), (1, 1, 3, 2), (2, 8, 33, 80)])
def test_matches_reference_and_complex_rotation(kernels, device, dtype, shape):
    batch, heads, positions, dim = shape
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    cos, sin = _angles(batch, positions, dim // 2, device, offset=1000)
    y = gptext.ops.rope(x, cos, sin)
    assert y.shape == shape and y.dtype == dtype and y.is_contiguous()
    assert_close(y, oracle(reference.rope, x, cos, sin).to(dtype))
    assert_close(y.double(), _complex(x, cos, sin), dtype, scale=2)
    if dtype == torch.float32:  # a rotation keeps each pair's length
        assert_close(y.view(*shape[:3], 2, -1).norm(dim=3), x.view(*shape[:3], 2, -1).norm(dim=3), scale=10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_split_view_is_read_in_place(kernels, device, dtype):
    # What the model passes: a projection's (B, T, H * D) output viewed as (B, H, T, D).
    batch, positions, heads, dim = 2, 9, 4, 64
    flat = torch.randn(batch, positions, heads * dim, device=device).to(dtype)
    x = flat.view(batch, positions, heads, dim).transpose(1, 2)
    assert not x.is_contiguous()
    cos, sin = _angles(batch, positions, dim // 2, device)
    assert_close(gptext.ops.rope(x, cos, sin), reference.rope(x.contiguous(), cos, sin))
    # head_dim itself strided: made contiguous first
    wide = torch.randn(batch, heads, positions, 2 * dim, device=device).to(dtype)[..., ::2]
    assert_close(gptext.ops.rope(wide, cos, sin), reference.rope(wide.contiguous(), cos, sin))


@pytest.mark.parametrize("device", DEVICES)
def test_zero_angles_and_empty(kernels, device):
    x = torch.randn(2, 3, 4, 8, device=device)
    zeros = torch.zeros(2, 4, 4, device=device)
    assert torch.equal(gptext.ops.rope(x, zeros + 1, zeros), x)  # cos 1, sin 0: the identity
    swapped = gptext.ops.rope(x, zeros, zeros + 1)  # a quarter turn: (x1, x2) -> (-x2, x1)
    assert torch.equal(swapped, torch.cat((-x[..., 4:], x[..., :4]), -1))
    empty = torch.zeros(0, 3, 4, 8, device=device)
    assert gptext.ops.rope(empty, zeros[:0], zeros[:0]).shape == (0, 3, 4, 8)
    assert gptext.ops.rope(x[:, :, :0], zeros[:, :0], zeros[:, :0]).shape == (2, 3, 0, 8)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_bad_inputs(backend):
    x = torch.randn(2, 3, 4, 8)
    cos, sin = _angles(2, 4, 4, "cpu")
    with gptext.backend(backend):
        with pytest.raises(ValueError, match="4-d"):
            gptext.ops.rope(x[0], cos, sin)
        with pytest.raises(ValueError, match="even"):
            gptext.ops.rope(x[..., :7], cos, sin)
        with pytest.raises(TypeError, match="cos must be a float32"):
            gptext.ops.rope(x, cos.double(), sin)
        with pytest.raises(ValueError, match="sin has shape"):
            gptext.ops.rope(x, cos, sin[:, :3])
        with pytest.raises(TypeError, match="floating-point"):
            gptext.ops.rope(x.long(), cos, sin)


def test_gradient_is_the_inverse_rotation(kernels):
    x = torch.randn(2, 3, 5, 16, dtype=torch.float32, requires_grad=True)
    cos, sin = _angles(2, 5, 8, "cpu")
    grad = torch.randn(2, 3, 5, 16)
    gptext.ops.rope(x, cos, sin).backward(grad)
    wanted = x.detach().double().requires_grad_(True)
    reference.rope(wanted, cos.double(), sin.double()).backward(grad.double())
    assert_close(x.grad, wanted.grad.float())
    assert_close(gptext.ops.rope(x.grad, cos, sin), grad, scale=10)  # rotating back undoes it
    assert math.isclose(float(x.grad.norm()), float(grad.norm()), rel_tol=1e-5)
