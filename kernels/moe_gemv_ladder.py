"""M=1 MoE GEMV measurement ladder (bench/moe_gemv_ladder.py, bench/notes_moe_gemv_ladder.md).

Not used by the model: each rung is the previous one plus ONE piece of the real M=1 gate_up /
down work, so that the H200 time each piece adds can be read off a table. All rungs share the
read probe's simple shape (bench/moe_read_probe.py): a program owns R weight rows of ONE expert
over a K chunk, the expert id is loaded on the device from ids, no semaphores, no token scans.
The per-step tile, the int4 magic-number / MXFP4 dequant, the scale and x tiles are the small-M
kernel's own helpers (kernels/moe_small_m_kernels.py), so a rung runs those exact instructions;
L3/L4's loop and L4's epilogue are the production M=1 gate_up's (kernels/moe_m1_gate_up.py).

Shapes (one token): x bf16 [H] (or [1, H]); ids int32 [TOPK] (distinct or not: every column is
its own pair); tw fp32 [TOPK] routing weights. Weights in the kernel layout of kernels/moe_ref.py:
w13 int32 [E, 2I, H/128, 16] (gate rows, then up rows), w2 int32 [E, H, I/128, 16]; scales s13
[E, 2I, H/32], s2 [E, H, I/32]: bf16 (fmt "int4") or e8m0 uint8 ("mxfp4"). H % 128 == 0,
I % 128 == 0 (w2's K), all contiguous.

gate_up_rung(level, ...): grid (TOPK * 2I/R, SK); program (k, row tile, ks) walks K chunk ks
(H/SK channels) in NIT = H/(128 CH SK) steps of a [R, CH, 4, 4] int32 tile, the next step's tile
prefetched before this step's math (as the small-M kernel does). Output:
  L0 read     int sum of the weight words            -> out int32 [SK, TOPK, 2I] (wrapping)
  L1 unpack   + nibbles -> fp32 (magic-number trick); sum of the unscaled values
              (int4: the q in [-8, 7]; mxfp4: the e2m1 values)
                                                      -> out fp32 [SK, TOPK, 2I]
  L2 scales   + group-32 scales loaded and applied: sum of the dequantized weights  (same out)
  L3 dot      + x: per-row partial dot W_e[row, chunk] . x[chunk]                   (same out)
  L4 gate_up  + the program owns R/2 gate rows and the matching R/2 up rows; act[k, n] =
              silu(gate_n . x) * (up_n . x) -> act fp32 [TOPK, I] in the DOWN order of
              moe_small_m_kernels._store_act (channel n at (n//32)*32 + (n%2)*16 + (n%32)//2;
              act_natural() undoes it). SK == 1: in the same program. SK > 1: the programs
              write L3-style partials to part fp32 [SK, TOPK, 2I] and a second launch
              (_silu_reduce_kernel) sums them and applies silu (no semaphores).
down_rung(level, ...): grid (H/BN,); program jt owns output rows n of every one of the TOPK
experts over the full K = I, walking the pairs with the next pair's tile prefetched (the
small-M _down_kernel's shape):
  D0 read     int sum of the words of the TOPK experts' rows -> y int32 [H]
  D4 down     y[n] = sum_k tw[k] * W2_{ids[k]}[n, :] . act[k, :] -> y fp32 [H]
Every reference below is float64 torch on the dequantized weights (moe_ref helpers).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .moe_m1_gate_up import _act_pos, _gate_up_rows, _rows_dot, _silu_store, _tile_ptrs
from .moe_small_m_kernels import INT4, MXFP4, _dot8f, _dq, _prep, _scale_ptrs, _scales, _split4

__all__ = ["DOWN_LEVELS", "LEVELS", "act_natural", "default_ch", "down_reference", "down_rung",
           "gate_up_reference", "gate_up_rung"]

LEVELS = {0: "read", 1: "unpack", 2: "scales", 3: "dot_x", 4: "gate_up"}
DOWN_LEVELS = {0: "read", 4: "down"}
_FMTS = {"int4": INT4, "mxfp4": MXFP4}
_MAGIC = 0x4B000000  # fp32 2^23, a run-time argument (see moe_small_m_kernels._prep)


@triton.jit
def _sum8(wl, wh, j: tl.constexpr, FMT: tl.constexpr):
    """_dot8 without x: the sum of the 8 unscaled group-j values a thread holds per vector."""
    w0, w1, w2, w3 = _split4(wl)
    h0, h1, h2, h3 = _split4(wh)
    q0, q1 = _dq(w0, h0, j, FMT)
    part = q0 + q1
    q0, q1 = _dq(w1, h1, j, FMT)
    part += q0
    part += q1
    q0, q1 = _dq(w2, h2, j, FMT)
    part += q0
    part += q1
    q0, q1 = _dq(w3, h3, j, FMT)
    part += q0
    part += q1
    return part


@triton.jit
def _unit(j: tl.constexpr, FMT: tl.constexpr):
    """The constant that turns _dq's unscaled values into q (int4) / e2m1 values (MXFP4)."""
    if FMT == 2:
        return 1.0 / (16 ** j)
    else:
        return 16384.0


@triton.jit
def _gu_kernel(X, W, S, IDS, OUT, ACT, MAGIC, stride_we, stride_se,
               I: tl.constexpr, H: tl.constexpr, TOPK: tl.constexpr, R: tl.constexpr,
               CH: tl.constexpr, SK: tl.constexpr, LEVEL: tl.constexpr, FMT: tl.constexpr):
    """Grid (TOPK * 2I/R, SK). See the module docstring (LEVEL 0..4)."""
    NRT: tl.constexpr = 2 * I // R
    NIT: tl.constexpr = H // (128 * CH) // SK
    pid = tl.program_id(0)
    ks = tl.program_id(1)
    k = pid // NRT
    rt = pid % NRT
    it0 = ks * NIT
    e = tl.load(IDS + k).to(tl.int64)  # the dependent id load of the real kernels
    if LEVEL >= 4:  # R/2 gate rows and the matching R/2 up rows
        rows = _gate_up_rows(rt, I, R)
    else:  # R consecutive rows (contiguous bytes at full K)
        rows = (rt * R + tl.arange(0, R)).to(tl.int64)
    Wp, Sp = _tile_ptrs(W, S, e, rows, stride_we, stride_se, H, R, CH)
    if LEVEL >= 3:  # the production M=1 gate_up's loop (kernels/moe_m1_gate_up.py)
        y = _rows_dot(X, Wp, Sp, it0, MAGIC, R, CH, NIT, FMT)
    else:
        w_n = tl.load(Wp + it0 * (CH * 16))
        if LEVEL == 2:
            s_n = tl.load(Sp + it0 * (CH * 4))
        if LEVEL == 0:
            acci = tl.zeros((R, CH, 4, 4), tl.int32)
        else:
            acc = tl.zeros((R, CH, 4), tl.float32)
        for it in range(it0, it0 + NIT):
            # explicit double buffering as in the small-M kernel: step it+1's loads
            # (predicated off after the last step) are issued before step it's arithmetic
            more = (tl.zeros((1,), tl.int32) + it + 1) < it0 + NIT  # a tensor (interpreter)
            w = w_n
            w_n = tl.load(Wp + (it + 1) * (CH * 16), mask=more, other=0)
            if LEVEL == 0:
                acci += w
            else:
                if LEVEL == 2:
                    s = s_n
                    s_n = tl.load(Sp + (it + 1) * (CH * 4), mask=more, other=0)
                wl, wh = _prep(w, MAGIC, FMT)
                for j in tl.static_range(4):
                    if LEVEL == 1:
                        acc += _sum8(wl, wh, j, FMT) * _unit(j, FMT)
                    else:
                        acc += _sum8(wl, wh, j, FMT) * _scales(s, j, FMT)
        if LEVEL == 0:
            y = tl.sum(tl.sum(tl.sum(acci, axis=3), axis=2), axis=1)
        else:
            y = tl.sum(tl.sum(acc, axis=2), axis=1)  # [R]
    if LEVEL < 4 or SK > 1:
        tl.store(OUT + (ks * TOPK + k) * (2 * I) + rows, y)
    else:
        _silu_store(ACT + k * I, y, rt, R // 2)


@triton.jit
def _silu_reduce_kernel(PART, ACT, I: tl.constexpr, TOPK: tl.constexpr, SK: tl.constexpr,
                        BI: tl.constexpr):
    """Grid (TOPK, I/BI): act[k, n] = silu(sum_ks part[ks, k, n]) * sum_ks part[ks, k, I + n],
    stored in the down order (L4 with SK > 1)."""
    k = tl.program_id(0)
    n = tl.program_id(1) * BI + tl.arange(0, BI)
    g = tl.zeros((BI,), tl.float32)
    u = tl.zeros((BI,), tl.float32)
    for ks in tl.static_range(SK):
        g += tl.load(PART + (ks * TOPK + k) * (2 * I) + n)
        u += tl.load(PART + (ks * TOPK + k) * (2 * I) + I + n)
    tl.store(ACT + k * I + _act_pos(n), g / (1.0 + tl.exp(-g)) * u)


@triton.jit
def _down_kernel(ACT, W, S, IDS, TW, Y, MAGIC, stride_we, stride_se,
                 H: tl.constexpr, I: tl.constexpr, TOPK: tl.constexpr, BN: tl.constexpr,
                 LEVEL: tl.constexpr, FMT: tl.constexpr):
    """Grid (H/BN,). See the module docstring (LEVEL 0 or 4)."""
    jt = tl.program_id(0)
    CH: tl.constexpr = I // 128
    n = (jt * BN + tl.arange(0, BN)).to(tl.int64)
    c4 = tl.arange(0, CH)[None, :, None, None]
    t4 = 4 * tl.arange(0, 4)[None, None, :, None] + tl.arange(0, 4)[None, None, None, :]
    rowp = n[:, None, None, None] * (I // 8) + c4 * 16 + t4
    e = tl.load(IDS).to(tl.int64)
    w_n = tl.load(W + e * stride_we + rowp)
    if LEVEL == 0:
        acci = tl.zeros((BN, CH, 4, 4), tl.int32)
    else:
        s_n = tl.load(_scale_ptrs(S + e * stride_se + n * (I // 32), BN, CH))
        acc = tl.zeros((BN, CH, 4), tl.float32)
    for k in tl.static_range(TOPK):
        w = w_n
        if LEVEL > 0:
            s = s_n
        if k + 1 < TOPK:  # prefetch the next pair's tile
            e = tl.load(IDS + k + 1).to(tl.int64)
            w_n = tl.load(W + e * stride_we + rowp)
            if LEVEL > 0:
                s_n = tl.load(_scale_ptrs(S + e * stride_se + n * (I // 32), BN, CH))
        if LEVEL == 0:
            acci += w
        else:
            wt = tl.load(TW + k).to(tl.float32)
            wl, wh = _prep(w, MAGIC, FMT)
            Ap = tl.broadcast_to(ACT + k * I + c4 * 128 + t4, (BN, CH, 4, 4))
            for j in tl.static_range(4):
                part = _dot8f(wl, wh, tl.load(Ap + 32 * j), tl.load(Ap + 32 * j + 16), j, FMT)
                acc += part * (_scales(s, j, FMT) * wt)
    if LEVEL == 0:
        y = tl.sum(tl.sum(tl.sum(acci, axis=3), axis=2), axis=1)
    else:
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
    tl.store(Y + n, y)


def default_ch(H: int, SK: int) -> int:
    """Largest CH in (8, 4, 2, 1) (128-K chunks per step) that tiles H/SK."""
    return max(c for c in (8, 4, 2, 1) if (H // 128) % (c * SK) == 0)


def _sview(s: torch.Tensor, fmt: str) -> torch.Tensor:
    want = torch.bfloat16 if fmt == "int4" else torch.uint8
    if s.dtype != want:
        raise ValueError(f"{fmt} scales must be {want}, got {s.dtype}")
    return s.view(torch.int16) if fmt == "int4" else s


def gate_up_rung(level: int, x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor,
                 ids: torch.Tensor, out: torch.Tensor, *, fmt: str = "int4", R: int = 8,
                 SK: int = 1, CH: int | None = None, warps: int = 4,
                 part: torch.Tensor | None = None) -> torch.Tensor:
    """Launch gate_up rung `level` (see the module docstring) and return out. out: level 0
    int32 [SK, TOPK, 2I]; 1-3 fp32 [SK, TOPK, 2I]; 4 fp32 act [TOPK, I] (down order), and then
    with SK > 1 `part` fp32 [SK, TOPK, 2I] is the workspace. No allocation (graph-capturable)."""
    E, two_i, nc, _ = w13.shape
    H, I, topk = nc * 128, two_i // 2, ids.numel()
    CH = CH or default_ch(H, SK)
    if level not in LEVELS or fmt not in _FMTS:
        raise ValueError(f"gate_up_rung: level {level} / fmt {fmt!r}")
    if (H // 128) % (CH * SK) or (2 * I) % R or R & (R - 1) or CH & (CH - 1) or (
            level == 4 and (R < 2 or I % (R // 2))):
        raise ValueError(f"gate_up_rung: R={R}, SK={SK}, CH={CH} do not tile H={H}, I={I}")
    if tuple(s13.shape) != (E, two_i, H // 32) or x.numel() != H:
        raise ValueError(f"gate_up_rung: s13 {tuple(s13.shape)} / x {tuple(x.shape)} vs H={H}")
    for t in (x, w13, s13, ids, out):
        if not t.is_contiguous():
            raise ValueError("gate_up_rung: tensors must be contiguous")
    if level == 4:
        if tuple(out.shape) != (topk, I) or out.dtype != torch.float32:
            raise ValueError(f"gate_up_rung: act {out.dtype} {tuple(out.shape)}")
        if SK > 1 and (part is None or tuple(part.shape) != (SK, topk, two_i)):
            raise ValueError("gate_up_rung: L4 with SK > 1 needs part fp32 [SK, TOPK, 2I]")
        dst, act = (part, out) if SK > 1 else (out, out)
    else:
        want = torch.int32 if level == 0 else torch.float32
        if tuple(out.shape) != (SK, topk, two_i) or out.dtype != want:
            raise ValueError(f"gate_up_rung: out {out.dtype} {tuple(out.shape)}")
        dst = act = out
    sv = _sview(s13, fmt)
    _gu_kernel[(topk * two_i // R, SK)](
        x.view(torch.int32), w13, sv, ids, dst, act, _MAGIC, w13.stride(0), sv.stride(0),
        I=I, H=H, TOPK=topk, R=R, CH=CH, SK=SK, LEVEL=level, FMT=_FMTS[fmt], num_warps=warps)
    if level == 4 and SK > 1:
        bi = min(I, 128)
        _silu_reduce_kernel[(topk, I // bi)](part, out, I=I, TOPK=topk, SK=SK, BI=bi,
                                             num_warps=4)
    return out


def down_rung(level: int, act: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
              ids: torch.Tensor, tw: torch.Tensor, y: torch.Tensor, *, fmt: str = "int4",
              BN: int = 16, warps: int = 4) -> torch.Tensor:
    """Launch down rung `level` (0 or 4, module docstring): act fp32 [TOPK, I] in the down order
    (what gate_up_rung level 4 writes), tw fp32 [TOPK]; y int32 [H] (D0) or fp32 [H] (D4)."""
    E, H, nc, _ = w2.shape
    I, topk = nc * 128, ids.numel()
    if level not in DOWN_LEVELS or fmt not in _FMTS or H % BN or BN & (BN - 1):
        raise ValueError(f"down_rung: level {level}, fmt {fmt!r}, BN {BN} vs H={H}")
    want = torch.int32 if level == 0 else torch.float32
    if (tuple(act.shape) != (topk, I) or tuple(s2.shape) != (E, H, I // 32)
            or tw.numel() != topk or y.dtype != want or y.numel() != H):
        raise ValueError("down_rung: shapes/dtypes (module docstring)")
    sv = _sview(s2, fmt)
    _down_kernel[(H // BN,)](act, w2, sv, ids, tw, y, _MAGIC, w2.stride(0), sv.stride(0),
                             H=H, I=I, TOPK=topk, BN=BN, LEVEL=level, FMT=_FMTS[fmt],
                             num_warps=warps)
    return y


# ------------------------------------------------------------------------ references
def _deq(w: torch.Tensor, s: torch.Tensor, fmt: str, scaled: bool = True) -> torch.Tensor:
    """Kernel-layout weights [N, K/128, 16] (+ scales [N, K/32]) -> float64 [N, K]."""
    from .moe_ref import dequant_int4, dequant_mxfp4, unrepack_int4, unrepack_mxfp4
    if fmt == "int4":
        q = unrepack_int4(w)
        return (dequant_int4(q, s) if scaled else q.float()).double()
    p = unrepack_mxfp4(w)
    one = torch.full_like(s, 127)
    return dequant_mxfp4(p, s if scaled else one).double()


def act_natural(act: torch.Tensor) -> torch.Tensor:
    """act [..., I] in the down order -> natural channel order."""
    n = torch.arange(act.shape[-1], device=act.device)
    return act[..., (n // 32) * 32 + (n % 2) * 16 + (n % 32) // 2]


def gate_up_reference(level: int, x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor,
                      ids: torch.Tensor, *, fmt: str = "int4", SK: int = 1) -> torch.Tensor:
    """What gate_up_rung(level) computes, float64 (level 0: int32 with wrap-around), on w13's
    device: levels 0-3 [SK, TOPK, 2I], level 4 act [TOPK, I] in the NATURAL order."""
    H = w13.shape[2] * 128
    rows = []
    for e in ids.flatten().tolist():
        if level == 0:
            v = w13[e].to(torch.int64).reshape(w13.shape[1], SK, -1).sum(-1)  # [2I, SK]
            rows.append(((v + 2**31) % 2**32 - 2**31).to(torch.int32).T)
            continue
        d = _deq(w13[e], s13[e], fmt, scaled=level >= 2)  # [2I, H]
        if level >= 3:
            d = d * x.reshape(1, H).double()
        rows.append(d.reshape(d.shape[0], SK, H // SK).sum(-1).T)  # [SK, 2I]
    out = torch.stack(rows, 1)  # [SK, TOPK, 2I]
    if level < 4:
        return out
    h = out.sum(0)
    I = h.shape[1] // 2
    return torch.nn.functional.silu(h[:, :I]) * h[:, I:]


def down_reference(level: int, act: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
                   ids: torch.Tensor, tw: torch.Tensor, *, fmt: str = "int4") -> torch.Tensor:
    """What down_rung(level) computes: int32 [H] (wrapping) or float64 [H]; act in the down
    order, as down_rung takes it."""
    idl = ids.flatten().tolist()
    if level == 0:
        v = sum(w2[e].to(torch.int64).reshape(w2.shape[1], -1).sum(-1) for e in idl)
        return ((v + 2**31) % 2**32 - 2**31).to(torch.int32)
    a = act_natural(act).double()
    return sum(float(tw.flatten()[k]) * (_deq(w2[e], s2[e], fmt) @ a[k])
               for k, e in enumerate(idl))
