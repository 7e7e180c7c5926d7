"""Paged MLA decode attention (absorbed form) over the latent KV cache: split-KV + LSE merge.

Math (model_spec §3.6): per sequence b and head h,
    score(s) = scale * (q_nope[b,h] . c(s) + q_pe[b,h] . k_pe(s)),  s < seq_lens[b]
    o_latent[b,h] = softmax(score) @ c            (softmax in fp32; V = the latent c)
`scale` is the model's softmax_scale (192^-0.5 * mscale^2 for Kimi), NOT 576^-0.5.

Shapes and contracts (shared with the model code):
- q_nope [B, H, R] and q_pe [B, H, DR] (any strides, last dim contiguous); or one q [B, H, R+DR]
  passed as q_nope with q_pe=None (split at R = D - rope_dim).
- kv_cache [num_blocks, block_size, D], D = R + DR ([c | k_pe]), contiguous; bf16/fp16/fp32, or
  float8 (e4m3fn / e4m3fnuz) with a per-layer float k_scale (value = fp8 * k_scale).
- block_tables [B, max_blocks] int32, seq_lens [B] int32 (0 allowed: output row is 0).
- returns o_latent [B, H, R] in q's dtype.
R and DR must be powers of two >= 16 (512 and 64 in the real models).

Kernel shape: stage 1 has grid (head_groups, B, num_splits); each program owns up to BLOCK_H heads
(one tl.dot M tile: Kimi TP8's 8 heads fill half of it) and a contiguous token range of one
sequence, reads each cache row once, and uses the c tile for both QK^T and PV. A sequence's split
length is ceil(len / num_splits) rounded up to BLOCK_N and at least MIN_SPLIT, so short sequences
use fewer splits; idle programs exit. Stage 2 (grid (H, B, R/BLOCK_R)) merges the active splits'
partial outputs by log-sum-exp. With num_splits == 1 stage 1 writes the output directly.
fp8 caches are dequantized tile by tile (x * k_scale in fp32, rounded to fp16) for the dots.

CUDA/HIP-graph capture: no host syncs (no .item()); the grid depends only on B, H and
num_splits; pass `num_splits` (or `max_seq_len`) and a preallocated `workspace`
(alloc_decode_workspace) to keep the captured launch fixed and allocation-free.

Variants (`variant=`, default DEFAULT_VARIANT = "auto": "v5" with the separate merge kernel for
e4m3fn caches, "v1" otherwise, by the H200 measurements in bench/RESULTS.md, session 12 for v5):
"v2" (kernels/mla_decode_sched.py) balances a work list computed on the device (num_splits = P,
the work items per head group, ~ sum(len) / P tokens each), merges in the same launch (last arriver, merge="fused") or a second kernel (merge="kernel"), and on fp8
caches folds k_scale out of the per-element path (fp8_mode 1; 0 = v1's dequant, 2 = bit moves,
3 = bare cast).
"v3" (kernels/mla_decode_v3.py): v1's splits with the merge in the same launch (last arriver,
S <= V3_FUSED_MAX_S) and an fp8 path that loads the tile into registers and converts it once
(fp8 -> fp16, k_scale folded out; fp8_path="regs", or "cpasync"). Measured on the H200: the
fused merge is 7-113 µs slower than a merge kernel; with merge="kernel" the fp8 path is
1.02-1.11x faster than v1's at every Kimi TP8 shape (bf16: slower than v1).
"v5" (kernels/mla_decode_v5.py, fp8 caches): v3's splits, workspace and merges; the cache read as
int16 pairs through v1's cp.async + ldmatrix pipeline and split in registers (1.9-2.3x faster than
v3 at B >= 16 on the H200); 16-bit caches and latent or rope widths < 32 fall back to v3.
"v1" is the split-per-sequence kernel above. Workspaces differ by variant (v3 and v5 share
one layout): allocate with the same `variant`. With workspace=None, v2 reuses one zeroed counter
buffer per (device, size) (kernels leave it zero), so concurrent launches on different streams
need their own workspace.
"""

from __future__ import annotations

import functools
import importlib

import torch
import triton
import triton.language as tl
from atom_stream.kernels import mla_decode_sched as _v2
from atom_stream.kernels import mla_decode_v3 as _v3
from atom_stream.kernels import mla_decode_v5 as _v5

from .. import envs

if _v2.INTERPRET != envs.triton_interpreted():
    _v2 = importlib.reload(_v2)  # decorated under the other mode (tests switch modes)
if _v3.INTERPRET != envs.triton_interpreted():
    _v3 = importlib.reload(_v3)
if _v5.INTERPRET != envs.triton_interpreted():
    _v5 = importlib.reload(_v5)  # after v3: it binds v3's split / merge functions
# one definition of the split length and the paged tile load, shared by v1 and v3 (decorated in
# the current interpreter mode by the reload above)
_split_len, _load_tile = _v3._split_len, _v3._load_tile

_LOG2E = 1.4426950408889634
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, n))

# Tunables (measured on H200: bench/RESULTS.md). WAVES * SMs programs are aimed at.
BLOCK_H = 16
MIN_SPLIT = 64
MAX_SPLITS = 128
assert _v3.MERGE_UV_LSE_BLOCK >= MAX_SPLITS  # the merge + W_UV lse tile covers every split
WAVES = 2
# v1's split count fills whole waves of V1_WAVES programs per SM: its (32, 4, 2) config runs 4
# CTAs per SM (128 registers). H200 sweep (bench/RESULTS.md session 13, bf16 cache, us): B=16
# @8K 17 -> 32 splits 57.7 -> 51.4, B=64 @8K 5 -> 8 192.5 -> 160.2, B=64 @1K 34.6 -> 32.6;
# B=1 and B=256 pick the same counts as before (the length cap; 2).
V1_WAVES = 4
# v2: P = V2_WAVES * SMs work items per head group; the fused merge takes <= FUSED_MAX_S items per
# sequence (above FUSED_MAX_S / 2 items per sequence on average the merge kernel is used).
V2_WAVES = 2
V2_MIN_CHUNK = 64
FUSED_MAX_S = 16
# v3: v1's splits, merged in the same launch (last arriver) when S <= V3_FUSED_MAX_S; S in
# (V3_FUSED_MAX_S, 2 * V3_FUSED_MAX_S) is lowered to V3_FUSED_MAX_S (B=16 @8K: 17 -> 16).
V3_FUSED_MAX_S = 16
CPU_SMS = 8  # the "SM count" the split heuristics assume off-GPU (interpreter: small grids)
VARIANTS = ("auto", "v1", "v2", "v3", "v5")
# v1 by measurement (H200, bench/RESULTS.md, session 2): v2 was slower for bf16 at every Kimi
# TP8 shape (B=64@1K 57.7 vs 35.3 us) and for H=16/128; it won only with fp8 caches at B*ctx
# >= 512K (B=256@1K 141 vs 167 us, B=64@8K 313 vs 364 us), which one captured graph per batch
# size cannot select by context length.
# Session 3 (bench/RESULTS.md): fp8 caches take v3 with merge="kernel" (B=64@8K 328.6 vs 362.5
# us, B=256@8K 1072 vs 1186, B=16@8K 79.2 vs 87.3), bf16 caches keep v1.
# Session 12: e4m3fn caches take v5 (64, 4, 2) + merge kernel (B=64@8K 169 vs v3's 342 us,
# B=256@1K 71 vs 161, B=16@8K 40 vs 83, B=1@8K 10.3 vs 11.3).
DEFAULT_VARIANT = "auto"


# developer A/B switch (atom_stream/envs.py), read once at import like the other kernel switches
FORCED_VARIANT = envs.text("ATOM_STREAM_MLA_DECODE")


def resolve_variant(variant: str, kv_dtype: torch.dtype | None) -> tuple[str, str | None]:
    """(concrete variant, default merge) for `variant`; "auto" -> ("v5", "kernel") for e4m3fn
    caches (measured on the H200), ("v1", None) for the rest, e4m3fnuz (MI300) included until an
    A/B there. MI355 (e4m3fn) takes v5 too, through its portable bit-move unpack, which no
    AMD GPU has timed yet (it compiles for gfx950 without spills: bench/notes_mla_decode.md):
    A/B it there against ATOM_STREAM_MLA_DECODE=v3 / v1. "auto" needs the cache dtype: the
    variants' split counts and workspaces differ."""
    if variant != "auto":
        return variant, None
    forced = FORCED_VARIANT
    if forced != "auto":
        if forced not in ("v1", "v3", "v5"):
            raise ValueError(f"ATOM_STREAM_MLA_DECODE must be auto, v1, v3 or v5, got "
                             f"{forced!r}")
        return forced, ("kernel" if forced in ("v3", "v5") else None)
    if kv_dtype is None:
        raise ValueError("variant='auto' needs kv_dtype (the cache's dtype) to resolve")
    if kv_dtype == getattr(torch, "float8_e4m3fn", None):
        return "v5", "kernel"
    return "v1", None


# split count, workspace strides and the block-table row stride vary with the batch: no
# per-divisibility variants (v3 too)
_SPLIT_ARGS, _TABLE_ARGS = _v3._SPLIT_ARGS, _v3._TABLE_ARGS


@triton.jit(do_not_specialize=_TABLE_ARGS)
def _mla_decode_stage1(
    QN, QP, KV, BT, LENS, OPART, LSE, OUT,
    qk_scale, k_scale, out_scale, num_splits, H,
    stride_qn_b, stride_qn_h, stride_qp_b, stride_qp_h, stride_bt_b,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    R: tl.constexpr, DR: tl.constexpr, CH: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr,
    DIRECT: tl.constexpr, F16: tl.constexpr,
):
    # The latent dim R is handled as NC = R / CH chunks (1, 2 or 4) with one accumulator each:
    # tl.dot materializes its whole A operand per warp, so a [16, 512] q held across the loop
    # costs 128 registers/thread and spills; [16, 128] chunks reloaded per tile (L1 hits) don't.
    NC: tl.constexpr = R // CH
    hg = tl.program_id(0)
    b = tl.program_id(1)
    s = tl.program_id(2)
    seq_len = tl.load(LENS + b)
    split = _split_len(seq_len, num_splits, BLOCK_N, MIN_SPLIT)
    start = s * split
    end = tl.minimum(start + split, seq_len)
    if DIRECT:  # one split: the program always runs (seq_len 0 writes zeros)
        run = start <= end
    else:
        run = start < end
    if run:
        heads = hg * BLOCK_H + tl.arange(0, BLOCK_H)
        hmask = heads < H
        offs_c = tl.arange(0, CH)
        offs_p = tl.arange(0, DR)
        # compute dtype of the dots: q's dtype, or fp16 for an fp8 cache
        cdt = tl.float16 if F16 else QN.dtype.element_ty
        q_ptr = QN + b * stride_qn_b + heads[:, None] * stride_qn_h + offs_c[None, :]
        qp_ptr = QP + b * stride_qp_b + heads[:, None] * stride_qp_h + offs_p[None, :]
        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc0 = tl.zeros([BLOCK_H, CH], tl.float32)
        if NC > 1:
            acc1 = tl.zeros([BLOCK_H, CH], tl.float32)
        if NC > 2:
            acc2 = tl.zeros([BLOCK_H, CH], tl.float32)
            acc3 = tl.zeros([BLOCK_H, CH], tl.float32)
        q_pe = tl.load(qp_ptr, mask=hmask[:, None], other=0.0).to(cdt)
        bt_row = BT + b * stride_bt_b
        for n0 in range(start, end, BLOCK_N):
            kp, c0, c1, c2, c3 = _load_tile(KV, bt_row, n0, end, offs_c, offs_p,
                                            R, DR, CH, NC, PAGE, BLOCK_N)
            nmask = n0 + tl.arange(0, BLOCK_N) < end
            hm = hmask[:, None]
            if F16:
                # dequantize in fp32 and round to fp16 (exact for e4m3 when k_scale is a power of
                # two). Doing real arithmetic here also keeps Triton from moving the fp8->fp16
                # cast behind the shared-memory load, where the transposed (QK^T) use of an
                # 8-bit tile needs a register transpose and defeats cp.async pipelining.
                kp = (kp.to(tl.float32) * k_scale).to(cdt)
                c0 = (c0.to(tl.float32) * k_scale).to(cdt)
                c1 = (c1.to(tl.float32) * k_scale).to(cdt)
                c2 = (c2.to(tl.float32) * k_scale).to(cdt)
                c3 = (c3.to(tl.float32) * k_scale).to(cdt)
            qk = tl.dot(q_pe, tl.trans(kp.to(cdt)))
            c0 = c0.to(cdt)
            qk = tl.dot(tl.load(q_ptr, mask=hm, other=0.0).to(cdt), tl.trans(c0), qk)
            if NC > 1:
                c1 = c1.to(cdt)
                qk = tl.dot(tl.load(q_ptr + CH, mask=hm, other=0.0).to(cdt), tl.trans(c1), qk)
            if NC > 2:
                c2 = c2.to(cdt)
                qk = tl.dot(tl.load(q_ptr + 2 * CH, mask=hm, other=0.0).to(cdt), tl.trans(c2), qk)
                c3 = c3.to(cdt)
                qk = tl.dot(tl.load(q_ptr + 3 * CH, mask=hm, other=0.0).to(cdt), tl.trans(c3), qk)
            qk = tl.where(nmask[None, :], qk * qk_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            pc = p.to(cdt)
            acc0 = tl.dot(pc, c0, acc0 * alpha[:, None])
            if NC > 1:
                acc1 = tl.dot(pc, c1, acc1 * alpha[:, None])
            if NC > 2:
                acc2 = tl.dot(pc, c2, acc2 * alpha[:, None])
                acc3 = tl.dot(pc, c3, acc3 * alpha[:, None])
            m_i = m_new
        if DIRECT:
            norm = out_scale / tl.where(l_i > 0, l_i, 1.0)  # seq_len 0 -> output 0
            dst = OUT + b * stride_ob + heads[:, None] * stride_oh + offs_c[None, :]
            odt = OUT.dtype.element_ty
        else:
            norm = out_scale / l_i
            dst = OPART + b * stride_pb + heads[:, None] * stride_ph + s * stride_ps + offs_c[None, :]
            odt = tl.float32
            tl.store(LSE + b * stride_lb + heads * stride_lh + s, m_i + tl.log2(l_i), mask=hmask)
        tl.store(dst, (acc0 * norm[:, None]).to(odt), mask=hmask[:, None])
        if NC > 1:
            tl.store(dst + CH, (acc1 * norm[:, None]).to(odt), mask=hmask[:, None])
        if NC > 2:
            tl.store(dst + 2 * CH, (acc2 * norm[:, None]).to(odt), mask=hmask[:, None])
            tl.store(dst + 3 * CH, (acc3 * norm[:, None]).to(odt), mask=hmask[:, None])


@triton.jit(do_not_specialize=_SPLIT_ARGS)
def _mla_decode_stage2(
    OPART, LSE, LENS, OUT, num_splits,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, stride_ob, stride_oh,
    BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr,
):
    h = tl.program_id(0)
    b = tl.program_id(1)
    rc = tl.program_id(2)
    seq_len = tl.load(LENS + b)
    split = _split_len(seq_len, num_splits, BLOCK_N, MIN_SPLIT)
    n_active = tl.cdiv(seq_len, split)  # splits that stage 1 wrote; never read the others
    offs_s = tl.arange(0, BLOCK_S)
    smask = offs_s < n_active
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + offs_s, mask=smask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(smask, tl.exp2(lse - m), 0.0)
    denom = tl.sum(w, 0)
    denom = tl.where(denom > 0, denom, 1.0)
    offs_r = rc * BLOCK_R + tl.arange(0, BLOCK_R)
    parts = tl.load(OPART + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps
                    + offs_r[None, :], mask=smask[:, None], other=0.0)
    o = tl.sum(parts * w[:, None], 0) / denom
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_r, o.to(OUT.dtype.element_ty))


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(batch: int, num_heads: int, max_seq_len: int | None = None,
                      device: torch.device | str | None = None,
                      variant: str = DEFAULT_VARIANT,
                      kv_dtype: torch.dtype | None = None) -> int:
    """v3: splits per sequence (aim at WAVES * SMs programs, <= MAX_SPLITS, <= max_seq_len /
    MIN_SPLIT); v5 / v1: the most splits whose B x S x head-group programs fit one wave of
    WAVES * SMs / V1_WAVES * SMs (floor instead of ceil; at least 1, which may exceed a wave);
    WAVES / V1_WAVES are v5's / v1's CTAs per SM at their default configs (2 / 4): a config with
    another count needs its own. v2: work items per head
    group P (V2_WAVES * SMs / head groups, capped by B * max_seq_len / V2_MIN_CHUNK). Depends
    only on host ints (graph-safe). "auto" resolves with kv_dtype (resolve_variant)."""
    variant = resolve_variant(variant, kv_dtype)[0]
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda" and torch.cuda.is_available():
        sms = _sm_count(dev.index if dev.index is not None else torch.cuda.current_device())
    else:
        sms = CPU_SMS  # CPU / interpreter: small grids
    groups = triton.cdiv(num_heads, BLOCK_H)
    if variant == "v2":
        p = triton.cdiv(V2_WAVES * sms, groups)
        if max_seq_len is not None:
            p = min(p, batch * triton.cdiv(max(max_seq_len, 1), V2_MIN_CHUNK))
        return max(1, p)
    if variant == "v5":
        # whole waves: v5 runs 2 CTAs per SM (190 registers at V5_CONFIG), so B x S <= WAVES x
        # SMs programs where B allows; a ceil would start a second, mostly idle wave (B=64 on
        # 132 SMs: 5 splits = 320 programs, the last 56 alone for a whole split's time)
        s = max(1, (WAVES * sms) // (batch * groups))
    elif variant == "v1":  # likewise, at v1's 4 CTAs per SM
        s = max(1, (V1_WAVES * sms) // (batch * groups))
    else:
        s = triton.cdiv(WAVES * sms, batch * groups)
    if max_seq_len is not None:
        s = min(s, triton.cdiv(max(max_seq_len, 1), MIN_SPLIT))
    if variant == "v3" and V3_FUSED_MAX_S < s < 2 * V3_FUSED_MAX_S:
        s = V3_FUSED_MAX_S  # one launch instead of two, ~wave-sized grid kept
    return max(1, min(s, MAX_SPLITS))


def alloc_decode_workspace(batch: int, num_heads: int, kv_lora_rank: int, num_splits: int,
                           device, variant: str = DEFAULT_VARIANT,
                           kv_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Scratch between items and merge. v1: (partial o [B, H, S, R] fp32, lse [B, H, S] fp32);
    v2: (partial o [P + B, H, R], lse [P + B, H], counters [B * head groups] int32 zeros);
    v3 / v5: (partial o [B, H, S, R], lse [B, H, S], counters [B * head groups] int32 zeros).
    "auto" resolves with kv_dtype (resolve_variant): pass the cache's dtype."""
    variant = resolve_variant(variant, kv_dtype)[0]
    if variant == "v2":
        return _v2.alloc_sched_workspace(batch, num_heads, kv_lora_rank, num_splits, BLOCK_H,
                                         device)
    if variant in ("v3", "v5"):  # v5 uses v3's splits, partials and merges
        return _v3.alloc_v3_workspace(batch, num_heads, kv_lora_rank, num_splits, BLOCK_H, device)
    return (torch.empty(batch, num_heads, num_splits, kv_lora_rank, dtype=torch.float32,
                        device=device),
            torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device))


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _v2_workspace(B, H, R, P, device):
    """Per-call partials (torch.empty: no kernel) + a cached zeroed counter buffer."""
    groups = triton.cdiv(H, BLOCK_H)
    key = (str(device), B * groups)
    cnt = _COUNTERS.get(key)
    if cnt is None:
        cnt = _COUNTERS[key] = torch.zeros(B * groups, dtype=torch.int32, device=device)
    return (torch.empty(P + B, H, R, dtype=torch.float32, device=device),
            torch.empty(P + B, H, dtype=torch.float32, device=device), cnt)


def _launch_cfg(kv_dtype: torch.dtype, num_heads: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) per cache dtype: the lowest geometric-mean time of 4
    candidates over the H=8 grid on H200 (bench/RESULTS.md)."""
    if kv_dtype in _FP8:
        return 64, 8, 2
    return 32, 4, 2


def _v3_cfg(kv_dtype: torch.dtype, batch: int, fp8_path: int) -> tuple[int, int, int]:
    """v3 (BLOCK_N, num_warps, num_stages) from shapes only (graph-safe; `batch` unused so far).
    Chosen from the offline sm_90 compile (bench/notes_mla_decode.md); measured on the H200 with
    the merge kernel (bench/results/kernels-attn-v3mk-h200.json): the fp8 "regs" (64, 8, 1) is
    fastest at B=1/64, cpasync (32, 4, 2) 2-4% faster at B=16@8K and B=256 but 10-27% slower at
    B=64 (not adopted: one config per path until a per-batch sweep says otherwise)."""
    if kv_dtype in _FP8:
        # regs: 245 registers, no spills, 1 CTA/SM, 36 KB of loads in flight per SM ((32, 4, 1)
        # spills 248 B; (32, 8, 1) 175 regs but half the bytes in flight)
        return (64, 8, 1) if fp8_path == 1 else (32, 4, 2)
    return 32, 4, 2


# v5 (BLOCK_N, num_warps, num_stages): the fastest of 4 at every Kimi TP8 shape but B=1 (H200,
# bench/RESULTS.md session 12: (32, 4, 2) 1.2-1.4x, (64, 8, 2) 1.3-1.6x slower at B >= 16).
# Offline sm_90: 190 registers, no spills, 72 KB shared (2 CTAs per SM).
V5_CONFIG = (64, 4, 2)

_V3_COUNTERS: dict[tuple, torch.Tensor] = {}


def _v3_workspace(B, H, R, S, device):
    """Per-call partials (torch.empty: no kernel) + a cached zeroed counter buffer (the kernel
    leaves it zero)."""
    groups = triton.cdiv(H, BLOCK_H)
    key = (str(device), B * groups)
    cnt = _V3_COUNTERS.get(key)
    if cnt is None:
        cnt = _V3_COUNTERS[key] = torch.zeros(B * groups, dtype=torch.int32, device=device)
    return (torch.empty(B, H, S, R, dtype=torch.float32, device=device),
            torch.empty(B, H, S, dtype=torch.float32, device=device), cnt)


def _fp8_bias(kv_dtype: torch.dtype) -> int:
    return 8 if "fnuz" in str(kv_dtype) else 7


def mla_decode(q_nope: torch.Tensor, q_pe: torch.Tensor | None, kv_cache: torch.Tensor,
               block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
               k_scale: float = 1.0, *, out: torch.Tensor | None = None,
               num_splits: int | None = None, max_seq_len: int | None = None,
               workspace: tuple[torch.Tensor, ...] | None = None,
               rope_dim: int = 64, config: tuple[int, ...] | None = None,
               chunk: int = 128, variant: str = DEFAULT_VARIANT, merge: str | None = None,
               fp8_mode: int = 1, fp8_path: str = "regs",
               uv: tuple[torch.Tensor, torch.Tensor] | None = None,
               rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
               ) -> torch.Tensor:
    """Absorbed paged MLA decode; see the module docstring. Returns o_latent [B, H, R], or with
    uv = (w_uv [H, V, R], y [B, H, V]) y = o_latent @ W_UV^T per head (written into y and
    returned; `out` then only holds some rows' o_latent): v1 / v3 / v5 fold the product into
    their merge launch (mla_decode_v3.launch_merge_uv, also when nothing is split), v2 runs
    a bmm after its own merge.
    v2 only: merge "fused" | "kernel" (None: fused when num_splits / B <= FUSED_MAX_S / 2);
    fp8_mode 0 | 1 | 2 | 3 (fp8 caches; kernels/mla_decode_sched.py).
    v3: merge "fused" | "kernel" (None: fused when num_splits <= V3_FUSED_MAX_S);
    fp8_path "regs" | "cpasync" (kernels/mla_decode_v3.py).
    v5: merge "kernel" (None; measured faster everywhere) | "fused".
    rope = (cos, sin [P, DR / 2] fp32, positions [B]): q_pe arrives unrotated and the decode
    uses interleaved RoPE(q_pe) at each row's position (kernels/norm_rope.rope_interleaved_'s
    math): v5 rotates it as it loads it, the other variants rotate q_pe in place first (one
    launch); q_pe's contents afterwards are therefore either."""
    assert variant in VARIANTS, variant
    variant, auto_merge = resolve_variant(variant, kv_cache.dtype)
    merge = merge or auto_merge
    want = 2 if variant == "v1" else 3
    if workspace is not None and len(workspace) != want:
        raise ValueError(f"mla_decode: a {variant} workspace has {want} tensors, got "
                         f"{len(workspace)} (allocate it with the same variant / kv_dtype)")
    if q_pe is None:
        r = kv_cache.shape[-1] - rope_dim
        q_nope, q_pe = q_nope[..., :r], q_nope[..., r:]
    B, H, R = q_nope.shape
    DR = q_pe.shape[-1]
    _, page, D = kv_cache.shape
    assert D == R + DR, f"cache width {D} != {R} + {DR}"
    assert R >= 16 and DR >= 16 and R & (R - 1) == 0 and DR & (DR - 1) == 0
    chunk = min(chunk, R)
    assert R // chunk in (1, 2, 4), "R must be 1, 2 or 4 chunks"
    assert kv_cache.is_contiguous() and q_nope.stride(-1) == 1 and q_pe.stride(-1) == 1
    assert block_tables.dtype == torch.int32 and seq_lens.dtype == torch.int32
    if out is None:
        out = torch.empty(B, H, R, dtype=q_nope.dtype, device=q_nope.device)
    if num_splits is None:
        num_splits = decode_num_splits(B, H, max_seq_len, q_nope.device, variant)
    fp8 = kv_cache.dtype in _FP8
    if variant == "v5" and not (fp8 and _v5.supported(R, DR)):
        variant = "v3"  # v5 is an fp8-cache path; v3 takes the rest with the same workspace
    if rope is not None and variant != "v5":
        from .norm_rope import rope_interleaved_
        rope_interleaved_(q_pe, None, *rope)
        rope = None
    if variant == "v5":
        S = num_splits
        merge = merge or "kernel"  # the fused merge: 1.1-36x slower (RESULTS.md session 12)
        assert merge in ("fused", "kernel")
        block_n, warps, stages, *cap = config or V5_CONFIG  # [, maxnreg] as v3
        ws = (workspace or _v3_workspace(B, H, R, S, q_nope.device)) if S > 1 else None
        # k_scale (and the bit moves' fp16 factor) folded into the score and output scales
        asm = _v5.native_cvt(kv_cache.dtype, kv_cache.device)
        f = float(k_scale) * (1.0 if asm else 2.0 ** (15 - _fp8_bias(kv_cache.dtype)))
        _v5.launch_v5(
            q_nope, q_pe, kv_cache, block_tables, seq_lens, out, float(scale) * _LOG2E * f, f,
            S, ws, merge=merge == "fused", block_h=BLOCK_H, block_n=block_n, warps=warps,
            stages=stages, pairs=max(16, chunk // 2), min_split=MIN_SPLIT, asm=asm,
            maxnreg=cap[0] if cap else None, defer_merge=uv is not None, rope=rope)
        return _merge_uv(out, seq_lens, ws, S, block_n, uv)
    if variant == "v3":
        assert fp8_path in ("regs", "cpasync") and merge in (None, "fused", "kernel")
        path = 1 if fp8_path == "regs" else 0
        S = num_splits
        if merge is None:
            merge = "fused" if S <= V3_FUSED_MAX_S else "kernel"
        # config (BLOCK_N, num_warps, num_stages[, maxnreg]): maxnreg caps registers per thread
        # (NVIDIA; more CTAs per SM at the price of spills), None = the compiler's choice
        block_n, warps, stages, *cap = config or _v3_cfg(kv_cache.dtype, B, path)
        ws = None
        if S > 1:
            ws = workspace or _v3_workspace(B, H, R, S, q_nope.device)
        # k_scale folded out of the tile for every cache dtype: scores and output scaled once
        _v3.launch_v3(
            q_nope, q_pe, kv_cache, block_tables, seq_lens, out,
            float(scale) * _LOG2E * float(k_scale), float(k_scale), S, ws, f16=fp8,
            fp8_path=path, merge=merge == "fused", block_h=BLOCK_H, block_n=block_n,
            warps=warps, stages=stages, chunk=chunk, min_split=MIN_SPLIT,
            maxnreg=cap[0] if cap else None, defer_merge=uv is not None)
        return _merge_uv(out, seq_lens, ws, S, block_n, uv)
    block_n, warps, stages = config or _launch_cfg(kv_cache.dtype, H)
    if variant == "v2":
        P = num_splits
        if merge is None:
            merge = "fused" if 2 * P <= FUSED_MAX_S * B else "kernel"
        assert merge in ("fused", "kernel") and fp8_mode in (0, 1, 2, 3)
        if P == 1:  # every sequence is one item: no partials, no counters
            ws = (out, out, seq_lens)
        else:
            ws = workspace or _v2_workspace(B, H, R, P, q_nope.device)
        qk, ks, os_ = float(scale) * _LOG2E * float(k_scale), float(k_scale), float(k_scale)
        cvt = 0
        if fp8:
            cvt = (1, 3, 2, 0)[fp8_mode]
            if fp8_mode == 0:  # k_scale applied per element
                qk, os_ = float(scale) * _LOG2E, 1.0
            elif fp8_mode == 1:  # folded; the tile is multiplied by 1.0 (see _cvt)
                ks = 1.0
            elif fp8_mode == 2:  # fp16 holds fp8 * 2^(bias - 15)
                f = float(2 ** (15 - _fp8_bias(kv_cache.dtype)))
                qk, os_ = qk * f, os_ * f
        _v2.launch_v2(
            q_nope, q_pe, kv_cache, block_tables, seq_lens, out, qk, ks, os_, P, ws,
            f16=fp8, cvt=cvt, merge=merge == "fused" and P > 1, block_h=BLOCK_H,
            block_n=block_n, warps=warps, stages=stages, chunk=chunk, min_chunk=V2_MIN_CHUNK,
            max_s=FUSED_MAX_S if merge == "fused" else MAX_SPLITS)
        if uv is not None:  # [H, B, R] @ [H, R, V] into y viewed as [H, B, V]
            torch.bmm(out.transpose(0, 1), uv[0].transpose(1, 2), out=uv[1].transpose(0, 1))
            return uv[1]
        return out
    direct = num_splits == 1
    if direct:
        opart = lse = out  # unused
    else:
        opart, lse = workspace or alloc_decode_workspace(B, H, R, num_splits, q_nope.device,
                                                          variant="v1")
        assert opart.shape[:3] == (B, H, num_splits) and lse.shape == (B, H, num_splits)
    grid = (triton.cdiv(H, BLOCK_H), B, num_splits)
    _mla_decode_stage1[grid](
        q_nope, q_pe, kv_cache, block_tables, seq_lens, opart, lse, out,
        # fp8: k_scale applied to the tile; otherwise (normally 1.0) folded into the scales
        float(scale) * _LOG2E * (1.0 if fp8 else float(k_scale)), float(k_scale),
        1.0 if fp8 else float(k_scale), num_splits, H,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), block_tables.stride(0),
        opart.stride(0), opart.stride(1), opart.stride(2) if not direct else 0,
        lse.stride(0), lse.stride(1), out.stride(0), out.stride(1),
        R=R, DR=DR, CH=chunk, PAGE=page, BLOCK_H=BLOCK_H, BLOCK_N=block_n, MIN_SPLIT=MIN_SPLIT,
        DIRECT=direct, F16=fp8, num_warps=warps, num_stages=stages,
    )
    if uv is not None:
        strides = (0,) * 5 if direct else (opart.stride(0), opart.stride(1), opart.stride(2),
                                           lse.stride(0), lse.stride(1))
        return _v3.launch_merge_uv(opart, lse, seq_lens, out, num_splits, strides, block_n,
                                   MIN_SPLIT, *uv, v1=True)
    if not direct:
        block_s = triton.next_power_of_2(num_splits)
        block_r = min(R, max(16, 4096 // block_s))
        _mla_decode_stage2[(H, B, R // block_r)](
            opart, lse, seq_lens, out, num_splits,
            opart.stride(0), opart.stride(1), opart.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            BLOCK_N=block_n, MIN_SPLIT=MIN_SPLIT, BLOCK_S=block_s, BLOCK_R=block_r, num_warps=4,
        )
    return out


def _merge_uv(out, seq_lens, ws, S, block_n, uv):
    """After a v3 / v5 launch: `out` as it is (uv None: already merged there), or the deferred
    merge with W_UV folded in, into uv's y."""
    if uv is None:
        return out
    B, H, R = out.shape
    opart, lse, _, strides = _v3.split_workspace(out, seq_lens, ws, B, H, S, R, BLOCK_H)
    return _v3.launch_merge_uv(opart, lse, seq_lens, out, S, strides, block_n, MIN_SPLIT, *uv)


def split_len_host(seq_len: int, num_splits: int, block_n: int, min_split: int = MIN_SPLIT
                   ) -> int:
    """The tokens per split that the kernels compute on the device (mla_decode_v3._split_len)
    for a sequence of seq_len over num_splits launched splits: ceil(seq_len / num_splits)
    rounded up to block_n, at least min_split; the active splits are ceil(seq_len / that)."""
    return max(triton.cdiv(triton.cdiv(seq_len, num_splits), block_n) * block_n, min_split)


def warmup_decode(num_heads: int, kv_lora_rank: int, rope_dim: int, block_size: int,
                  kv_dtype: torch.dtype, q_dtype: torch.dtype, device, max_batch: int,
                  v_dim: int = 0, uv_max_batch: int = 0) -> int:
    """Run `mla_decode` on a tiny cache once per distinct launch variant over batch sizes
    1..max_batch (tile config, split count, merge mode), so that each Triton variant the
    decode attention compiles exists before serving: an eager step (decodes beside a prefill
    chunk, at a batch size no CUDA graph covers) would otherwise compile on a request's path.
    With v_dim, also the uv= form (merge + W_UV, models/mla.MERGE_UV_MAX_B) at every batch
    size up to uv_max_batch. Returns the number of calls; the outputs are discarded."""
    dev = torch.device(device)
    cache = torch.zeros(2, block_size, kv_lora_rank + rope_dim, device=dev).to(kv_dtype)
    variant = resolve_variant(DEFAULT_VARIANT, kv_dtype)[0]
    seen = set()
    for b in range(1, max_batch + 1):
        # what a launch's compiled variant depends on: the split count (merge mode, merge
        # tile) and, for v3, the per-batch tile config; one call per distinct key
        key = (decode_num_splits(b, num_heads, None, dev, variant),
               _v3_cfg(kv_dtype, b, 1) if variant == "v3" else None)
        if key in seen:
            continue
        seen.add(key)
        q = torch.zeros(b, num_heads, kv_lora_rank, dtype=q_dtype, device=dev)
        qp = torch.zeros(b, num_heads, rope_dim, dtype=q_dtype, device=dev)
        mla_decode(q, qp, cache, torch.zeros(b, 1, dtype=torch.int32, device=dev),
                   torch.ones(b, dtype=torch.int32, device=dev), 1.0, rope_dim=rope_dim)
    calls = len(seen)
    uv_max_batch = min(max_batch, uv_max_batch) if v_dim else 0
    for b in range(1, uv_max_batch + 1):
        # the merge + W_UV launch specializes on the batch (its W_UV tile) and the split count
        q = torch.zeros(b, num_heads, kv_lora_rank, dtype=q_dtype, device=dev)
        qp = torch.zeros(b, num_heads, rope_dim, dtype=q_dtype, device=dev)
        w_uv = torch.zeros(num_heads, v_dim, kv_lora_rank, dtype=q_dtype, device=dev)
        y = torch.empty(b, num_heads, v_dim, dtype=q_dtype, device=dev)
        mla_decode(q, qp, cache, torch.zeros(b, 1, dtype=torch.int32, device=dev),
                   torch.ones(b, dtype=torch.int32, device=dev), 1.0, rope_dim=rope_dim,
                   uv=(w_uv, y))
        calls += 1
    return calls


def mla_decode_ref(q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                   block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                   k_scale: float = 1.0) -> torch.Tensor:
    """Plain torch reference (fp32 math, per sequence); returns [B, H, R] in q's dtype."""
    B, H, R = q_nope.shape
    page = kv_cache.shape[1]
    flat = kv_cache.reshape(-1, kv_cache.shape[-1])
    out = torch.zeros(B, H, R, dtype=torch.float32, device=q_nope.device)
    for b in range(B):
        n = int(seq_lens[b])
        if n == 0:
            continue
        pos = torch.arange(n, device=kv_cache.device)
        rows = block_tables[b, pos // page].long() * page + pos % page
        e = flat[rows].float() * k_scale
        c, kp = e[:, :R], e[:, R:]
        s = (q_nope[b].float() @ c.T + q_pe[b].float() @ kp.T) * scale
        out[b] = torch.softmax(s, dim=-1) @ c
    return out.to(q_nope.dtype)
