"""Small-M fused MoE for 4-bit experts (repacked int4 g32 / MXFP4), weight-only, on CUDA cores.

moe_small_m(hidden [M, H] bf16, w13, w2, s13, s2, topk_weights [M, k] fp32,
            topk_ids [M, k] int32/int64, fmt="int4"|"mxfp4", config=None, *, n_shared=0,
            out=None) -> out [M, H] bf16
    out[m] = sum_k topk_weights[m, k] * down_e(silu(gate_e x_m) * up_e x_m), e = topk_ids[m, k]
           + the n_shared shared experts (the last n_shared of w13/w2, weight 1.0),
exactly kernels/moe_ref.fused_moe_ref on the dequantized weights (fp32 accumulation, the
intermediate activation kept in fp32, one bf16 rounding at the end). A token may repeat an
expert id (expert parallel maps other ranks' picks to a local expert at weight 0): every
(token, column) pair counts once with its own weight.

Weights: the SAME tensors fused_moe takes (kernels/fused_moe.py, layouts in kernels/moe_ref.py):
- w13 int32 [E, 2I, H/128, 16] (gate rows then up rows), w2 int32 [E, H, I/128, 16], the kernel
  layout of repack_int4_moe / repack_mxfp4_moe;
- int4: s13 bf16 [E, 2I, H/32], s2 bf16 [E, H, I/32]; mxfp4: e8m0 uint8 scales, same shapes;
- or w13 and s13 row-tiled (fused_moe.tile_w13: [E, 2I/T, H/128, T, 16] / [.., T, 4]).
H % 128 == 0, I % 128 == 0, all contiguous.

Two launches, no host sync, grid a function of (M, top_k, config) only (CUDA/HIP-graph
capturable), kernels in kernels/moe_small_m_kernels.py:
1. gate_up, grid (P = M * KP pairs, I / BN, SK): program (b, jt, ks) works only when pair b is the
   first pair of its expert e; it compacts the tokens routed to e on the device and walks them in
   tiles of BT, so each weight tile is read once per BT tokens of its expert (not once per pair);
   rows: BN gate + BN up rows; K: H / SK. SK == 1 writes silu(gate) * up into act [P, I] fp32 for
   every pair of e; SK > 1 writes fp32 partials to a workspace and the last of the SK programs
   (an acq_rel atomic on a per-(b, jt) semaphore that it resets to 0) sums them.
2. down, grid (M, H / BN2): each program sums its token's KP pairs (routing weight folded into
   the group scale) and writes out[m, tile].
With config "M1" on, launch 1 is the per-pair gate_up of kernels/moe_m1_gate_up.py instead (the
ladder's rung L4: grid P * 2I / MR, MR/2 gate + MR/2 up rows of one pair's expert per program
over the full K in CH-chunk steps, no split-K, no semaphores, no duplicate scan: every pair
computes its own act row, a repeated expert is read again); same act, same down. Default on at
M == 1 (env ATOM_STREAM_MOE_M1_KERNEL=0 turns it off: H200, bench/RESULTS.md session 4: 24.0 ->
19.8 us int4, decode step B=1 6.46 -> 6.33 ms) and at 2 <= M <= PAIR_M_MAX (env
ATOM_STREAM_MOE_PAIR_M_MAX, default 8; 1 = nowhere; kernels/fused_moe.py then routes 4-bit
weight-only calls up to that M here; A/B: bench/moe_small_m.py --pair-m). The down kernel's
grid (M, H / BN2) and act [P, I] have no limit in M (tested up to 32, CUDA graphs included).
The semaphore buffer is cached per device and size class (never freed) and left all-zero by
every launch: calls with SK > 1 that may run concurrently on different streams of one device
would share it (not the case in the engine: one stream per device).
config (overrides of default_config): M1, MR (the per-pair kernel's switch, at any M, and rows per
program; it also takes CH, W1, S1, PDL), BN, CH (128-K chunks per step), SK, BT, W1 (warps), BN2,
W2, S1/S2 (num_stages), MC/PC (token / pair chunk of the id scans, powers of 2); candidates, default
0 = off until an H200 A/B (bench/moe_small_m.py --sweep, bench/notes_moe_small_m.md): VT=1 gate_up
epilogue / split-K tail read a token's ids as one vector (no chain of KP dependent loads), DW=1 the
down kernel requests all KP pairs' weights at once (_down_all_kernel), PDL=1 the down kernel is a
programmatic dependent launch (its weight loads overlap the gate_up's tail; act is read after
griddepcontrol.wait; CUDA only, never under the interpreter); "poison": True fills act with NaN
first (tests); "stop_after": "gate_up" (benchmarks). out may be given in bf16 (the contract) or fp32
(exactness checks: no final rounding).
"""

from __future__ import annotations

import torch
import triton

from .. import envs
from .moe_ref import w13_tile
from .moe_small_m_kernels import INT4, MXFP4, _down_all_kernel, _down_kernel, _gate_up_kernel

__all__ = ["default_config", "moe_small_m", "moe_small_m_ref"]

_FMTS = {"int4": INT4, "int4_g32": INT4, "mxfp4": MXFP4}
_SEMS: dict = {}
_MAGIC = 0x4B000000  # fp32 2^23: a run-time argument on purpose (moe_small_m_kernels._prep)
# M == 1 takes kernels/moe_m1_gate_up.py for the gate_up (config "M1"'s default; H200 A/B:
# bench/moe_small_m.py --m1-kernel, bench/RESULTS.md session 4)
M1_KERNEL = envs.flag("ATOM_STREAM_MOE_M1_KERNEL")
# 2 <= M <= PAIR_M_MAX take it too (and fused_moe sends them here). Default 8 from the H200 runs
# (bench/RESULTS.md session 4): kernel 1.12-1.42x at M = 2..8, a tie at 16 (int4; MXFP4 0.88x),
# 0.77x at 32; decode step B=4 9.14 -> 8.14 ms, B=8 13.32 -> 10.62 ms. 1 = off.
PAIR_M_MAX = envs.integer("ATOM_STREAM_MOE_PAIR_M_MAX")
_INTERP = envs.triton_interpreted()  # read once (tests reload kernel modules per mode)


def default_config(M: int, H: int, I: int, top_k: int, wt: int = 1) -> dict:
    """Choices predicted before the first H200 run and kept by it (bench/notes_moe_small_m.md;
    measured int4 M=1 25.2 us, SK=1 25.4, BN2=16 24.8; M=4 BN 4 72.4, BN 8 71.1): at M = 1
    split-K 7 over H (1792 gate_up programs of 8 KB: the whole w13 in flight); larger M: no
    split; 2 tokens per weight pass from M = 33 (an expert gets ~1.1 tokens at M=16, ~1.8 at
    M=64 with top-8/384). wt > 1 (row-tiled w13, fused_moe.tile_w13): the per-pair gate_up reads
    MR/2 consecutive rows x 64 bytes per chunk of a tile, so wider programs: MR 8 at M=1, 16
    above (H200, bench/RESULTS.md session 5: int4 M=1 19.4 / M=4 57.0 / M=8 93.7 us vs 19.1 /
    60.9 / 100.9 row-major at MR 4; at MR 4 the tiled layout was 4-11% slower)."""
    ch = max(c for c in (8, 4, 2, 1) if (H // 128) % c == 0)
    niter = H // (128 * ch)
    sk = max(d for d in range(1, 9) if niter % d == 0) if M == 1 else 1
    bt = 1 if M <= 32 else 2  # ~1.1 tokens per expert at M=16: a 2-token pass is half empty
    # M = 1: 8 gate + 8 up rows (72 registers); else 4 + 4 rows (~120 registers instead of
    # ~245: 4 CTAs of 4 warps per SM instead of 2, for the ALU-bound M >= 4; sm_90 SASS)
    bn = max(b for b in ((8, 4, 2, 1) if M == 1 else (4, 2, 1)) if I % b == 0)
    # BN2 16 at M=1: 24.8-25.0 vs 25.2-25.9 µs (int4), 24.6-24.9 vs 26.6-26.9 (mxfp4) in two
    # H200 runs (bench/RESULTS.md, session 3); 32 elsewhere
    bn2 = max(b for b in ((16, 8, 4, 2, 1) if M == 1 else (32, 16, 8, 4, 2, 1)) if H % b == 0)
    # M1 / MR: the per-pair gate_up kernel (ladder L4 at R4 SK1 CH8 W4: 10.3 us int4, 11.6
    # MXFP4 at M=1)
    m1 = (M == 1 and M1_KERNEL) or 1 < M <= PAIR_M_MAX
    mr = 4 if wt == 1 else (8 if M == 1 else 16)
    # W2 2 at M=2: the down's [32, 2, 4, 4] tile in 16 words per thread (105 registers, sm_90;
    # 4 warps: 64); H200 (bench/RESULTS.md session 15, two runs): int4 30.7 / 31.3 -> 29.8 /
    # 30.3 us, MXFP4 34.3 / 34.5 -> 33.0 / 32.6; at M=1 (BN2 16) 4-8 % slower
    w2 = 2 if M == 2 else 4
    return {"BN": bn, "CH": ch, "SK": sk, "BT": bt, "W1": 4, "BN2": bn2, "W2": w2, "S1": 1, "S2": 1,
            "VT": 0, "DW": 0, "PDL": 0, "M1": int(m1), "MR": mr}


def _semaphores(n: int, device: torch.device) -> torch.Tensor:
    """A zeroed int32 buffer of >= n split-K semaphores, cached per (device, size class) and
    never freed: the kernel leaves it all-zero, and a CUDA graph that captured it keeps a valid
    pointer (a buffer that grows is a new one; the old stays alive for its graphs)."""
    size = max(4096, triton.next_power_of_2(n))
    key = (device.type, device.index, size)
    buf = _SEMS.get(key)
    if buf is None:
        buf = torch.zeros(size, dtype=torch.int32, device=device)
        _SEMS[key] = buf
    return buf


def _check(hidden, w13, w2, s13, s2, topk_weights, topk_ids, fmt):
    if fmt not in _FMTS:
        raise NotImplementedError(f"moe_small_m: fmt={fmt!r} (int4 or mxfp4)")
    if hidden.dtype != torch.bfloat16 or hidden.dim() != 2:
        raise NotImplementedError(f"moe_small_m: hidden must be bf16 [M, H], got {hidden.dtype}")
    if (w13.dtype != torch.int32 or w13.dim() not in (4, 5) or w2.dtype != torch.int32
            or w2.dim() != 4):
        raise NotImplementedError("moe_small_m: weights must be in the repacked kernel layout "
                                  "(repack_int4_moe / repack_mxfp4_moe, w13 maybe tile_w13's)")
    M, H = hidden.shape
    T = w13_tile(w13, s13)
    E, two_i = w13.shape[0], w13.shape[1] * T
    I = two_i // 2
    w13_tail = (H // 128, T, 16) if T > 1 else (H // 128, 16)
    if (w13.shape[2] * 128 != H or tuple(w13.shape[2:]) != w13_tail
            or tuple(w2.shape) != (E, H, I // 128, 16) or I % 128 or two_i % 2):
        raise ValueError(f"moe_small_m: w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} vs H={H}")
    sdt = torch.bfloat16 if _FMTS[fmt] == INT4 else torch.uint8
    s13_shape = (E, two_i // T, H // 128, T, 4) if T > 1 else (E, two_i, H // 32)
    for s, want, name in ((s13, s13_shape, "s13"), (s2, (E, H, I // 32), "s2")):
        if s.dtype != sdt or tuple(s.shape) != want:
            raise ValueError(f"moe_small_m: {name} {s.dtype} {tuple(s.shape)}: want {sdt} "
                             f"{list(want)}")
    for t in (w13, w2, s13, s2):
        if not t.is_contiguous():
            raise ValueError("moe_small_m: weights and scales must be contiguous")
    if topk_ids.shape != topk_weights.shape or topk_ids.shape[0] != M:
        raise ValueError(f"moe_small_m: topk {tuple(topk_ids.shape)} / "
                         f"{tuple(topk_weights.shape)} vs M={M}")
    return M, H, E, I, T


def moe_small_m(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, s13: torch.Tensor,
                s2: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                fmt: str = "int4", config: dict | None = None, *, n_shared: int = 0,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """See the module docstring."""
    M, H, E, I, wt = _check(hidden, w13, w2, s13, s2, topk_weights, topk_ids, fmt)
    code = _FMTS[fmt]
    top_k = topk_ids.shape[1]
    kp = top_k + n_shared
    P = M * kp
    if out is None:
        out = torch.empty(M, H, dtype=hidden.dtype, device=hidden.device)
    elif (tuple(out.shape) != (M, H) or out.dtype not in (torch.bfloat16, torch.float32)
          or out.stride(1) != 1):
        raise ValueError(f"moe_small_m: out {out.dtype} {tuple(out.shape)}: want bf16/fp32 "
                         f"[{M}, {H}] with unit column stride")
    if M == 0:
        return out
    cfg = dict(default_config(M, H, I, top_k, wt), **(config or {}))
    bn, ch, sk, bt, bn2 = cfg["BN"], cfg["CH"], cfg["SK"], cfg["BT"], cfg["BN2"]
    m1 = bool(cfg.get("M1"))  # the per-pair gate_up (SK, BN, BT are the other kernel's)
    if (I % bn or (H // 128) % ch or (not m1 and (H // (128 * ch)) % sk) or H % bn2
            or bt not in (1, 2)):
        raise ValueError(f"moe_small_m: config {cfg} does not tile H={H}, I={I}")
    for key in ("BN", "CH", "BN2", "MC", "PC"):
        v = cfg.get(key)
        if v and v & (v - 1):
            raise ValueError(f"moe_small_m: config {key}={v} is not a power of 2")
    if hidden.stride(1) != 1 or hidden.stride(0) % 2 or hidden.storage_offset() % 2:
        # the kernel reads bf16 pairs as int32 (clone: contiguous() keeps an odd offset)
        hidden = hidden.clone(memory_format=torch.contiguous_format)
    x32 = hidden.view(torch.int32)  # bf16 pairs
    ids = topk_ids.contiguous()
    tw = topk_weights.contiguous()
    dev = hidden.device
    # scales as integers (int4: bf16 bits as int16; MXFP4: e8m0 uint8)
    v13, v2 = (s13.view(torch.int16), s2.view(torch.int16)) if code == INT4 else (s13, s2)
    act = torch.empty(P, I, dtype=torch.float32, device=dev)
    if cfg.get("poison"):
        act.fill_(float("nan"))
    if sk > 1 and not m1:
        part = torch.empty(sk, P, 2 * I, dtype=torch.float32, device=dev)
        sem = _semaphores(P * (I // bn), dev)
    else:
        part = sem = act  # unused
    mc = cfg.get("MC") or min(triton.next_power_of_2(max(M, 1)), 64)  # token chunk, id scans
    pc = cfg.get("PC") or min(triton.next_power_of_2(max(P, 2)), 256)  # pair chunk
    kp2 = triton.next_power_of_2(kp)
    pdl = 1 if cfg.get("PDL") and dev.type == "cuda" and not _INTERP else 0
    stop = cfg.get("stop_after") == "gate_up"
    if m1:
        from .moe_m1_gate_up import m1_gate_up  # lazy: imported (decorated) only when used
        m1_gate_up(x32, w13, v13, ids, act, code, top_k=top_k, n_shared=n_shared, R=cfg["MR"],
                   CH=ch, warps=cfg["W1"], stages=cfg["S1"], pdl=0 if stop else pdl)
    else:
        _gate_up_kernel[(P, I // bn, sk)](
            x32, w13, v13, ids, act, part, sem, M, _MAGIC, x32.stride(0), ids.stride(0),
            w13.stride(0), v13.stride(0), I=I, H=H, TOPK=top_k, KP=kp, N_ROUTED=E - n_shared,
            BN=bn, CH=ch, SK=sk, BT=1 if M == 1 else bt, MC=mc, PC=pc, FMT=code, EARLY=M == 1,
            VT=1 if cfg.get("VT") else 0, KP2=kp2, PDL=0 if stop else pdl, WT=wt,
            num_warps=cfg["W1"], num_stages=cfg["S1"])
    if stop:
        return out
    args = (act, w2, v2, ids, tw, out, _MAGIC, ids.stride(0), tw.stride(0), out.stride(0),
            w2.stride(0), v2.stride(0))
    meta = {"H": H, "I": I, "TOPK": top_k, "KP": kp, "N_ROUTED": E - n_shared, "BN": bn2,
            "FMT": code, "PDL": pdl, "num_warps": cfg["W2"], "num_stages": cfg["S2"]}
    if pdl:
        meta["launch_pdl"] = True
    if cfg.get("DW"):
        _down_all_kernel[(M, H // bn2)](*args, KP2=kp2, **meta)
    else:
        _down_kernel[(M, H // bn2)](*args, **meta)
    return out


def _dequant(w: torch.Tensor, s: torch.Tensor, fmt: str) -> torch.Tensor:
    from .moe_ref import dequant_int4, dequant_mxfp4, unrepack_int4, unrepack_mxfp4, untile_rows
    if w.dim() == 4:  # one expert's row-tiled w13 and scales
        w, s = untile_rows(w), untile_rows(s).flatten(-2)
    if _FMTS[fmt] == INT4:
        return dequant_int4(unrepack_int4(w), s)
    return dequant_mxfp4(unrepack_mxfp4(w), s)


def moe_small_m_ref(hidden, w13, w2, s13, s2, topk_weights, topk_ids, fmt="int4", *,
                    n_shared: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """kernels/moe_ref.fused_moe_ref's math on the repacked weights, dequantizing only the
    experts the routing touches (so the real 384-expert shapes fit), in `dtype`, on hidden's
    device. Returns [M, H] in `dtype`."""
    import torch.nn.functional as F

    from .moe_ref import with_shared
    E = w13.shape[0]  # (w13 / s13 may be row-tiled: _dequant)
    tw, ids = with_shared(topk_weights, topk_ids, E - n_shared, n_shared)
    I = w2.shape[2] * 128
    xd = hidden.to(dtype)
    out = torch.zeros(hidden.shape[0], w2.shape[1], dtype=dtype, device=hidden.device)
    for e in ids.unique().tolist():
        tok, kk = (ids == e).nonzero(as_tuple=True)
        h = xd[tok] @ _dequant(w13[e], s13[e], fmt).to(dtype).T
        a = F.silu(h[:, :I]) * h[:, I:]
        y = a @ _dequant(w2[e], s2[e], fmt).to(dtype).T
        out.index_add_(0, tok, y * tw[tok, kk].to(dtype)[:, None])
    return out
