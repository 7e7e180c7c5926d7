"""kernels/skinny_gemm.py (decode-size y = x @ w^T) vs the torch reference.

CPU: TRITON_INTERPRET=1 at small shapes, fp32 and fp16; `-m gpu`: bf16 at the Kimi-K2.5 TP8
rank's projection shapes. Fresh random inputs per check; outputs poisoned (NaN) beforehand so an
unwritten element fails; split-K on and off, M from 1 to 16, N not a multiple of the tile.
"""

from __future__ import annotations


import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("skinny_gemm")

from atom_stream.kernels import skinny_gemm as sg

cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")


def check(M, N, K, dtype, device, seed, config=None, tol=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype).to(device)
    torch.empty = _poisoned(torch.empty)
    try:
        y = sg.skinny_linear(x, w, config)
    finally:
        torch.empty = torch.empty.orig
    ref = sg.skinny_linear_ref(x, w)
    assert y.shape == (M, N) and y.dtype == dtype and torch.isfinite(y).all()
    err = ((y.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < (tol or (1e-5 if dtype == torch.float32 else 2e-3)), (M, N, K, config, err)


def _poisoned(empty):
    """torch.empty that fills new float tensors with NaN: unwritten outputs cannot pass."""
    def wrapped(*args, **kw):
        t = empty(*args, **kw)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t
    wrapped.orig = empty
    return wrapped


@cpu_only
@pytest.mark.parametrize("M", [1, 5, 16])
@pytest.mark.parametrize("split", [1, 3])
def test_interpreter_matches_reference(M, split):
    cfg = {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT": split}
    check(M, 72, 320, torch.float32, "cpu", seed=M * 10 + split, config=cfg)


@cpu_only
def test_interpreter_fp16_default_config_and_bad_shapes():
    check(3, 40, 128, torch.float16, "cpu", seed=1)
    x = torch.randn(17, 64)
    with pytest.raises(ValueError):
        sg.skinny_linear(x, torch.randn(8, 64))
    with pytest.raises(ValueError):
        sg.skinny_linear(torch.randn(2, 72), torch.randn(8, 72))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a GPU")
@pytest.mark.parametrize("N,K", [(2112, 7168), (1536, 7168), (576, 7168), (1536, 1536),
                                 (7168, 1024), (512, 7168), (7168, 256), (20480, 7168)])
@pytest.mark.parametrize("M", [1, 7, 16])
def test_gpu_projection_shapes(N, K, M):
    check(M, N, K, torch.bfloat16, "cuda", seed=N + K + M, tol=1e-2)
