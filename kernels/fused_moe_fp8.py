"""CUDA-core GEMV path of the fused MoE for FP8C: fp8 e4m3 expert weights with one scale per
output channel or per tensor, fp8 activations (W4A8 after its load-time conversion,
atom_stream/layers/quant/w4a8.py), for small M (fused_moe's `gemv_max`).

Math (w4a8.py's reference, per expert e and token m):
    sx = max(amax(|x_m|) / 448, 1e-12) (dynamic per token; static: the given scalar),
    xq = fp8(clamp(x_m / sx, +-448)),  h = (sum_k fp8w[n, k] * xq[k]) * ws[e, n] * sx,
    a = silu(h_gate) * up, rounded to the output dtype (as the reference's bf16 intermediate),
    the same quantization for a (its own per-token scale over all of I), down the same way.
fp8 x fp8 products are exact in fp32; sums are fp32.

Kernels: `_fp8_gemv_gate_up_kernel` grid (P, I / G1): gate + up rows of one pair over H in BK
chunks -> the pair's activation row [P, I]; `_fp8_gemv_down_kernel` grid (H / G2, M): each
token's pairs, scaled by routing weight x weight-row scale x activation scale, summed -> out.
Weights: w13 [E, 2I, H], w2 [E, H, I] float8_e4m3fn; scales fp32 [E] or [E, N] (S_ROW 0 / 1).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fused_moe_common import _fp8_qv
from .fused_moe_tc import empty
from .moe_align import pair_expert


@triton.jit
def _vec_scale(Xp, AS, K: tl.constexpr, BK: tl.constexpr, ASTATIC: tl.constexpr):
    """Scalar fp8 activation scale of the row at Xp (length K): see fused_moe_common._row_scale."""
    if ASTATIC:
        return tl.load(AS).to(tl.float32)
    amax = tl.zeros((BK,), tl.float32)
    for k0 in range(0, K, BK):
        amax = tl.maximum(amax, tl.abs(tl.load(Xp + k0 + tl.arange(0, BK)).to(tl.float32)))
    return tl.maximum(tl.math.div_rn(tl.max(amax, axis=0), 448.0), 1e-12)


@triton.jit
def _fp8_gemv_gate_up_kernel(
    X, W, S, IDS, ACT, AS, stride_xm, stride_im, stride_we, stride_se,
    I: tl.constexpr, H: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    N_ROUTED: tl.constexpr, S_ROW: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ASTATIC: tl.constexpr,
):
    p = tl.program_id(0)
    jt = tl.program_id(1)
    m = (p // KP).to(tl.int64)
    e = pair_expert(IDS, stride_im, p, p >= 0, TOPK, KP, N_ROUTED).to(tl.int64)
    r = tl.arange(0, 2 * BN)
    up = r >= BN
    rows = tl.where(up, I + jt * BN + r - BN, jt * BN + r).to(tl.int64)
    Wp = W + e * stride_we + rows[:, None] * H
    Xp = X + m * stride_xm
    sx = _vec_scale(Xp, AS, H, BK, ASTATIC)
    acc = tl.zeros((2 * BN, BK), tl.float32)
    for k0 in range(0, H, BK):
        k = k0 + tl.arange(0, BK)
        xq = _fp8_qv(tl.load(Xp + k).to(tl.float32), sx)
        acc += tl.load(Wp + k[None, :]).to(tl.float32) * xq[None, :]
    ws = tl.load(S + e * stride_se + rows * S_ROW).to(tl.float32)
    y = tl.sum(acc, axis=1) * ws * sx  # [2BN]
    g, u = tl.split(tl.permute(tl.reshape(y, (2, BN)), (1, 0)))
    a = g / (1.0 + tl.exp(-g)) * u
    tl.store(ACT + p.to(tl.int64) * I + jt * BN + tl.arange(0, BN), a.to(ACT.dtype.element_ty))


@triton.jit
def _fp8_gemv_down_kernel(
    ACT, W, S, IDS, TW, OUT, AS, stride_im, stride_tm, stride_om, stride_we, stride_se,
    H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    N_ROUTED: tl.constexpr, S_ROW: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    ASTATIC: tl.constexpr,
):
    jt = tl.program_id(0)
    m = tl.program_id(1)
    n = (jt * BN + tl.arange(0, BN)).to(tl.int64)
    y = tl.zeros((BN,), tl.float32)
    for kk in tl.static_range(KP):
        p = m * KP + kk
        e = pair_expert(IDS, stride_im, p, p >= 0, TOPK, KP, N_ROUTED).to(tl.int64)
        if kk < TOPK:
            wt = tl.load(TW + m.to(tl.int64) * stride_tm + kk).to(tl.float32)
        else:
            wt = 1.0
        Ap = ACT + p.to(tl.int64) * I
        sa = _vec_scale(Ap, AS, I, BK, ASTATIC)
        Wp = W + e * stride_we + n[:, None] * I
        acc = tl.zeros((BN, BK), tl.float32)
        for k0 in range(0, I, BK):
            k = k0 + tl.arange(0, BK)
            aq = _fp8_qv(tl.load(Ap + k).to(tl.float32), sa)
            acc += tl.load(Wp + k[None, :]).to(tl.float32) * aq[None, :]
        ws = tl.load(S + e * stride_se + n * S_ROW).to(tl.float32)
        y += tl.sum(acc, axis=1) * ws * (sa * wt)
    tl.store(OUT + m.to(tl.int64) * stride_om + n, y.to(OUT.dtype.element_ty))


def _fit(want: int, n: int, lo: int = 1) -> int:
    """The largest power of two <= want that divides n (at least lo)."""
    c = want
    while c > lo and n % c:
        c //= 2
    if n % c:
        raise NotImplementedError(f"fused_moe fp8: no tile <= {want} divides {n}")
    return c


def fp8_gemv_path(x, w13, w2, s13, s2, a13, a2, topk_ids, topk_weights, out, cfg, H, I, top_k,
                  kp, n_routed, s_row1, s_row2, astatic):
    """Small-M FP8C path (2 launches); see the module docstring."""
    M = x.shape[0]
    P = M * kp
    g1, bk1 = _fit(cfg["FG1"], I), _fit(cfg["FBK1"], H, 16)
    g2, bk2 = _fit(cfg["FG2"], H), _fit(cfg["FBK2"], I, 16)
    a_buf = empty((P, I), out.dtype, x.device, bool(cfg.get("poison")))
    _fp8_gemv_gate_up_kernel[(P, I // g1)](
        x, w13, s13, topk_ids, a_buf, a13, x.stride(0), topk_ids.stride(0), w13.stride(0),
        s13.stride(0), I=I, H=H, TOPK=top_k, KP=kp, N_ROUTED=n_routed, S_ROW=s_row1, BN=g1,
        BK=bk1, ASTATIC=astatic, num_warps=cfg["GW1"], num_stages=cfg["GS1"])
    if cfg.get("stop_after") == "gate_up":
        return out
    _fp8_gemv_down_kernel[(H // g2, M)](
        a_buf, w2, s2, topk_ids, topk_weights, out, a2, topk_ids.stride(0),
        topk_weights.stride(0), out.stride(0), w2.stride(0), s2.stride(0), H=H, I=I,
        TOPK=top_k, KP=kp, N_ROUTED=n_routed, S_ROW=s_row2, BN=g2, BK=bk2, ASTATIC=astatic,
        num_warps=cfg["GW2"], num_stages=cfg["GS2"])
    return out
