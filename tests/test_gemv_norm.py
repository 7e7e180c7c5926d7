"""kernels/gemv.py's norm= form (add + RMSNorm folded into the one-row GEMV) against the unfused
reference (kernels/gemv.gemv_norm_ref: fused_add_rmsnorm_ref, then gemv_ref).

Fresh random inputs per check; y, the new residual and h poisoned (NaN) first. The residual
out must equal the reference bit for bit (the same add and rounding); h may differ from it by
the RMS's last bit (another summation order); y by h's rounding (the GEMV reads r * weight
unrounded). Grids with fewer programs than output slices (each program then writes several),
K not a multiple of BLOCK_K, the unrolled and strided tiles, no residual (layer 0), fp32 out
(the router logits). CPU: TRITON_INTERPRET=1; `-m gpu`: bf16 at the Kimi TP8 rank's shapes.
"""

from __future__ import annotations

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("gemv")

from atom_stream.kernels.gemv import gemv, gemv_norm_ref
from test_gemv import DEV, cpu_only, needs_gpu, rel


def check(N, K, dtype, seed, tol, *, residual=True, want_h=True, out_dtype=None, config=None):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, K, generator=g) * 3).to(dtype).to(DEV)
    res = torch.randn(1, K, generator=g).to(dtype).to(DEV) if residual else None
    nw = (1 + 0.3 * torch.randn(K, generator=g)).to(dtype).to(DEV)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype).to(DEV)
    eps = 1e-6
    y_ref, r_ref, h_ref = gemv_norm_ref(x, w, res, nw, eps, out_dtype=out_dtype)
    nan = float("nan")
    res_out = torch.full((1, K), nan, dtype=dtype, device=DEV) if residual else None
    h_out = torch.full((1, K), nan, dtype=dtype, device=DEV) if want_h else None
    out = torch.full((1, N), nan, dtype=out_dtype or dtype, device=DEV)
    y = gemv(x, w, out_dtype=out_dtype, out=out, config=config,
             norm=(res, nw, eps, res_out, h_out))
    assert y is out
    assert rel(y, y_ref) < tol
    if residual:
        assert torch.equal(res_out, r_ref)
    if want_h:
        assert rel(h_out, h_ref) < tol
        if dtype != torch.float32:  # fp32 h shows any last-bit RMS difference everywhere
            # h as add_rmsnorm writes it: equal but where the RMS's last bit rounds otherwise
            assert (h_out != h_ref).float().mean() < 0.05


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_norm_interpreted(dtype):
    tol = 2e-6 if dtype == torch.float32 else 2e-3
    check(37, 300, dtype, 1, tol, config={"BLOCK_N": 4, "BLOCK_K": 64})
    # 2 programs for 1000 / 256 = 4 output slices: each program writes two
    check(5, 1000, dtype, 2, tol, config={"BLOCK_N": 4, "BLOCK_K": 128})
    check(37, 300, dtype, 3, tol, residual=False,
          config={"BLOCK_N": 4, "BLOCK_K": 128, "STRIDED": True, "UNROLL": True})
    check(37, 300, dtype, 4, tol, want_h=False,
          config={"BLOCK_N": 8, "BLOCK_K": 128, "STRIDED": True, "UNROLL": True})
    check(33, 512, dtype, 5, tol, out_dtype=torch.float32)  # y: h unrounded either way
    check(50, 96, dtype, 6, tol, residual=False, want_h=False)  # default config


@cpu_only
def test_gemv_norm_bad_input():
    x = torch.randn(2, 64, device=DEV)
    w = torch.randn(8, 64, device=DEV)
    nw = torch.ones(64, device=DEV)
    r = torch.randn(1, 64, device=DEV)
    with pytest.raises(ValueError, match="one row"):
        gemv(x, w, norm=(None, nw, 1e-6, None, None))  # two rows
    with pytest.raises(ValueError, match="one row"):
        gemv(x[:1], w, norm=(r, nw, 1e-6, None, None))  # a residual and nowhere to write it
    with pytest.raises(ValueError, match="one row"):
        gemv(x[:1], w, norm=(r, nw[:32], 1e-6, torch.empty_like(r), None))


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("N,K,out_dtype,config", [
    (2112, 7168, None, {"BLOCK_N": 4, "BLOCK_K": 4096, "num_warps": 8, "STRIDED": True,
                        "UNROLL": True}),  # q_a + kv_a (models/mla QKV_GEMV_CONFIG)
    (896, 7168, torch.float32, {"BLOCK_N": 4, "BLOCK_K": 4096, "num_warps": 8,
                                "STRIDED": True, "UNROLL": True}),  # router + shared gate/up
    (2112, 7168, None, None),
])
def test_gemv_norm_gpu(N, K, out_dtype, config):
    tol = 1e-2 if out_dtype is None else 5e-3
    for i, (residual, want_h) in enumerate([(True, True), (True, False), (False, True)]):
        check(N, K, torch.bfloat16, N + i, tol, residual=residual, want_h=want_h,
              out_dtype=out_dtype, config=config)
