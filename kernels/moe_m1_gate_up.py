"""Per-pair gate_up of the small-M 4-bit MoE: one launch, full K per program, no split-K, no scans.

Used by kernels/moe_small_m.py when config "M1" is on: by default at M == 1
(ATOM_STREAM_MOE_M1_KERNEL=0 turns that off) and at 2 <= M <= ATOM_STREAM_MOE_PAIR_M_MAX
(default 1: never). It replaces the small-M _gate_up_kernel and feeds the small-M down kernel
unchanged. The structure is the measurement ladder's rung L4 (kernels/moe_gemv_ladder.py,
bench/notes_moe_gemv_ladder.md; measured there at R4 SK1 CH8 W4: 10.3 us int4, 11.6 us MXFP4,
vs 12.9-14.0 us at the small-M kernel's own tile).

m1_gate_up(x32, w13, s13v, ids, act, fmt_code, *, top_k, n_shared, R, CH, warps, stages, pdl)
- x32: the M tokens' hidden bf16 [M, H] viewed as int32 [M, H/2] (bf16 pairs, unit column
  stride, even row stride and offset: any row stride);
- w13 int32 [E, 2I, H/128, 16] (gate rows then up rows, repack_int4_moe / repack_mxfp4_moe
  layout, kernels/moe_ref.py); s13v: int4 bf16 scales [E, 2I, H/32] viewed as int16, or MXFP4
  e8m0 uint8 [E, 2I, H/32]; fmt_code INT4 / MXFP4 (kernels/moe_small_m_kernels.py); or both
  as row-tiled copies (fused_moe.tile_w13: [E, 2I/T, H/128, T, 16 | 4]);
- ids [M, top_k] int32/int64, unit column stride; pair p = m * KP + k (KP = top_k + n_shared):
  k < top_k is expert ids[m, k], k >= top_k the shared expert E - n_shared + k - top_k
  (moe_align.pair_expert);
- act fp32 [M * KP, I], written whole: act[p] = silu(gate_e x_m) * up_e x_m in the DOWN order
  of moe_small_m_kernels._store_act (channel n at (n//32)*32 + (n%2)*16 + (n%32)//2), exactly
  what the small-M down kernel reads for token m's pairs (rows m * KP .. m * KP + KP - 1).
Grid (M * KP * 2I / R,): program (p, rt) owns R/2 gate rows and the matching R/2 up rows of
pair p's expert over the full K, with token m = p // KP's x row, in H / (128 CH)
double-buffered steps of a [R, CH, 4, 4] int32 tile. Every pair computes its own act row, so a
repeated expert id (inside a token: expert parallelism; across tokens: M > 1) is right without
any duplicate scan (it just reads that expert again). At M == 1 this is the M=1 kernel as it
was (m = 0). Grid a function of (M, top_k, n_shared, I, R) only: CUDA-graph capturable. R: a
power of 2 >= 2 with I % (R/2) == 0; CH: a power of 2 dividing H/128.
The jit helpers (_act_pos, _gate_up_rows, _tile_ptrs, _rows_dot, _silu_store) are the ladder's
rung L3/L4 code, moved here; kernels/moe_gemv_ladder.py imports them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fused_moe_common import _wrow
from .moe_align import pair_expert
from .moe_ref import w13_tile
from .moe_small_m_kernels import (
    _dot8,
    _prep,
    _scale_ptrs,
    _scales,
    _sel4,
    _x4,
    gdc_launch_dependents,
)

__all__ = ["m1_gate_up"]

_MAGIC = 0x4B000000  # fp32 2^23: a run-time argument on purpose (moe_small_m_kernels._prep)


@triton.jit
def _act_pos(n):
    """Position of channel n in an act row in the down order (moe_small_m_kernels._store_act)."""
    return (n // 32) * 32 + (n % 2) * 16 + (n % 32) // 2


@triton.jit
def _gate_up_rows(rt, I: tl.constexpr, R: tl.constexpr):
    """int64 [R]: gate rows rt*R/2 .. rt*R/2 + R/2 - 1, then the matching up rows (+ I)."""
    HR: tl.constexpr = R // 2
    r = tl.arange(0, R)
    return tl.where(r >= HR, I + rt * HR + r - HR, rt * HR + r).to(tl.int64)


@triton.jit
def _tile_ptrs(W, S, e, rows, stride_we, stride_se, H: tl.constexpr, R: tl.constexpr,
               CH: tl.constexpr, WT: tl.constexpr = 1):
    """(weight pointers [R, CH, 4, 4] int32, scale pointers [R, CH, 4, 4]) of step 0 of rows
    `rows` [R] of expert e (int64); step `it` is + it * CH * WT * 16 / + it * CH * WT * 4 (WT:
    rows per tile of the words / scales, 1 = row-major: fused_moe_common._wrow)."""
    c4 = tl.arange(0, CH)[None, :, None, None]
    t4 = 4 * tl.arange(0, 4)[None, None, :, None] + tl.arange(0, 4)[None, None, None, :]
    Wp = (W + e * stride_we + _wrow(rows, H // 128, WT, 16)[:, None, None, None]
          + c4 * (WT * 16) + t4)
    Sp = _scale_ptrs(S + e * stride_se + _wrow(rows, H // 128, WT, 4), R, CH, WT * 4)
    return Wp, Sp


@triton.jit
def _rows_dot(X, Wp, Sp, it0, MAGIC, R: tl.constexpr, CH: tl.constexpr, NIT: tl.constexpr,
              FMT: tl.constexpr, WT: tl.constexpr = 1):
    """fp32 [R]: the dequantized weight rows at Wp / Sp (_tile_ptrs) dotted with x (X: the
    token's row, int32 bf16 pairs) over steps it0 .. it0 + NIT - 1 (128 CH channels each).
    Explicit double buffering as in the small-M kernel: step it+1's loads (predicated off after
    the last step; x's index wraps) are issued before step it's arithmetic."""
    w_n = tl.load(Wp + it0 * (CH * WT * 16))
    s_n = tl.load(Sp + it0 * (CH * WT * 4))
    a0, a1, a2, a3 = _x4(X, 0, it0, R, CH)
    acc = tl.zeros((R, CH, 4), tl.float32)
    for it in range(it0, it0 + NIT):
        more = (tl.zeros((1,), tl.int32) + it + 1) < it0 + NIT  # a tensor (interpreter)
        w = w_n
        s = s_n
        xa0, xa1, xa2, xa3 = a0, a1, a2, a3
        w_n = tl.load(Wp + (it + 1) * (CH * WT * 16), mask=more, other=0)
        s_n = tl.load(Sp + (it + 1) * (CH * WT * 4), mask=more, other=0)
        a0, a1, a2, a3 = _x4(X, 0, it0 + (it + 1 - it0) % NIT, R, CH)
        wl, wh = _prep(w, MAGIC, FMT)
        for j in tl.static_range(4):
            acc += _dot8(wl, wh, _sel4(xa0, xa1, xa2, xa3, j), j, FMT) * _scales(s, j, FMT)
    return tl.sum(tl.sum(acc, axis=2), axis=1)


@triton.jit
def _silu_store(ACT_ROW, y, rt, HR: tl.constexpr):
    """y [2 HR] = (gate sums, up sums) of _gate_up_rows(rt) -> silu(gate) * up (fp32) stored
    at channels rt*HR .. rt*HR + HR - 1 of the act row ACT_ROW, in the down order."""
    g, u = tl.split(tl.permute(tl.reshape(y, (2, HR)), (1, 0)))
    a = g / (1.0 + tl.exp(-g)) * u
    tl.store(ACT_ROW + _act_pos(rt * HR + tl.arange(0, HR)), a)


@triton.jit
def _m1_gate_up_kernel(X, W, S, IDS, ACT, MAGIC, stride_xm, stride_im, stride_we, stride_se,
                       I: tl.constexpr, H: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                       N_ROUTED: tl.constexpr, R: tl.constexpr, CH: tl.constexpr,
                       FMT: tl.constexpr, PDL: tl.constexpr, WT: tl.constexpr = 1):
    """Grid (M * KP * 2I / R,). See the module docstring. PDL=1: the down kernel (a programmatic
    dependent launch) may start now; it reads act only after griddepcontrol.wait. WT: rows per
    tile of the words / scales (1: row-major)."""
    if PDL:
        gdc_launch_dependents()
    NRT: tl.constexpr = 2 * I // R
    pid = tl.program_id(0)
    p = pid // NRT  # pair m * KP + k
    rt = pid % NRT
    e = pair_expert(IDS, stride_im, p, p >= 0, TOPK, KP, N_ROUTED).to(tl.int64)
    Wp, Sp = _tile_ptrs(W, S, e, _gate_up_rows(rt, I, R), stride_we, stride_se, H, R, CH, WT)
    xm = X + (p // KP).to(tl.int64) * stride_xm  # token m's x row
    y = _rows_dot(xm, Wp, Sp, 0, MAGIC, R, CH, H // (128 * CH), FMT, WT)
    _silu_store(ACT + p.to(tl.int64) * I, y, rt, R // 2)


def m1_gate_up(x32: torch.Tensor, w13: torch.Tensor, s13v: torch.Tensor, ids: torch.Tensor,
               act: torch.Tensor, fmt_code: int, *, top_k: int, n_shared: int = 0, R: int = 4,
               CH: int = 8, warps: int = 4, stages: int = 1, pdl: int = 0) -> torch.Tensor:
    """Launch the per-pair gate_up (module docstring) for the M = ids.shape[0] tokens and
    return act. No allocation, no host sync. Inputs are trusted to be checked by the caller
    (moe_small_m._check) except the tile, act and the unit column strides. w13 / s13v may be
    the row-tiled copies ([E, 2I / T, H / 128, T, 16] / [E, 2I / T, H / 128, T, 4]:
    fused_moe.tile_w13)."""
    wt = w13_tile(w13, s13v)
    E, nt, nc = w13.shape[:3]
    two_i = nt * wt
    H, I, kp, M = nc * 128, two_i // 2, top_k + n_shared, ids.shape[0]
    if R < 2 or R & (R - 1) or I % (R // 2) or CH & (CH - 1) or nc % CH:
        raise ValueError(f"m1_gate_up: R={R}, CH={CH} do not tile H={H}, I={I}")
    if (tuple(act.shape) != (M * kp, I) or act.dtype != torch.float32
            or not act.is_contiguous()):
        raise ValueError(f"m1_gate_up: act {act.dtype} {tuple(act.shape)}: want fp32 "
                         f"[{M * kp}, {I}]")
    if x32.shape[0] != M or x32.stride(1) != 1 or (top_k and ids.stride(1) != 1):
        raise ValueError(f"m1_gate_up: x {tuple(x32.shape)} / ids {tuple(ids.shape)}: want "
                         f"[{M}, H/2] and unit column strides")
    _m1_gate_up_kernel[(M * kp * two_i // R,)](
        x32, w13, s13v, ids, act, _MAGIC, x32.stride(0), ids.stride(0), w13.stride(0),
        s13v.stride(0), I=I, H=H, TOPK=top_k, KP=kp, N_ROUTED=E - n_shared, R=R, CH=CH,
        FMT=fmt_code, PDL=pdl, WT=wt, num_warps=warps, num_stages=stages)
    return act
