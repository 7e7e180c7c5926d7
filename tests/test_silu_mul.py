"""kernels/silu_mul.py vs the torch form. CPU: TRITON_INTERPRET=1 (fp32/fp16); `-m gpu`: bf16 at
the model's shared-expert / dense widths. Fresh random inputs; outputs poisoned first."""

from __future__ import annotations


import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("silu_mul")

from atom_stream.kernels import silu_mul as sm


def check(T, inter, dtype, device, seed, strided=False):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    width = 2 * inter + (24 if strided else 0)  # strided: rows of a wider buffer
    base = (torch.randn(T, width, generator=gen) * 4).to(dtype).to(device)
    gu = base[:, : 2 * inter]
    out = torch.full((T, inter), float("nan"), dtype=dtype, device=device)
    sm.silu_mul(gu, out=out)
    ref = sm.silu_mul_ref(gu)
    assert torch.isfinite(out).all()
    # exp / the division may differ in the last fp32 bits (torch's CPU silu is vectorized
    # differently): a few ulp in fp32, at most one ulp of a 16-bit dtype
    n_ulp = 8 if dtype == torch.float32 else 1
    ulp = n_ulp * torch.finfo(dtype).eps * ref.abs().float().clamp_min(1e-3)
    assert ((out.float() - ref.float()).abs() <= ulp + 1e-6).all()


@pytest.mark.parametrize("T,inter,strided", [(1, 64, False), (5, 96, True), (3, 1000, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_silu_mul_cpu(T, inter, strided, dtype):
    if GPU:
        pytest.skip("interpreter test")
    check(T, inter, dtype, "cpu", seed=T * 1000 + inter, strided=strided)


def test_rejects_odd_width():
    with pytest.raises(ValueError, match="silu_mul"):
        sm.silu_mul(torch.zeros(2, 7))


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 256])
@pytest.mark.parametrize("inter", [256, 2304, 18432])  # shared expert / dense at TP8, TP1
def test_silu_mul_gpu(T, inter):
    if not GPU:
        pytest.skip("needs a GPU")
    check(T, inter, torch.bfloat16, "cuda", seed=T + inter)
