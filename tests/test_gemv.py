"""kernels/gemv.py (dense GEMV, M <= 4, no split-K) against its torch reference.

Fresh random inputs for every check, outputs poisoned (NaN) first; M = 1..4 (BLOCK_M 1, 2, 4
with masked rows), N not a multiple of BLOCK_N, K not a multiple of BLOCK_K, an fp32 output
(the router logits), the add form in place (out is add: the shared expert's down adding into
the routed output), strided x rows. CPU: TRITON_INTERPRET=1 in fp32 / fp16; `-m gpu`: bf16 at
the Kimi TP8 rank's decode shapes; adjacent and strided (config STRIDED) row ownership.
"""

from __future__ import annotations

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("gemv")

from atom_stream.kernels.gemv import gemv, gemv_ref

DEV = "cuda" if GPU else "cpu"
cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")


def rel(a, b):
    a, b = a.double(), b.double()
    assert torch.isfinite(a).all(), "non-finite output (unwritten element?)"
    return float((a - b).norm() / b.norm())


def check(M, N, K, dtype, seed, tol, out_dtype=None, with_add=False, config=None):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(M, K + 16, generator=g).to(dtype).to(DEV)
    x = xs[:, :K]  # strided rows
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype).to(DEV)
    if with_add:
        add = torch.randn(M, N, generator=g).to(dtype).to(DEV)
        ref = gemv_ref(x, w, add=add)
        y = gemv(x, w, add=add, out=add, config=config)  # in place
        assert y is add
    else:
        ref = gemv_ref(x, w, out_dtype=out_dtype)
        out = torch.full((M, N), float("nan"), dtype=out_dtype or dtype, device=DEV)
        y = gemv(x, w, out_dtype=out_dtype, out=out, config=config)
        assert y is out and y.dtype == (out_dtype or dtype)
    assert rel(y, ref) < tol


@cpu_only
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_interpreted(M, dtype):
    tol = 2e-6 if dtype == torch.float32 else 2e-3
    check(M, 37, 300, dtype, seed=M, tol=tol, config={"BLOCK_N": 4, "BLOCK_K": 64})
    check(M, 50, 96, dtype, seed=M + 10, tol=tol)  # default config
    check(M, 37, 300, dtype, seed=M + 20, tol=tol, with_add=True,
          config={"BLOCK_N": 8, "BLOCK_K": 128})
    # strided rows (program p owns p, p + G, ...): N = 37 over G = 10 programs of 4 rows
    check(M, 37, 300, dtype, seed=M + 30, tol=tol,
          config={"BLOCK_N": 4, "BLOCK_K": 128, "STRIDED": True})
    check(M, 37, 300, dtype, seed=M + 40, tol=tol, with_add=True,
          config={"BLOCK_N": 8, "BLOCK_K": 64, "STRIDED": True})
    # the K loop unrolled (K = 300 over 128-wide steps: the last one masked)
    check(M, 37, 300, dtype, seed=M + 50, tol=tol,
          config={"BLOCK_N": 4, "BLOCK_K": 128, "STRIDED": True, "UNROLL": True})


@cpu_only
def test_gemv_fp32_out_and_bad_input():
    check(2, 33, 128, torch.float16, seed=3, tol=1e-5, out_dtype=torch.float32)
    x = torch.randn(5, 64, device=DEV)
    w = torch.randn(8, 64, device=DEV)
    with pytest.raises(ValueError):
        gemv(x, w)  # M > MAX_M

    with pytest.raises(ValueError):
        gemv(x[:2], w.half())  # dtype mismatch
    with pytest.raises(ValueError):
        gemv(x[:2], w, add=torch.zeros(2, 7, device=DEV))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("N,K", [(2112, 7168), (896, 7168), (7168, 1024), (1536, 1536),
                                 (7168, 256)])
def test_gemv_gpu(M, N, K):
    check(M, N, K, torch.bfloat16, seed=N + M, tol=1e-2)
    check(M, N, K, torch.bfloat16, seed=N + M + 1, tol=1e-5, out_dtype=torch.float32)
    check(M, N, K, torch.bfloat16, seed=N + M + 2, tol=1e-2, with_add=True)
    strided = {"BLOCK_N": 4, "BLOCK_K": 4096, "num_warps": 8, "STRIDED": True}
    check(M, N, K, torch.bfloat16, seed=N + M + 3, tol=1e-2, config=strided)
    check(M, N, K, torch.bfloat16, seed=N + M + 4, tol=1e-5, out_dtype=torch.float32,
          config=dict(strided, UNROLL=True))
    check(M, N, K, torch.bfloat16, seed=N + M + 5, tol=1e-2, with_add=True,
          config={"BLOCK_N": 8, "BLOCK_K": 2048, "STRIDED": True, "UNROLL": True})

