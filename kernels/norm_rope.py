"""Fused add + RMSNorm, interleaved RoPE in place, per-token-group fp8 activation quant.

fused_add_rmsnorm(x [T, N], residual [T, N] | None, weight [N], eps) -> (normed, residual_out)
    residual_out = x + residual (rounded to x's dtype, as HF adds in the model dtype);
    normed = weight * (r / sqrt(mean(r^2) + eps)).to(dtype), r = residual_out in fp32 (HF order:
    normalize in fp32, cast, then multiply by the weight in the model dtype). residual=None:
    plain RMSNorm, residual_out = x.
rope_interleaved_(q_pe [T, H, DR], k_pe [T, DR] | [T, 1, DR] | None, cos [P, DR/2], sin [P, DR/2],
    positions [T]) -> None: in place, GPT-J/DeepSeek pairs (model_spec §3): pair j = (x[2j],
    x[2j+1]) rotates by the angle at positions[t]; fp32 math, cast back. q_pe/k_pe may be strided
    views (e.g. the rope slice of q [T, H, 192] or of the kv_a output [T, 576]).
per_token_group_quant_fp8(x [T, K], group=128, ue8m0=False, fp8_dtype) -> (q [T, K] fp8,
    scales [T, ceil(K/group)] fp32) with s = max(amax, 1e-4) / 448 (rounded up to a power of two
    when ue8m0) and q = saturate_rne(x / s) (model_spec §4a; FP8_MAX = the dtype's max).
One program per token in each kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_store import fp8_min_exp, fp8_round
from .moe_ref import exact_div


@triton.jit
def _add_rmsnorm_kernel(X, RES, W, OUT, RES_OUT, eps, N, stride_x, stride_r, stride_o, stride_ro,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + t * stride_x + offs, mask=mask, other=0.0)
    # the weight requested with x, not after the reduction: its DRAM latency then overlaps the
    # row's (a load after the reduction's barrier waits its own round trip, ~1 µs per call)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(RES + t * stride_r + offs, mask=mask, other=0.0)
             .to(tl.float32)).to(X.dtype.element_ty)
        tl.store(RES_OUT + t * stride_ro + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / N + eps)
    y = (xf * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(OUT + t * stride_o + offs, (y * w).to(OUT.dtype.element_ty), mask=mask)


def fused_add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    N = x.shape[-1]
    x2 = x.reshape(-1, N)
    assert x2.stride(-1) == 1
    out = torch.empty_like(x2)
    if residual is not None:
        r2 = residual.reshape(-1, N)
        res_out = torch.empty_like(x2)
    else:
        r2, res_out = x2, x2
    if x2.shape[0]:
        block = triton.next_power_of_2(N)
        _add_rmsnorm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, res_out, float(eps), N, x2.stride(0), r2.stride(0),
            out.stride(0), res_out.stride(0), HAS_RES=residual is not None, BLOCK=block,
            num_warps=max(1, min(16, block // 512)))
    return out.view(x.shape), (res_out.view(x.shape) if residual is not None else x)


def fused_add_rmsnorm_ref(x, residual, weight, eps):
    if residual is not None:
        x = (x.float() + residual.float()).to(x.dtype)
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight.float() * y.float()).to(x.dtype), x


@triton.jit
def _rope_rows(X, row_stride, n_rows, c, s, HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    rows = tl.arange(0, BLOCK_ROWS)
    j = tl.arange(0, HALF)
    mask = rows[:, None] < n_rows
    ptr = X + rows[:, None] * row_stride + 2 * j[None, :]
    x0 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(ptr + 1, mask=mask, other=0.0).to(tl.float32)
    y0 = x0 * c[None, :] - x1 * s[None, :]
    y1 = x0 * s[None, :] + x1 * c[None, :]
    tl.store(ptr, y0.to(X.dtype.element_ty), mask=mask)
    tl.store(ptr + 1, y1.to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, COS, SIN, POS, H, stride_qt, stride_qh, stride_kt, stride_cos,
                 HAS_K: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    j = tl.arange(0, HALF)
    c = tl.load(COS + pos * stride_cos + j).to(tl.float32)
    s = tl.load(SIN + pos * stride_cos + j).to(tl.float32)
    _rope_rows(Q + t * stride_qt, stride_qh, H, c, s, HALF, BLOCK_H)
    if HAS_K:
        _rope_rows(K + t * stride_kt, 0, 1, c, s, HALF, 1)


def rope_interleaved_(q_pe: torch.Tensor, k_pe: torch.Tensor | None, cos: torch.Tensor,
                      sin: torch.Tensor, positions: torch.Tensor) -> None:
    T, H, DR = q_pe.shape
    half = DR // 2
    assert q_pe.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride() == cos.stride()
    assert cos.shape[-1] == half and half & (half - 1) == 0
    if k_pe is not None:
        assert k_pe.shape[-1] == DR and k_pe.stride(-1) == 1 and k_pe.shape[0] == T
        if k_pe.dim() == 3:
            assert k_pe.shape[1] == 1
    if T == 0:
        return
    k = k_pe if k_pe is not None else q_pe
    _rope_kernel[(T,)](
        q_pe, k, cos, sin, positions, H, q_pe.stride(0), q_pe.stride(1), k.stride(0),
        cos.stride(0), HAS_K=k_pe is not None, HALF=half, BLOCK_H=triton.next_power_of_2(H),
        num_warps=4 if H * DR >= 2048 else 1)


def rope_interleaved_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         positions: torch.Tensor) -> torch.Tensor:
    """x [T, ..., DR] -> rotated copy (fp32 math, x's dtype)."""
    shape = x.shape
    xf = x.float().reshape(shape[0], -1, shape[-1] // 2, 2)
    c = cos[positions].float()[:, None, :]
    s = sin[positions].float()[:, None, :]
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), -1).reshape(shape).to(x.dtype)


@triton.jit
def _group_quant_kernel(X, Q, S, K, stride_x, stride_q, stride_s, FP8_MAX: tl.constexpr,
                        MIN_EXP: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
                        UE8M0: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < K
    x = tl.load(X + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), 1)
    s = tl.math.div_rn(tl.maximum(amax, 1e-4), FP8_MAX)  # IEEE division: bit-equal to torch
    if UE8M0:  # round up to a power of two, exactly (bit arithmetic; s is a positive normal)
        bits = s.to(tl.int32, bitcast=True)
        up = tl.where((bits & 0x7FFFFF) != 0, (bits & 0x7F800000) + 0x800000, bits)
        s = up.to(tl.float32, bitcast=True)
    q = fp8_round(tl.math.div_rn(x, s[:, None]), FP8_MAX, MIN_EXP)
    tl.store(Q + t * stride_q + cols, q.to(Q.dtype.element_ty), mask=mask)
    n_groups = tl.cdiv(K, GROUP)
    tl.store(S + t * stride_s + g, s, mask=g < n_groups)


def per_token_group_quant_fp8(x: torch.Tensor, group: int = 128, ue8m0: bool = False,
                              fp8_dtype: torch.dtype = torch.float8_e4m3fn
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    assert x2.stride(-1) == 1 and group & (group - 1) == 0
    T = x2.shape[0]
    G = triton.cdiv(K, group)
    q = torch.empty(T, K, dtype=fp8_dtype, device=x.device)
    s = torch.empty(T, G, dtype=torch.float32, device=x.device)
    if T:
        _group_quant_kernel[(T,)](
            x2, q, s, K, x2.stride(0), q.stride(0), s.stride(0),
            FP8_MAX=float(torch.finfo(fp8_dtype).max), MIN_EXP=fp8_min_exp(fp8_dtype),
            GROUP=group, BLOCK_G=triton.next_power_of_2(G), UE8M0=ue8m0,
            num_warps=max(1, min(8, triton.next_power_of_2(G * group) // 1024)))
    return q.view(*x.shape[:-1], K), s.view(*x.shape[:-1], G)


def per_token_group_quant_fp8_ref(x, group=128, ue8m0=False, fp8_dtype=torch.float8_e4m3fn):
    K = x.shape[-1]
    fmax = torch.finfo(fp8_dtype).max
    pad = (-K) % group
    xf = torch.nn.functional.pad(x.float(), (0, pad)).unflatten(-1, (-1, group))
    s = exact_div(xf.abs().amax(-1, keepdim=True).clamp(min=1e-4), fmax)
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    q = (xf / s).clamp(-fmax, fmax).to(fp8_dtype).flatten(-2)[..., :K]
    return q, s.squeeze(-1)
