"""kernels/gemm_splitk.py against its torch reference: under TRITON_INTERPRET=1 on the CPU (fp32 /
fp16: the interpreter's bf16 dot is unreliable) and natively with -m gpu (bf16 at a Kimi-K2.5 TP8
rank's shapes). Fresh random inputs per check; outputs poisoned with NaN before each launch."""

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("gemm_splitk")

from atom_stream.kernels.gemm_splitk import gemm_splitk, gemm_splitk_ref

SMALL = [{"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT": s, "W_AS_M": wm, "num_warps": 4,
          "num_stages": 2} for s in (1, 3, 4) for wm in (False, True)]


def _check(M, N, K, dtype, device, cfg, with_add, out_dtype=None, atol=None):
    g = torch.Generator().manual_seed(1000 * M + N + K)
    x = torch.randn(M, K, generator=g).to(dtype).to(device)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype).to(device)
    add = torch.randn(M, N, generator=g).to(dtype).to(device) if with_add else None
    od = out_dtype or dtype
    out = torch.full((M, N), float("nan"), dtype=od, device=device)
    y = gemm_splitk(x, w, add=add, out=out, config=cfg)
    ref = gemm_splitk_ref(x, w, add=add, out_dtype=od)
    tol = atol if atol is not None else (1e-4 if od == torch.float32 else 2e-2)
    torch.testing.assert_close(y.float(), ref.float(), atol=tol, rtol=tol)
    return y


@pytest.mark.parametrize("cfg", SMALL, ids=lambda c: f"s{c['SPLIT']}-wm{int(c['W_AS_M'])}")
@pytest.mark.parametrize("M", [1, 5])
def test_splitk_matches_reference_cpu(cfg, M):
    _check(M, 40, 300, torch.float32, "cpu", cfg, with_add=False)


@pytest.mark.parametrize("wm", [False, True])
def test_splitk_add_fp16_and_fp32_out_cpu(wm):
    cfg = {**SMALL[0], "SPLIT": 3, "W_AS_M": wm}
    _check(3, 24, 160, torch.float16, "cpu", cfg, with_add=True)
    _check(2, 24, 160, torch.float16, "cpu", cfg, with_add=False, out_dtype=torch.float32,
           atol=1e-3)


def test_splitk_counters_reset_between_calls_cpu():
    """The last arriver resets its tile's counter: a second launch on the same workspace (new
    inputs) is right too, and the counters are all zero afterwards."""
    from atom_stream.kernels import gemm_splitk as mod
    cfg = {**SMALL[0], "SPLIT": 4}
    for _ in range(2):
        _check(4, 40, 256, torch.float32, "cpu", cfg, with_add=False)
    assert all(int(c.abs().sum()) == 0 for _, c in mod._workspace.values())


def test_splitk_rejects_bad_shapes_cpu():
    x = torch.randn(65, 32)
    with pytest.raises(ValueError, match="M <= 64"):
        gemm_splitk(x, torch.randn(8, 32))
    with pytest.raises(ValueError, match="same K"):
        gemm_splitk(torch.randn(2, 32), torch.randn(8, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("N,K", [(2112, 7168), (896, 7168), (7168, 1024), (4608, 1536)])
@pytest.mark.parametrize("M", [1, 4, 16, 33, 64])
def test_splitk_real_shapes_gpu(N, K, M):
    for cfg in ({}, {"W_AS_M": False, "BLOCK_N": 32, "SPLIT": 16}):
        _check(M, N, K, torch.bfloat16, "cuda", cfg, with_add=(N == 7168), atol=3e-2)
        _check(M, N, K, torch.bfloat16, "cuda", cfg, with_add=False, out_dtype=torch.float32,
               atol=2e-3)


@pytest.mark.gpu
def test_splitk_call_sites_gpu():
    """The model's call sites at their defaults: dense_linear (q_a + kv_a) and linear_fp32_out
    (router + shared gate/up) take the split-K GEMM at the row counts they are set for
    and agree with cuBLAS; past the limit they fall back."""
    from atom_stream.layers.linear import dense_linear, splitk_ok
    from atom_stream.models import deepseek_v3 as dv3
    from atom_stream.models import kernel_path, mla
    g = torch.Generator(device="cuda").manual_seed(7)
    for N, sk, fp32 in ((2112, mla.QKV_SPLITK, False), (896, dv3.ROUTER_SPLITK, True)):
        assert sk[0] >= 3  # the defaults take split-K (0 would test nothing)
        w = torch.randn(N, 7168, device="cuda", generator=g).to(torch.bfloat16) * 0.02
        for M in sorted({3, min(17, sk[0]), sk[0], sk[0] + 1}):
            x = torch.randn(M, 7168, device="cuda", generator=g).to(torch.bfloat16)
            assert splitk_ok(x, w, sk) == (M <= sk[0])
            if fp32:
                y = kernel_path.linear_fp32_out(x, w, splitk=sk)
            else:
                y = dense_linear(x, w, splitk=sk)
            ref = gemm_splitk_ref(x, w, out_dtype=y.dtype)
            torch.testing.assert_close(y.float(), ref.float(), atol=3e-2, rtol=3e-2)
