"""CUDA-core GEMV path of the fused MoE for the 4-bit formats (repacked int4 g32 / MXFP4, optional
w4a4), used for small M (fused_moe's `gemv_max`).

Small M: one program per (token, expert) pair and weight-row tile, CUDA-core FMAs in fp32 (no
tensor cores, no shared-memory layout conversions): the weights are read once per pair and
dequantized with ~5 instructions per weight (shift, lop3, fadd, fmul, ffma).
- `_gemv_gate_up_kernel` grid (P, I / G1): gate + up rows of one pair, SiLU*mul, the activation
  row of the pair (fp32, or MXFP4 values + e8m0 under w4a4) in a [P, I] buffer;
- `_gemv_down_kernel` grid (H / G2, M): every pair of a token (weights ride on the activations),
  summed in fp32, written to out [M, H]. A token repeating an expert id is fine: each pair has
  its own activation row.
Split-K variant (config "SK" > 1, not w4a4; for M=1, where 256 programs of the gate_up leave
the H200's memory pipe mostly idle): gate_up grid (P, I / G1, SK), each program sums H / SK of
K and atomically adds its fp32 gate/up sums into a zeroed h [P, 2I]; the down kernel forms
silu(gate) * up from h as it loads it (no extra launch; one memset). fp32 atomics make the
summation order, hence the last bits, vary between runs.
Weights in the kernel layout int32 [E, N, K/128, 16] (kernels/moe_ref.py); H, I % 128 == 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_moe_common import _SIGN, _e2m1_value, _mx_quant, _pow2, _wrow
from .fused_moe_tc import _pick, empty
from .moe_align import pair_expert


# Small M (4-bit formats): one program per (token, expert) pair and weight-row tile, CUDA-core
# FMAs in fp32 (no tensor cores, no shared-memory layout conversions): the weights are read once
# per pair and dequantized with ~5 instructions per weight (shift, lop3, fadd, fmul, ffma).
@triton.jit
def _prep4(w, FMT: tl.constexpr):
    """Per-word preparation for _dq4_pair: int4 -> (w | 2^23 bits, (w >> 16) | 2^23 bits)."""
    if FMT == 2:
        return w | 0x4B000000, (w >> 16) | 0x4B000000
    else:
        return w, w


@triton.jit
def _dq4_pair(w, wh, j: tl.constexpr, x0, x1, FMT: tl.constexpr):
    """sum over h of value(element (j, h) of each kernel-layout word) * x_h, fp32, unscaled.

    int4 (w, wh from _prep4): nibble j of the low / high half is masked in place inside the
    float 2^23 (mantissa unit 1): (w | C) & ((15 << 4j) | C) = 2^23 + n * 16^j exactly, so one
    LOP3 and one FADD give (n - 8) * 16^j (16^-j is folded into the scale). MXFP4: fp16 bits of
    e2m1 * 2^-14 for both halves at once (see moe_ref), converted to fp32."""
    if FMT == 2:
        off = 8388608.0 + 8.0 * (16 ** j)
        keep = (15 << (4 * j)) | 0x4B000000
        q0 = (w & keep).to(tl.float32, bitcast=True) - off
        q1 = (wh & keep).to(tl.float32, bitcast=True) - off
    else:
        v = ((w << (9 - 3 * j)) & 0x0E000E00) | ((w << (3 - j)) & _SIGN)
        q0 = v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        q1 = (v >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return q0 * x0 + q1 * x1


@triton.jit
def _gscale(Sp, offs, mask, FMT: tl.constexpr, j: tl.constexpr):
    """Group scales as fp32 multipliers for _dq4_pair: int4 scale * 16^-j; MXFP4 2^(e-113)."""
    if FMT == 2:
        return tl.load(Sp + offs, mask=mask, other=0.0).to(tl.float32) * (1.0 / (16 ** j))
    else:
        e8 = tl.load(Sp + offs, mask=mask, other=127).to(tl.int32)
        return _pow2(tl.minimum(e8 + 14, 254))


@triton.jit
def _xpair(Xp, XSp, kx, ACT: tl.constexpr):
    """Activations at kx and kx + 1 (kx even [1, CH, 16]) as fp32, loaded as one contiguous
    [1, CH, 16, 2] tile; w4a4: e2m1 values times 2^(e-127) of their group."""
    kk = kx[:, :, :, None] + tl.arange(0, 2)[None, None, None, :]
    x = tl.load(Xp + kk).to(tl.float32)
    if ACT == 2:
        ea = tl.load(XSp + kx // 32).to(tl.int32)
        x = x * tl.where(ea > 0, _pow2(tl.maximum(ea, 1)), 5.877471754111438e-39)[:, :, :, None]
    return tl.split(x)


@triton.jit
def _gemv_gate_up_kernel(
    X, XS, W, S, IDS, ACT, ACTS, stride_xm, stride_xsm, stride_im, stride_we, stride_se,
    I: tl.constexpr, H: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    N_ROUTED: tl.constexpr, BN: tl.constexpr, CH: tl.constexpr, FMT: tl.constexpr,
    ACT_Q: tl.constexpr, ACT_OUT: tl.constexpr, SK: tl.constexpr, WT: tl.constexpr = 1,
):
    p = tl.program_id(0)
    jt = tl.program_id(1)
    NIT: tl.constexpr = H // (128 * CH) // SK  # K iterations of this program (split-K: SK > 1)
    it0 = tl.program_id(2) * NIT
    m = (p // KP).to(tl.int64)
    e = pair_expert(IDS, stride_im, p, p >= 0, TOPK, KP, N_ROUTED).to(tl.int64)
    r = tl.arange(0, 2 * BN)
    up = r >= BN
    rows = tl.where(up, I + jt * BN + r - BN, jt * BN + r).to(tl.int64)
    Wp = W + e * stride_we + _wrow(rows, H // 128, WT, 16)[:, None, None]  # WT: fused_moe_common
    Sp = S + e * stride_se + _wrow(rows, H // 128, WT, 4)[:, None]
    Xp = X + m * stride_xm
    XSp = XS + m * stride_xsm
    c3 = tl.arange(0, CH)[None, :, None]
    t3 = tl.arange(0, 16)[None, None, :]
    acc = tl.zeros((2 * BN, CH, 16), tl.float32)
    for it in range(it0, it0 + NIT):
        c = it * CH + c3  # chunk index [1, CH, 1]
        w, wh = _prep4(tl.load(Wp + c * (WT * 16) + t3), FMT)  # [R, CH, 16] int32
        for j in tl.static_range(4):
            c2 = it * CH + tl.arange(0, CH)[None, :]
            s = _gscale(Sp, c2 * (WT * 4) + j, r[:, None] >= 0, FMT, j)[:, :, None]  # [R, CH, 1]
            x0, x1 = _xpair(Xp, XSp, c * 128 + 32 * j + 2 * t3, ACT_Q)  # [1, CH, 16] each
            acc += _dq4_pair(w, wh, j, x0, x1, FMT) * s
    y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [2BN]
    if SK > 1:  # split-K: fp32 partial sums of the gate/up rows into the zeroed h [P, 2I]
        tl.atomic_add(ACT + p.to(tl.int64) * (2 * I) + rows, y, sem="relaxed")
        return
    g, u = tl.split(tl.permute(tl.reshape(y, (2, BN)), (1, 0)))
    a = g / (1.0 + tl.exp(-g)) * u
    cols = jt * BN + tl.arange(0, BN)
    p64 = p.to(tl.int64)
    if ACT_OUT == 0:
        tl.store(ACT + p64 * I + cols, a.to(ACT.dtype.element_ty))
    else:  # w4a4: MXFP4 activations (values + e8m0) for the down GEMV
        code, eb = _mx_quant(tl.reshape(a, (BN // 32, 32, 1)))
        tl.store(ACTS + p64 * (I // 32) + jt * (BN // 32) + tl.arange(0, BN // 32),
                 tl.reshape(eb, (BN // 32,)).to(tl.uint8))
        tl.store(ACT + p64 * I + cols, _e2m1_value(tl.reshape(code, (BN,))).to(tl.float16))


@triton.jit
def _gemv_down_kernel(
    ACT, ACTS, W, S, IDS, TW, OUT, stride_im, stride_tm, stride_om, stride_we, stride_se,
    H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
    N_ROUTED: tl.constexpr, BN: tl.constexpr, FMT: tl.constexpr, ACT_Q: tl.constexpr,
    SILU_IN: tl.constexpr,
):
    """SILU_IN: ACT is the split-K gate_up's h [P, 2I] (fp32 sums); a = silu(gate) * up is
    formed here per loaded tile."""
    jt = tl.program_id(0)
    m = tl.program_id(1)
    CH: tl.constexpr = I // 128
    n = (jt * BN + tl.arange(0, BN)).to(tl.int64)
    c3 = tl.arange(0, CH)[None, :, None]
    t3 = tl.arange(0, 16)[None, None, :]
    acc = tl.zeros((BN, CH, 16), tl.float32)
    for k in tl.static_range(KP):
        p = m * KP + k
        e = pair_expert(IDS, stride_im, p, p >= 0, TOPK, KP, N_ROUTED).to(tl.int64)
        if k < TOPK:
            wt = tl.load(TW + m.to(tl.int64) * stride_tm + k).to(tl.float32)
        else:
            wt = 1.0
        w, wh = _prep4(tl.load(W + e * stride_we + n[:, None, None] * (I // 8) + c3 * 16 + t3),
                       FMT)
        Sp = S + e * stride_se + n[:, None] * (I // 32)
        Ap = ACT + p.to(tl.int64) * (2 * I if SILU_IN else I)
        ASp = ACTS + p.to(tl.int64) * (I // 32)
        for j in tl.static_range(4):
            s = _gscale(Sp, tl.arange(0, CH)[None, :] * 4 + j, n[:, None] >= 0, FMT, j)
            if SILU_IN:
                g0, g1 = _xpair(Ap, ASp, c3 * 128 + 32 * j + 2 * t3, 0)
                u0, u1 = _xpair(Ap + I, ASp, c3 * 128 + 32 * j + 2 * t3, 0)
                a0 = g0 / (1.0 + tl.exp(-g0)) * u0
                a1 = g1 / (1.0 + tl.exp(-g1)) * u1
            else:
                a0, a1 = _xpair(Ap, ASp, c3 * 128 + 32 * j + 2 * t3, ACT_Q)
            # the routing weight rides on the activation tile
            acc += _dq4_pair(w, wh, j, a0 * wt, a1 * wt, FMT) * s[:, :, None]
    y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(OUT + m.to(tl.int64) * stride_om + n, y.to(OUT.dtype.element_ty))


def gemv_path(x, xs, stride_xs, w13, w2, s13, s2, topk_ids, topk_weights, out, act, act_out,
              fmt, cfg, H, I, top_k, kp, n_routed, wt: int = 1):
    """Small-M 4-bit path: gate_up GEMV per (token, expert) pair, then down GEMV per token that
    sums its experts with the routing weights in fp32 and writes the output (2 launches). wt:
    rows per tile of w13's words and scales (1: row-major)."""
    M = x.shape[0]
    P = M * kp
    g1, gw1, gc_max = cfg["G1"], cfg["GW1"], cfg["GC"]
    if act_out:  # w4a4 quantizes whole groups of 32 in the epilogue; 8 warps keep it unspilled
        g1, gw1, gc_max = max(g1, 32), max(gw1, 8), min(gc_max, 4)
    g2 = _pick([c for c in (256, 128, 64, 32, 16) if c <= cfg["G2"]], H)
    gc = _pick([c for c in (8, 4, 2, 1) if c <= gc_max], H // 128)
    if I % g1 or I % 128:
        raise ValueError(f"fused_moe: GEMV tiles {g1} do not divide I={I}")
    poison = bool(cfg.get("poison"))
    sk = 1 if act_out else cfg.get("SK", 1)
    if (H // (128 * gc)) % sk:
        raise ValueError(f"fused_moe: split-K {sk} does not divide {H // (128 * gc)} iterations")
    if sk > 1:  # gate/up sums accumulate atomically (fp32, order not fixed) into zeroed h
        a_buf = torch.zeros(P, 2 * I, dtype=torch.float32, device=x.device)
    else:
        a_buf = empty((P, I), torch.float16 if act_out else torch.float32, x.device, poison)
    a_sc = empty((P, I // 32), torch.uint8, x.device, poison) if act_out else a_buf
    _gemv_gate_up_kernel[(P, I // g1, sk)](
        x, xs, w13, s13, topk_ids, a_buf, a_sc, x.stride(0), stride_xs, topk_ids.stride(0),
        w13.stride(0), s13.stride(0), I=I, H=H, TOPK=top_k, KP=kp, N_ROUTED=n_routed, BN=g1,
        CH=gc, FMT=fmt, ACT_Q=act, ACT_OUT=1 if act_out else 0, SK=sk, WT=wt, num_warps=gw1,
        num_stages=cfg["GS1"])
    if cfg.get("stop_after") == "gate_up":
        return out
    _gemv_down_kernel[(H // g2, M)](
        a_buf, a_sc, w2, s2, topk_ids, topk_weights, out, topk_ids.stride(0),
        topk_weights.stride(0), out.stride(0), w2.stride(0), s2.stride(0), H=H, I=I,
        TOPK=top_k, KP=kp, N_ROUTED=n_routed, BN=g2, FMT=fmt, ACT_Q=act, SILU_IN=sk > 1,
        num_warps=cfg["GW2"], num_stages=cfg["GS2"])
    return out
