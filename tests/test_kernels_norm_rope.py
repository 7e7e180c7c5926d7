"""kernels/norm_rope.py (fused add+RMSNorm, interleaved RoPE in place, fp8 group quant) vs torch.

CPU: TRITON_INTERPRET=1 (set before the kernel modules are decorated), fp32/fp16, tiny shapes.
`-m gpu`: native bf16 at the model's widths. Fresh random inputs per check; outputs poisoned.
"""

from __future__ import annotations


import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("kv_store", "norm_rope")  # kv_store first: norm_rope imports from it

from atom_stream.kernels import norm_rope as nr

cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")


def check_rmsnorm(T, N, dtype, device, seed, with_res):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = (torch.randn(T, N, generator=gen) * 3).to(dtype).to(device)
    res = torch.randn(T, N, generator=gen).to(dtype).to(device) if with_res else None
    w = (torch.rand(N, generator=gen) + 0.5).to(dtype).to(device)
    x0 = x.clone()
    res0 = res.clone() if with_res else None
    out, res_out = nr.fused_add_rmsnorm(x, res, w, 1e-6)
    ref, ref_res = nr.fused_add_rmsnorm_ref(x, res, w, 1e-6)
    assert torch.isfinite(out).all()
    # rsqrt rounding may move an element by one ulp of the output dtype
    ulp = torch.finfo(dtype).eps
    assert torch.allclose(out.float(), ref.float(), rtol=2 * ulp, atol=1e-6)
    if with_res:
        assert torch.equal(res_out, ref_res)
        assert torch.equal(res, res0)
    else:
        assert res_out is x
    assert torch.equal(x, x0)


def check_rope(T, H, DR, dtype, device, seed, k_3d=False, with_k=True):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    nope = 2 * DR
    q = torch.randn(T, H, nope + DR, generator=gen).to(dtype).to(device)
    kv = torch.randn(T, 4 * DR + DR, generator=gen).to(dtype).to(device)
    P = 97
    ang = torch.rand(P, DR // 2, generator=gen) * 6.3
    cos, sin = ang.cos().to(device), ang.sin().to(device)
    pos = torch.randint(0, P, (T,), generator=gen).to(device)
    q_pe, k_pe = q[..., nope:], kv[:, 4 * DR:]
    if k_3d:
        k_pe = k_pe.unsqueeze(1)
    q_ref = nr.rope_interleaved_ref(q_pe, cos, sin, pos)
    k_ref = nr.rope_interleaved_ref(k_pe, cos, sin, pos)
    q0, kv0 = q.clone(), kv.clone()
    nr.rope_interleaved_(q_pe, k_pe if with_k else None, cos, sin, pos)
    ulp = torch.finfo(dtype).eps
    assert torch.allclose(q_pe.float(), q_ref.float(), rtol=2 * ulp, atol=2 * ulp)
    assert torch.equal(q[..., :nope], q0[..., :nope])  # the nope part is untouched
    if with_k:
        assert torch.allclose(k_pe.float(), k_ref.float(), rtol=2 * ulp, atol=2 * ulp)
    else:
        assert torch.equal(kv, kv0)
    assert torch.equal(kv[:, :4 * DR], kv0[:, :4 * DR])


def check_quant(T, K, group, ue8m0, in_dtype, fp8_dtype, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    # spread magnitudes across groups; one all-tiny group exercises the 1e-4 floor
    x = torch.randn(T, K, generator=gen) * torch.exp2(torch.randint(-6, 8, (T, 1), generator=gen))
    x[0, :group] *= 1e-7
    x = x.to(in_dtype).to(device)
    q, s = nr.per_token_group_quant_fp8(x, group, ue8m0, fp8_dtype)
    q_ref, s_ref = nr.per_token_group_quant_fp8_ref(x, group, ue8m0, fp8_dtype)
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.contiguous().view(torch.uint8))


# ------------------------------------------------------------------ CPU (interpreter)
@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_res", [True, False])
def test_rmsnorm_interpreted(dtype, with_res):
    check_rmsnorm(5, 96, dtype, "cpu", seed=int(with_res) + 2 * (dtype == torch.float16),
                  with_res=with_res)


@cpu_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k_3d,with_k", [(False, True), (True, True), (False, False)])
def test_rope_interpreted(dtype, k_3d, with_k):
    check_rope(6, 3, 16, dtype, "cpu", seed=7 + k_3d + 2 * with_k, k_3d=k_3d, with_k=with_k)


@cpu_only
@pytest.mark.parametrize("ue8m0", [False, True])
@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
def test_group_quant_interpreted(ue8m0, fp8_dtype):
    check_quant(4, 300, 128, ue8m0, torch.float32, fp8_dtype, "cpu",
                seed=int(ue8m0) + 2 * (fp8_dtype == torch.float8_e4m3fnuz))


@cpu_only
def test_group_quant_small_group_fp16():
    check_quant(3, 64, 16, False, torch.float16, torch.float8_e4m3fn, "cpu", seed=5)


# ------------------------------------------------------------------ GPU (native)
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("with_res", [True, False])
def test_rmsnorm_gpu(with_res):
    check_rmsnorm(37, 7168, torch.bfloat16, "cuda", seed=3, with_res=with_res)
    check_rmsnorm(19, 512, torch.bfloat16, "cuda", seed=4, with_res=with_res)  # kv_a norm


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("H", [8, 128])
def test_rope_gpu(H):
    check_rope(33, H, 64, torch.bfloat16, "cuda", seed=H)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("ue8m0", [False, True])
def test_group_quant_gpu(ue8m0):
    check_quant(57, 7168, 128, ue8m0, torch.bfloat16, torch.float8_e4m3fn, "cuda", seed=9)
