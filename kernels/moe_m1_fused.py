"""Small-M 4-bit MoE in ONE launch: the per-pair gate_up and the all-pairs down, the down's
weights requested while the gate_up runs.

Used by kernels/moe_small_m.py when config "FUSE" is on (with "M1", the per-pair gate_up).
At M=1 the two-launch path spends ~8 us in the down kernel for ~2 us of bytes: each down program
waits for the gate_up launch to end, then for its weights. Here the down programs are part of
the gate_up's grid, after it: each requests all KP pairs' down weights and scales at once
(moe_small_m_kernels._down_all_tile), then waits on a device counter that every gate_up program
bumps after its act stores, then reads act (through L2) and writes its output rows.

m1_fused(x32, w13, s13v, w2, s2v, ids, tw, act, out, fmt_code, *, top_k, n_shared, R, CH, BN2,
         warps, stages) -> out
- x32, w13, s13v, ids, act, fmt_code, top_k, n_shared, R, CH: as kernels/moe_m1_gate_up.m1_gate_up
  (w13 / s13v may be row-tiled);
- w2 int32 [E, H, I/128, 16], s2v its scales (int4 bf16 viewed as int16, MXFP4 e8m0 uint8)
  [E, H, I/32]; tw [M, top_k] fp32 routing weights (unit column stride); out [M, H] bf16 / fp32
  (unit column stride); BN2 output rows per down program (a power of 2 dividing H); down 1:
  each down program walks the KP pairs (as moe_small_m_kernels._down_kernel), 2: all at once
  (as _down_all_kernel, config DW).
Grid (G + D,): programs 0 .. G-1 are m1_gate_up's (G = M * KP * 2I / R), programs G .. G+D-1
the down tiles (D = M * H / BN2), in that order. Deadlock freedom rests on the GPU starting
programs in increasing id order (as decoupled look-back scans assume): a down program only
waits once every gate_up program has been started, and gate_up programs never wait. The
counter pair (ready, exited) is cached per device and left at zero by every launch (the last
down program to leave resets it): calls on different streams of one device must not overlap
(the engine uses one stream per device). Under the Triton interpreter programs run one after
another in id order, so the wait is always already satisfied.
Results equal the two-launch path's (down 2: with DW=1) bit for bit (same math, same order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_m1_gate_up import _MAGIC, _pair_rows
from .moe_ref import w13_tile
from .moe_small_m_kernels import _down_all_tile, _down_pairs_tile

__all__ = ["m1_fused"]

_COUNTERS: dict = {}


@triton.jit
def _m1_fused_kernel(X, W13, S13, W2, S2, IDS, TW, ACT, OUT, CNT, MAGIC, stride_xm, stride_im,
                     stride_tm, stride_om, stride_w13, stride_s13, stride_w2, stride_s2,
                     I: tl.constexpr, H: tl.constexpr, TOPK: tl.constexpr, KP: tl.constexpr,
                     N_ROUTED: tl.constexpr, R: tl.constexpr, CH: tl.constexpr,
                     FMT: tl.constexpr, WT: tl.constexpr, BN2: tl.constexpr,
                     KP2: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                     DOWN: tl.constexpr):
    """Grid (G + D,): see the module docstring. CNT: int32 [2] = (ready, exited), zero on entry
    and on exit. DOWN 1: the down tile walks the pairs (_down_pairs_tile, as _down_kernel), 2:
    all pairs at once (_down_all_tile, as _down_all_kernel)."""
    pid = tl.program_id(0)
    if pid < G:
        _pair_rows(pid, X, W13, S13, IDS, ACT, MAGIC, stride_xm, stride_im, stride_w13,
                   stride_s13, I, H, TOPK, KP, N_ROUTED, R, CH, FMT, WT)
        tl.debug_barrier()  # every warp's act stores precede the (one-thread, release) atomic
        tl.atomic_add(CNT, 1, sem="release", scope="gpu")
    else:
        NT: tl.constexpr = H // BN2
        d = pid - G
        if DOWN == 2:
            _down_all_tile(d // NT, d % NT, ACT, W2, S2, IDS, TW, OUT, MAGIC, stride_im,
                           stride_tm, stride_om, stride_w2, stride_s2, CNT, G, H, I, TOPK, KP,
                           N_ROUTED, BN2, FMT, KP2, 2)
        else:
            _down_pairs_tile(d // NT, d % NT, ACT, W2, S2, IDS, TW, OUT, MAGIC, stride_im,
                             stride_tm, stride_om, stride_w2, stride_s2, CNT, G, H, I, TOPK,
                             KP, N_ROUTED, BN2, FMT, 2)
        # every down program has passed the wait once the last one gets here: reset for the
        # next launch (stream order makes the reset visible to it)
        if tl.atomic_add(CNT + 1, 1, sem="acq_rel", scope="gpu") == D - 1:
            tl.atomic_xchg(CNT, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(CNT + 1, 0, sem="relaxed", scope="gpu")


def _counters(device: torch.device) -> torch.Tensor:
    """The (ready, exited) int32 pair of a device: zeroed once, never freed (graphs keep its
    pointer), left at zero by every launch."""
    key = (device.type, device.index)
    buf = _COUNTERS.get(key)
    if buf is None:
        buf = _COUNTERS[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return buf


def m1_fused(x32: torch.Tensor, w13: torch.Tensor, s13v: torch.Tensor, w2: torch.Tensor,
             s2v: torch.Tensor, ids: torch.Tensor, tw: torch.Tensor, act: torch.Tensor,
             out: torch.Tensor, fmt_code: int, *, top_k: int, n_shared: int = 0, R: int = 4,
             CH: int = 8, BN2: int = 16, warps: int = 4, stages: int = 1,
             down: int = 1) -> torch.Tensor:
    """Launch the fused gate_up + down (module docstring) for the M = ids.shape[0] tokens and
    return out. No allocation after the first call per device, no host sync. The weights are
    trusted to be checked by the caller (moe_small_m._check); tiles, act and strides are checked
    here."""
    wt = w13_tile(w13, s13v)
    E, nt, nc = w13.shape[:3]
    two_i = nt * wt
    H, I, kp, M = nc * 128, two_i // 2, top_k + n_shared, ids.shape[0]
    if (R < 2 or R & (R - 1) or I % (R // 2) or CH & (CH - 1) or nc % CH or BN2 & (BN2 - 1)
            or H % BN2):
        raise ValueError(f"m1_fused: R={R}, CH={CH}, BN2={BN2} do not tile H={H}, I={I}")
    if (tuple(act.shape) != (M * kp, I) or act.dtype != torch.float32
            or not act.is_contiguous()):
        raise ValueError(f"m1_fused: act {act.dtype} {tuple(act.shape)}: want fp32 "
                         f"[{M * kp}, {I}]")
    if (x32.shape[0] != M or x32.stride(1) != 1 or (top_k and ids.stride(1) != 1)
            or tuple(out.shape) != (M, H) or out.stride(1) != 1
            or (top_k and tw.stride(1) != 1)):
        raise ValueError(f"m1_fused: x {tuple(x32.shape)} / ids {tuple(ids.shape)} / out "
                         f"{tuple(out.shape)}: want [{M}, .] with unit column strides")
    G, D = M * kp * two_i // R, M * H // BN2
    _m1_fused_kernel[(G + D,)](
        x32, w13, s13v, w2, s2v, ids, tw, act, out, _counters(x32.device), _MAGIC,
        x32.stride(0), ids.stride(0), tw.stride(0), out.stride(0), w13.stride(0),
        s13v.stride(0), w2.stride(0), s2v.stride(0), I=I, H=H, TOPK=top_k, KP=kp,
        N_ROUTED=E - n_shared, R=R, CH=CH, FMT=fmt_code, WT=wt, BN2=BN2,
        KP2=triton.next_power_of_2(kp), G=G, D=D, DOWN=down, num_warps=warps,
        num_stages=stages)
    return out
