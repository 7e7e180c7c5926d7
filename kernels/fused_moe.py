"""Fused MoE experts in Triton: grouped GEMM gate_up + SiLU*mul, grouped GEMM down + weighted sum.

fused_moe(hidden [M, H], w13, w2, topk_weights [M, k] fp32, topk_ids [M, k] int32/int64, *,
          quant="bf16" | "fp8_block" | "int4_g32" | "mxfp4" | "fp8_tensor" | "fp8_channel",
          w13_scale=None, w2_scale=None, activation_quant=None | "mxfp4" | "fp8",
          act_quant=None, a13_scale=None, a2_scale=None, block=None, n_shared=0, out=None,
          config=None, allow_emulated_fp4=False) -> [M, H] in hidden's dtype
    y[m] = sum_k topk_weights[m, k] * down_e(silu(gate_e x) * up_e x), e = topk_ids[m, k]
          + sum of the n_shared shared experts (the last n_shared of w13/w2, weight 1.0).
A token may repeat an expert id (expert parallel maps other ranks' picks to local 0 at weight
0): each (token, column) pair counts once with its own weight.

Weight layout contract (per expert [out, in]; see kernels/moe_ref.py for the bit-level formats):
- w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I]; E includes the n_shared appended shared
  experts (a shared expert of intermediate I*S is S experts of intermediate I; same format).
- "bf16": float tensors (bf16/fp16/fp32).
- "fp8_block": float8_e4m3fn, w*_scale = weight_scale_inv fp32: w13 [E, 2*ceil(I/128),
  ceil(H/128)] (gate's block rows then up's), w2 [E, ceil(H/128), ceil(I/128)]; H, I % 128 == 0.
  activation_quant="fp8" (act_quant=True): dynamic per-token per-128 e4m3 activations (DeepSeek
  s = max(amax, 1e-4)/448) on fp8 tensor cores; otherwise weight-only (dequantized in-kernel).
- "fp8_tensor" / "fp8_channel" (FP8C, W4A8 after w4a8.py's load-time conversion):
  float8_e4m3fn weights, fp32 scales per tensor (w13_scale [E], w2_scale [E]) or per output
  channel (w13_scale [E, 2I], w2_scale [E, H]): W = q * scale. Activations are always fp8
  e4m3: dynamic per token, s = max(amax(row)/448, 1e-12) over the whole row (H for the input,
  I for the intermediate), or static when a13_scale / a2_scale (scalar tensors) are given;
  q = fp8(clamp(x / s, +-448)) (w4a8.py's fp8_qdq_per_token / fp8_qdq_static). H, I % 32 == 0.
  e4m3fnuz (MI300) raises NotImplementedError.
- "int4_g32": REPACKED compressed-tensors int4, w13 int32 [E, 2I, H/128, 16], w2 int32
  [E, H, I/128, 16] (repack_int4_moe), scales bf16 [E, N, K/32] as in the checkpoint; 4 bits per
  weight, weight-only (bf16 activations). The raw [E, N, K/8] layout raises NotImplementedError.
- "int4_g32" / repacked "mxfp4" w13 may instead be ROW-TILED with its scales (tile_w13: words
  [E, 2I/T, H/128, T, 16], scales [E, 2I/T, H/128, T, 4]); every path reads it (same results).
- "mxfp4": REPACKED Quark MXFP4 int32 [E, N, K/128, 16] (repack_mxfp4_moe), e8m0 uint8 scales
  [E, N, K/32]: in-kernel dequantization to fp16 (GPUs without FP4 matrix units, e.g. H200);
  or the RAW Quark uint8 [E, N, K/2] on GPUs with FP4 units (tl.dot_scaled; CUDA cc >= 10,
  AMD gfx950). activation_quant="mxfp4" (act_quant=True): w4a4, activations quantized per 32
  on the fly (Quark "even" scale, e2m1 round-half-even); emulated exactly without FP4 units.
Weight-only mxfp4 on the tensor-core path runs fp16 MMAs: activations are cast to fp16 (clamped
to +-65504). Anything else raises NotImplementedError.

Paths (chosen per call from M; default_config has the measured H200 choices):
- small-M (int4_g32 / repacked mxfp4 weight-only, bf16 activations and output (out may also be
  fp32), bf16 / e8m0 scales, M <= small_m_max, default 8 (see below); 0 disables):
  kernels/moe_small_m.py,
  2 launches: gate_up once per DISTINCT expert (tokens compacted on the device; split-K 7 at
  M=1) and a down kernel per (token, H tile). Measured H200 (bench/results/moe-small-m-h200.json,
  Kimi-K2.5 TP8 rank): int4 M=1 25.2 us vs GEMV 31.1, M=4 72.4 vs 92.2; mxfp4 M=1 26.6 vs 27.2,
  M=4 71.2 vs 79.6. config "small_m": dict of moe_small_m overrides ("poison" is passed on).
  ATOM_STREAM_MOE_PAIR_M_MAX=N > 1 (default 8) raises small_m_max to N (moe_small_m's per-pair
  gate_up at 2 <= M <= N; A/B: bench/moe_small_m.py --pair-m); 1 gives SMALL_M_MAX (4). Where
  cfg DQ 3 compiles (NVIDIA) small_m_max and gemv_max stop at TC_FROM_M - 1 = 2: the
  tensor-core direct mode is faster from M = 4 (session 14).
- GEMV (4-bit formats and FP8C, M <= gemv_max): gate_up per (token, expert) pair on CUDA cores
  in fp32, then a down kernel per (token, H tile) that sums the token's experts with the routing
  weights and writes y: 2 launches (kernels/fused_moe_gemv.py, kernels/fused_moe_fp8.py).
- Tensor cores (kernels/fused_moe_tc.py): (1) moe_align (sorted mode only); (2) gate_up, grid
  (blocks, I/BN): one expert's gate + up rows (swap-AB: weights are the MMA's M side, up to
  BLOCK_M tokens its N side), K loop over H with in-kernel dequantization, SiLU*mul epilogue,
  the activation per row slot; (3) down, grid (blocks, H/BN): each pair's expert output; (4) a
  reduce kernel sums the top-k rows with the routing weights in fp32. Direct mode (M <= BLOCK_M)
  skips (1): a block is the first pair of each distinct expert and its rows are all M tokens.
w4a4 adds one activation-quantization kernel; the intermediate is quantized in the gate_up
epilogue. No host syncs, no data-dependent shapes: graph capturable.
config: overrides of default_config's keys; "poison": True fills the intermediates with NaN
first (tests: a read of an unwritten element reaches the output).
"""

from __future__ import annotations

import functools
import json

import torch

from .. import envs
from .fused_moe_common import (
    _INTERP,
    A_FP8,
    A_MXFP4,
    A_NONE,
    BF16,
    F16,
    F32,
    FLOAT,
    FP8,
    FP8C,
    INT4,
    MXFP4,
    MXFP4_DS,
)
from .fused_moe_fp8 import _fit, fp8_gemv_path
from .fused_moe_gemv import gemv_path
from .fused_moe_tc import _pick, act_quant_mxfp4, tc_path
from .moe_ref import repack_int4, repack_mxfp4, tile_rows, untile_rows, w13_tile

__all__ = ["default_config", "fused_moe", "has_fp4_mma", "repack_int4_moe", "repack_mxfp4_moe",
           "tile_w13", "untile_w13"]


def repack_int4_moe(w_packed: torch.Tensor) -> torch.Tensor:
    """compressed-tensors int32 [E, N, K/8] -> kernel layout int32 [E, N, K/128, 16]."""
    return repack_int4(w_packed).contiguous()


def repack_mxfp4_moe(w: torch.Tensor) -> torch.Tensor:
    """Quark uint8 [E, N, K/2] -> kernel layout int32 [E, N, K/128, 16] (for GPUs without FP4)."""
    return repack_mxfp4(w).contiguous()


def tile_w13(w13: torch.Tensor, s13: torch.Tensor, T: int = 16):
    """Repacked 4-bit gate_up words int32 [E, 2I, H/128, 16] and group scales [E, 2I, H/32]
    (int4 bf16 / MXFP4 e8m0) -> their row-tiled copies [E, 2I/T, H/128, T, 16] and
    [E, 2I/T, H/128, T, 4]: one 128-K chunk of T consecutive rows is one contiguous block
    (T x 64 bytes of words), instead of T rows 64 bytes each, H/2 bytes apart. Every 4-bit path
    of fused_moe reads either layout (the 5-dim shape says which); the tensor-core gate_up
    streams the tiled one 1.4-1.5x faster on the H200 (bench/moe_tc_ladder.py,
    bench/RESULTS.md session 5)."""
    E, N, nch, _ = w13.shape
    return tile_rows(w13, T), tile_rows(s13.reshape(E, N, nch, 4), T)


def untile_w13(w13t: torch.Tensor, s13t: torch.Tensor):
    """Inverse of tile_w13: (words [E, 2I, H/128, 16], scales [E, 2I, H/32])."""
    w = untile_rows(w13t)
    return w, untile_rows(s13t).reshape(w.shape[0], w.shape[1], -1)


def has_fp4_mma(device: torch.device) -> bool:
    """True on GPUs with FP4 matrix units (CUDA cc >= 10, AMD gfx950); never under the
    interpreter."""
    if device.type != "cuda" or _INTERP:
        return False
    if torch.version.hip:
        return "gfx950" in torch.cuda.get_device_properties(device).gcnArchName
    return torch.cuda.get_device_capability(device)[0] >= 10


@functools.lru_cache(maxsize=16)
def _nv_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def has_dq3_asm(device: torch.device) -> bool:
    """True where cfg DQ 3 (the 4-bit unpack in inline PTX: fused_moe_common._int4_sub_asm,
    _mx_bf16_asm) compiles: NVIDIA sm_80+ (bf16x2 fma), never under the interpreter or on AMD;
    elsewhere DQ 3 runs as DQ 1 (the same sums from portable bit moves)."""
    if device.type != "cuda" or _INTERP or torch.version.hip:
        return False
    return _nv_capability(device.index if device.index is not None
                          else torch.cuda.current_device()) >= (8, 0)


_QUANTS = {"bf16": FLOAT, "float": FLOAT, "none": FLOAT, "fp8_block": FP8, "int4_g32": INT4,
           "int4": INT4, "mxfp4": MXFP4, "fp8_tensor": FP8C, "fp8_channel": FP8C}


# M up to which 4-bit weight-only calls take kernels/moe_small_m.py (measured faster at M=1 and
# 4); ATOM_STREAM_MOE_SMALL_M_MAX=0 turns it off for A/B runs of whole decode steps
SMALL_M_MAX = envs.integer("ATOM_STREAM_MOE_SMALL_M_MAX")
# Where DQ 3 compiles (NVIDIA), 4-bit weight-only calls from M = TC_FROM_M on take the
# tensor-core direct mode, whatever small_m_max / gemv_max would allow (H200, session 14,
# bench/kernels_moe.py --set smtc, bench/RESULTS.md): int4 M=4 57.5 -> 49.1 us, M=8 94.2 ->
# 70.6; MXFP4 59.7 -> 51.8, 100.1 -> 80.1; decode step B=4 / 8 -6 / -16 %. The small-M kernels
# still win at M=1 (18.8 vs 35.7 us) and 2 (30.8 vs 39.8); M=3 was not measured (the two
# interpolations tie). An explicit config "small_m_max" / "gemv_max" (ATOM_STREAM_MOE_CFG)
# overrides it.
TC_FROM_M = 3


def parse_env_config(raw: str | None) -> dict:
    """ATOM_STREAM_MOE_CFG's value -> the dict (empty when unset); ValueError unless a JSON
    object."""
    raw = (raw or "").strip()
    if not raw:
        return {}
    cfg = json.loads(raw)
    if not isinstance(cfg, dict):
        raise ValueError(f"ATOM_STREAM_MOE_CFG must be a JSON object, got {raw!r}")  # noqa: TRY004
    return cfg


# ATOM_STREAM_MOE_CFG: a JSON object of default_config keys applied over the defaults at every M
# (a benchmarking knob: a decode-step A/B of tiles found by bench/kernels_moe.py without a code
# change), e.g. '{"BN2": 128, "W2": 8, "AP": true}'. Read at import, like the other switches.
ENV_CONFIG = parse_env_config(envs.text("ATOM_STREAM_MOE_CFG"))


def small_m_max() -> int:
    """Default config "small_m_max": 0 when ATOM_STREAM_MOE_SMALL_M_MAX=0 (the small-M path off
    at every M, whatever PAIR_M_MAX says), else SMALL_M_MAX or moe_small_m.PAIR_M_MAX where that
    is larger (ATOM_STREAM_MOE_PAIR_M_MAX: its per-pair gate_up up to that M; 1 = off). Read
    from the module at call time (tests reload it)."""
    from . import moe_small_m as sm
    return 0 if SMALL_M_MAX == 0 else max(SMALL_M_MAX, sm.PAIR_M_MAX)


def default_config(fmt: int, M: int, P: int, E: int, H: int, I: int, act: int = 0,
                   wt: int = 1, tc_small: bool = False) -> dict:
    """Tiles and path, set from the H200 measurements in bench/RESULTS.md (2026-11-29).
    tc_small (fused_moe: has_dq3_asm, i.e. NVIDIA): 4-bit weight-only small_m_max and gemv_max
    capped at TC_FROM_M - 1, the tensor-core direct mode from there on.

    gemv: the CUDA-core path (4-bit formats, M <= gemv_max): G1/G2 weight rows per program
    (gate_up programs own G1 gate + G1 up rows), GC chunks of 128 K per iteration. Measured:
    GEMV wins at M=1 (int4 31 us vs 49 us on tensor cores), the tensor-core direct mode at M=16
    (219 vs 237 us) and sorted mode at M=64 (483 vs 1294 us); gemv_max=8 sits between (not
    measured at 8). w4a4 keeps GEMV up to 16 (what was measured). Tensor-core path: BN1/BN2
    weight rows per program, BK1/BK2 K per step, BM tokens per block; direct (M <= BM) skips
    the align kernel; OFFS=1: int4 offset subtracted in 16-bit before the dot (measured faster).
    SK: split-K of the 4-bit GEMV gate_up (kernels/fused_moe_gemv.py; 1 = off, the measured
    default; the variant is compared in bench/kernels_moe.py, predictions in
    bench/notes_fused_moe.md).
    DQ (tensor-core K loop of repacked int4 / weight-only MXFP4 with 16-bit activations,
    kernels/fused_moe_common.py): 0 = each scale group's MMA into a fresh fp32 partial, scaled
    and added (the measured default); 1 = the group scale folded into the 16-bit weight operand,
    every MMA accumulates in place (int4 then rounds q * s to bf16 once; MXFP4 stays exact, in
    bf16 MMAs instead of fp16); 2 = as 1 with one MMA per 128-K chunk; 3 = as 1 with the 4-bit
    unpack in inline PTX (the same sums, the weights times 2^-63 and the fp32 sum times 2^63;
    int4: its nibble as a bf16 subnormal and one fma per weight pair, 26 % fewer SASS per K
    step of the gate_up than DQ 1 offline, MXFP4 13 %; bench/sass_count.py):
    fused_moe runs 3 as 1 where it does not compile (has_dq3_asm: the interpreter, AMD).
    XM=1: direct mode's gate_up loads only the activation rows of tokens routed to the block's expert. W1/W2 = 2
    gives Triton's mma.sync code on Hopper instead of wgmma. DU: the down kernel's K loop
    unrolled (1, measured) or pipelined (0, with BK2 < I); NT2: n-tiles of BN2 rows per down
    program, run in a pipelined loop (1 = one; the most up to NT2 that divide H / BN2 run).
    DQ/XM/W=2/DU=0 are unmeasured
    candidates until session 3; measured on the H200 (bench/kernels_moe.py --set tc, bench/RESULTS.md
    "Session 3"), the winners are the 4-bit weight-only defaults: DQ 1, DU 0, BK2 128, S2 3; at
    M <= 16 also W1/W2 2, BN1 16 (int4) / 32 (MXFP4), XM 1; MXFP4 at M > 16 W1/W2 2, BN1 32.
    AP: sorted mode's moe_align in its one-launch parallel form (None: ATOM_STREAM_MOE_ALIGN_PAR).
    F16 (int4, bf16 activations, tensor-core path): fp16 MMAs instead of bf16 in the gate_up
    (1) or in both GEMMs (2): their activations converted in the kernel, saturating at
    +-65504; weights dequantized and scaled in fp16 (rounded once like DQ 1's bf16, with 3
    more bits). 1 is the default on AMD GPUs: CDNA has packed fp16 math but no packed bf16
    math, so the bf16 dequant compiles to fp32 arithmetic plus a software round per value;
    the gate_up's input is the normalized hidden state (bounded far below 65504), while the
    intermediate activation of DeepSeek-style models can carry large outliers, so the down
    kernel keeps bf16 unless 2. Offline (Triton 3.9, gfx950 = MI355, M=256 tiles): gate_up K
    loop 808 -> 379 instructions, down kernel 1787 -> 917 in all (gfx942 = MI300: 1032 ->
    472, 1999 -> 954); never timed on an AMD GPU (none reachable). 0 on NVIDIA, where DQ 3's
    bf16 unpack is the measured best.
    small_m_max (4-bit weight-only, bf16 x): M up to which kernels/moe_small_m.py runs instead of
    GEMV (0 = off); "small_m" = its config overrides. Measured H200, Kimi-K2.5 TP8 rank, CUDA-graph
    replay (bench/results/moe-small-m-h200.json, copy 4250 GB/s): int4 M=1 GEMV 31.1 us vs
    small-M 25.2 (gate_up alone 15.5, so down ~9.5; ratio 0.23), M=4 92.2 vs 72.4; mxfp4 M=1 27.2
    vs 26.6, M=4 79.6 vs 71.2; M=16 small-M 231 us vs the tensor cores' 222 (192 with the
    session-3 tc defaults) and 2-6x slower at M >= 64: hence 4.
    FP8C (not yet measured: bench/notes_fused_moe.md): GEMV FG1/FG2 rows per program and
    FBK1/FBK2 K per iteration, gemv_max 8 like the 4-bit formats; tensor cores as fp8_block
    with tiles fitted to H and I (multiples of 32)."""
    d = min(P, E)
    four_bit = fmt in (INT4, MXFP4)
    if four_bit:
        bn1 = 32 if d <= 128 else 64
        bk1 = 128
        bk2 = 128 * _pick((2, 1), I // 128)
    else:  # bf16: 64 rows x 64 K on 8 warps; fp8: 32 x 128 (both ~100-130 registers)
        bn1 = 16 if d <= 16 else (32 if fmt in (FP8, MXFP4_DS, FP8C) else 64)
        bk1 = 128 if fmt in (FP8, MXFP4_DS, FP8C) else 64
        bk2 = bk1
    bn2 = 64
    if fmt == FP8C:  # any H, I % 32 == 0 (w4a8 checkpoints; tiny test models)
        bn1, bk1, bk2, bn2 = _fit(bn1, I, 16), _fit(bk1, H, 32), _fit(bk2, I, 32), _fit(64, H, 16)
    w1 = 8 if bn1 >= 64 and not four_bit else 4
    g1, gc = (8, 8) if P <= 32 else (16, 4)  # M=1: 8 rows x 8 chunks; M=16: 16 x 4 (measured)
    tc4 = {}
    if four_bit and act == 0:  # session-3 H200 A/B (bench/RESULTS.md): 1.09-1.21x at M=16..256
        # DQ 3 (the unpack in inline PTX; DQ 1 where it does not compile), H200 session 13
        # (bench/RESULTS.md), whole MoE M=16 / 64 / 256, us: int4 141.7 -> 130.0, 307.8 ->
        # 281.5, 418.3 -> 384.8 (decode step B=64 24.48 -> 23.25 ms, B=256 34.60 -> 32.88);
        # MXFP4 157.3 -> 149.0, 341.2 -> 326.1, 463.0 -> 442.8
        tc4 = {"DQ": 3, "DU": 0, "BK2": 128, "S2": 3}
        if M <= 16 or fmt == MXFP4:  # mma.sync + narrow tiles won at small M and for MXFP4
            tc4.update(W1=2, W2=2, BN1=16 if fmt == INT4 else 32)
        if M <= 16:
            tc4["XM"] = 1
        # row-tiled w13 (wt > 1, tile_w13): 64-row gate_up tiles on 4 warps win for int4 at
        # M <= 16 (141 vs 158 us) and MXFP4 above (M=64 365 vs 371, M=256 553 vs 579 us); the
        # rest ties (H200, bench/kernels_moe.py --set tile, bench/RESULTS.md session 5)
        if wt > 1 and ((fmt == INT4 and M <= 16) or (fmt == MXFP4 and M > 16)):
            tc4.update(BN1=64, W1=4)
        # int4 direct mode at 8 < M <= 16, row-tiled w13: 128-row gate_up tiles (its time is
        # one program's serial K loop, so fewer, wider programs: gate_up alone 69.0 -> 65.2 us
        # at 110 experts; decode step B=16 11.289 -> 10.995 ms, means of 4 alternated runs,
        # H200 session 29, bench/moe_gate_up_waves.py, bench/RESULTS.md)
        if wt > 1 and fmt == INT4 and 8 < M <= 16 and I % 128 == 0:
            tc4["BN1"] = 128
        # int4 direct mode at M <= 8 (the tensor cores from TC_FROM_M), row-tiled w13: 256-K
        # gate_up steps (two 128-K chunks per load, half the serial loop's trips), and at M <= 4
        # 32-row tiles (twice the programs at ~1 per SM). H200 session 30, bench/RESULTS.md:
        # whole MoE M=4 D=32 50.9-51.6 -> 45.7 (BK1 256) -> 43.4 us (+ BN1 32), M=8 D=64 72.7
        # -> 69.2 us; decode step B=4 7.015 -> 6.612 ms, B=8 8.248 -> 8.064 (means of 3), BN1 32
        # then B=3 / 4 -1.2 / -1.9 % (-2.7 / -3.4 % against the B=2 control in the same runs)
        if wt > 1 and fmt == INT4 and M <= 8 and H % 256 == 0:
            tc4["BK1"] = 256
            if M <= 4 and I % 32 == 0:
                tc4["BN1"] = 32
        # int4 sorted mode: 128-row down tiles (H200, session 7, with the parallel align: M=64
        # 324 -> 309 us, M=256 438 -> 419; decode step B=64 28.3 -> 26.3 ms, B=256 46.8 ->
        # 40.6 with both; bench/kernels_moe.py --set down, bench/RESULTS.md)
        if fmt == INT4 and M > 16:
            tc4["BN2"] = 128
        # sorted mode: each down program runs 7 consecutive n-tiles (int4 896 rows, MXFP4 448)
        # in a loop the pipeliner multi-buffers (H200, session 20, bench/kernels_moe.py --set
        # nt, whole MoE us: int4 M=64 372-378 -> 364, M=256 495 -> 477; MXFP4 370-374 -> 366,
        # 513-514 -> 503; direct mode (M <= 16) unchanged within the spread)
        if M > 16:
            tc4["NT2"] = 7
        # int4 direct mode (M <= 16) on the sorted mode's down tiles too: 128 rows on 4 warps, 7
        # tiles per program (H200, session 20, decode A/B in two calls, a b a b then b a b a:
        # B=16 11.38 -> 11.07 ms at 1K, 12.86 -> 12.63 at 8K (means of 4); the whole-MoE kernel
        # time at M=16 a tie, 113.0 / 113.9 vs 112.8 us)
        if fmt == INT4 and M <= 16:
            tc4.update(BN2=128, W2=4, NT2=7)
        # int4 sorted mode at 16 < M <= 64, row-tiled w13: 4 gate_up stages instead of 3
        # (H200, session 23, bench/kernels_moe.py --set occ, two calls: whole MoE M=64 263.4 /
        # 265.1 / 263.3 / 264.8 -> 254.6 / 257.3 us; M=16 a tie; M=256 +1.4 %, so not there;
        # decode step B=64 21.244 / 20.956 -> 20.849 / 20.829 ms, a b a b)
        if fmt == INT4 and 16 < M <= 64 and wt > 1:
            tc4["S1"] = 4
        # int4 prefill-sized M: blocks of more tokens per expert (each block re-reads its
        # expert's weights): M=1024 BM 16/32/64 801/576/735 us, M=4096 2589/1825/1740, M=8192
        # 5048/3726/3040 (H200, session 7, bench/kernels_moe.py --set prefill)
        if fmt == INT4 and M > 512:
            tc4["BM"] = 64 if M > 2048 else 32
    if tc_small and four_bit and act == A_NONE:
        tc4.update(small_m_max=min(small_m_max(), TC_FROM_M - 1), gemv_max=TC_FROM_M - 1)
    return {"BM": 16, "BN1": bn1, "BK1": bk1, "W1": w1, "S1": 3, "BN2": bn2, "BK2": bk2, "W2": 4,
            "S2": 2, "BH": 1024, "direct": M <= 16, "OFFS": 1,
            "gemv_max": 16 if act == A_MXFP4 else 8, "G1": g1,
            "GC": _pick([c for c in (8, 4, 2, 1) if c <= gc], max(H // 128, 1)), "GW1": 4,
            "GS1": 3, "G2": 16 if fmt == MXFP4 and act != A_MXFP4 else 32, "GW2": 4, "GS2": 2,
            "FG1": 8, "FBK1": 512, "FG2": 32, "FBK2": 256, "SK": 1, "DQ": 0, "XM": 0,
            "DU": 1, "small_m_max": small_m_max() if four_bit and act == A_NONE else 0,
            "small_m": None, "F16": int(fmt == INT4 and bool(torch.version.hip))} | tc4


def _mdt(dtype: torch.dtype) -> int:
    if dtype == torch.float16:
        return F16
    if dtype == torch.bfloat16:
        return F32 if _INTERP else BF16  # the interpreter mishandles bf16 dots
    return F32


def _fp8c_scales(w13, w2, w13_scale, w2_scale, a13_scale, a2_scale, H, I):
    """FP8C checks -> (s13, s2, S_ROW1, S_ROW2, a13, a2, static activations)."""
    if w13.dtype != torch.float8_e4m3fn or w2.dtype != torch.float8_e4m3fn:
        raise NotImplementedError(f"fp8_tensor/fp8_channel: weights {w13.dtype} (e4m3fn only)")
    if H % 32 or I % 32:  # K of an fp8 MMA is 32
        raise NotImplementedError(f"fp8_tensor/fp8_channel: H {H}, I {I} not multiples of 32")
    E = w13.shape[0]
    rows = []
    for s, n, name in ((w13_scale, 2 * I, "w13_scale"), (w2_scale, H, "w2_scale")):
        if s.numel() == E:
            rows.append(0)
        elif tuple(s.shape) == (E, n):
            rows.append(1)
        else:
            raise ValueError(f"fused_moe: {name} {tuple(s.shape)}: want [{E}] or [{E}, {n}]")
    s13, s2 = w13_scale.reshape(E, -1).contiguous(), w2_scale.reshape(E, -1).contiguous()
    if (a13_scale is None) != (a2_scale is None):
        raise ValueError("fused_moe: static activations need both a13_scale and a2_scale")
    static = a13_scale is not None
    a13 = a13_scale.reshape(1).float() if static else s13
    a2 = a2_scale.reshape(1).float() if static else s2
    return s13, s2, rows[0], rows[1], a13, a2, static


def _small_m_ok(fmt, act, M, hidden, w13, s13, s2, out, cfg) -> bool:
    """True when kernels/moe_small_m.py takes the call: 4-bit repacked weights, weight-only,
    bf16 activations, out bf16/fp32 with unit column stride, the scale dtypes it reads (int4
    bf16, MXFP4 e8m0 uint8) contiguous, and 0 < M <= small_m_max. Anything else: GEMV / tc."""
    if fmt not in (INT4, MXFP4) or act != A_NONE or not 0 < M <= cfg.get("small_m_max", 0):
        return False
    sdt = torch.bfloat16 if fmt == INT4 else torch.uint8
    return (hidden.dtype == torch.bfloat16 and w13.dim() in (4, 5) and s13.dtype == sdt
            and s2.dtype == sdt and s13.is_contiguous() and s2.is_contiguous()
            and out.dtype in (torch.bfloat16, torch.float32) and out.stride(1) == 1)


def _pass_on(cfg: dict) -> dict:
    """fused_moe config keys that moe_small_m also understands (tests, benchmarks)."""
    return {k: cfg[k] for k in ("poison", "stop_after") if cfg.get(k)}


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, quant: str = "bf16",
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
              activation_quant: str | None = None, act_quant: bool | None = None,
              a13_scale: torch.Tensor | None = None, a2_scale: torch.Tensor | None = None,
              block=None, n_shared: int = 0, out: torch.Tensor | None = None,
              config: dict | None = None, allow_emulated_fp4: bool = False) -> torch.Tensor:
    """See the module docstring. Raises NotImplementedError for layouts/modes it does not run."""
    fmt = _QUANTS.get(quant)
    if fmt is None:
        raise NotImplementedError(f"fused_moe: quant={quant!r}")
    if fmt == FP8C and activation_quant in (None, "fp8") and act_quant is not False:
        activation_quant = "fp8"  # W4A8: fp8 activations always
    elif activation_quant is None and act_quant:
        activation_quant = {FP8: "fp8", MXFP4: "mxfp4"}.get(fmt)
        if activation_quant is None:
            raise NotImplementedError(f"fused_moe: act_quant with quant={quant!r}")
    act = {None: A_NONE, "fp8": A_FP8, "mxfp4": A_MXFP4}[activation_quant]
    if ((act == A_FP8 and fmt not in (FP8, FP8C)) or (act == A_MXFP4 and fmt != MXFP4)
            or (fmt == FP8C and act != A_FP8)):
        raise NotImplementedError(f"activation_quant={activation_quant!r} with quant={quant!r}")
    if fmt != FP8C and (a13_scale is not None or a2_scale is not None):
        raise NotImplementedError(f"fused_moe: static activation scales with quant={quant!r}")
    M, H = hidden.shape
    E = w13.shape[0]
    n13 = w13.shape[1] if w13.dim() > 1 else 0  # 2I (rows)
    wt = 1
    if fmt in (INT4, MXFP4) and w13.dim() in (4, 5):
        wt = w13_tile(w13, w13_scale)
        n13 = w13.shape[1] * wt
        wh, I = w13.shape[2] * 128, w2.shape[2] * 128
        w_row1, s_row1, w_row2, s_row2 = H // 8, H // 32, I // 8, I // 32
    elif fmt == MXFP4 and w13.dtype == torch.uint8:
        if not (has_fp4_mma(hidden.device) or allow_emulated_fp4 or _INTERP):
            raise NotImplementedError("raw MXFP4 needs FP4 matrix units: repack_mxfp4_moe")
        fmt = MXFP4_DS
        wh, I = w13.shape[2] * 2, w2.shape[2] * 2
        w_row1, s_row1, w_row2, s_row2 = H // 2, H // 32, I // 2, I // 32
    elif fmt == INT4:
        raise NotImplementedError("int4_g32 expects the kernel layout: repack_int4_moe(w)")
    else:
        wh, I = w13.shape[2], w2.shape[2]
        w_row1, w_row2 = H, I
        s_row1, s_row2 = (H // 128, I // 128) if fmt == FP8 else (0, 0)
        if fmt == FP8 and (block not in (None, (128, 128), [128, 128]) or H % 128 or I % 128):
            raise NotImplementedError(f"fp8_block: block {block}, H {H}, I {I}")
    if wh != H or n13 != 2 * I or tuple(w2.shape[:2]) != (E, H):
        raise ValueError(f"fused_moe: w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} vs H={H}")
    if fmt != FLOAT and (w13_scale is None or w2_scale is None):
        raise ValueError(f"fused_moe: quant={quant!r} needs w13_scale and w2_scale")
    if not (w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("fused_moe: expert weights must be contiguous")
    astatic = False
    s13 = w13_scale if w13_scale is not None else w13
    s2 = w2_scale if w2_scale is not None else w2
    a13 = a2 = s13  # unused pointers unless FP8C
    if fmt == FP8C:
        s13, s2, s_row1, s_row2, a13, a2, astatic = _fp8c_scales(
            w13, w2, w13_scale, w2_scale, a13_scale, a2_scale, H, I)
    top_k = topk_ids.shape[1]
    kp = top_k + n_shared
    P = M * kp
    if out is None:
        out = torch.empty(M, H, dtype=hidden.dtype, device=hidden.device)
    if M == 0:
        return out
    dq3 = has_dq3_asm(hidden.device)
    cfg = default_config(fmt, M, P, E, H, I, act, wt, dq3) | ENV_CONFIG | (config or {})
    if cfg["DQ"] == 3 and not dq3:
        cfg["DQ"] = 1
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.contiguous()
    mdt = mdt_down = _mdt(hidden.dtype)
    if cfg.get("F16") and fmt == INT4 and act == A_NONE and hidden.dtype == torch.bfloat16:
        # int4 on fp16 MMAs (default_config: AMD, where bf16 math is emulated): the gate_up
        # (1), also the down kernel (2)
        mdt = F16
        mdt_down = F16 if cfg["F16"] >= 2 else mdt_down
    # activations entering the GEMMs
    x, xs, stride_xs, act_out = hidden, hidden, 0, 0
    if act == A_MXFP4:
        packed = fmt == MXFP4_DS
        if H % 128:
            raise NotImplementedError("w4a4 needs H % 128 == 0")
        x, xs = act_quant_mxfp4(hidden, packed)
        stride_xs, act_out = H // 32, 2 if packed else 1
        mdt = F32 if hidden.dtype == torch.float32 else F16
        if cfg["BN1"] % 32:
            cfg["BN1"] = 32
    if _small_m_ok(fmt, act, M, hidden, w13, s13, s2, out, cfg):
        from . import moe_small_m as sm  # lazy: a module attribute, so tests can spy on it
        return sm.moe_small_m(hidden, w13, w2, s13, s2, topk_weights, topk_ids,
                              "int4" if fmt == INT4 else "mxfp4",
                              dict(cfg.get("small_m") or {}, **_pass_on(cfg)), n_shared=n_shared,
                              out=out)
    if fmt in (INT4, MXFP4) and M <= cfg["gemv_max"]:
        return gemv_path(x, xs, stride_xs, w13, w2, s13, s2, topk_ids, topk_weights, out, act,
                         act_out, fmt, cfg, H, I, top_k, kp, E - n_shared, wt)
    if fmt == FP8C and M <= cfg["gemv_max"]:
        return fp8_gemv_path(x, w13, w2, s13, s2, a13, a2, topk_ids, topk_weights, out, cfg, H,
                             I, top_k, kp, E - n_shared, s_row1, s_row2, astatic)
    return tc_path(x, xs, stride_xs, w13, w2, s13, s2, a13, a2, topk_ids, topk_weights, out,
                   fmt=fmt, act=act, act_out=act_out, mdt=mdt, cfg=cfg, H=H, I=I, top_k=top_k,
                   kp=kp, E=E, n_shared=n_shared, w_row1=w_row1, s_row1=s_row1, w_row2=w_row2,
                   s_row2=s_row2, astatic=astatic, wt=wt, mdt_down=mdt_down)
