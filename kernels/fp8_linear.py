"""FP8 block-scaled dense GEMM (DeepSeek-V3 / Kimi-K2-Instruct `weight_scale_inv`, model_spec §4a).

    y[M, N] = x[M, K] @ dequant(W[N, K], scale_inv[ceil(N/bn), ceil(K/bk)])^T
    dequant(W)[n, k] = W[n, k] * scale_inv[n // bn, k // bk]   (block [bn, bk], normally 128x128)

The weight is read as fp8 (1 B/weight, never dequantized to memory) and its block scale is
applied inside the K loop: each K step covers BLOCK_K <= bk channels of one scale column, so
    acc[m, n] += dot(a[m, k-tile], w[n, k-tile]) * a_scale[m, g] * w_scale[n // bn, g]
with fp32 accumulation. Partial edge blocks (N or K not a multiple of the block, e.g. kv_a's 576
rows) are masked; the masked weights read as 0.

Two modes:
- "w8a8" (default where the GPU has fp8 matrix units: NVIDIA sm89+, AMD gfx94x/gfx95x):
  x is quantized per token per bk channels (kernels/norm_rope.per_token_group_quant_fp8,
  s = max(amax, 1e-4) / fp8_max, a power of two when ue8m0) and the kernel runs an fp8 x fp8
  tl.dot. The activation fp8 dtype is the weight's (e4m3fn, or e4m3fnuz on MI300 after the load
  conversion in layers/quant/common.fp8_to_platform).
- "weight_only": fp8 weights upcast in-kernel (their bytes decoded with integer ops into fp16,
  exact, then to the activation dtype: no fp8 type support needed, so it also runs on sm80 /
  MI200), a bf16/fp16 dot (fp32 IEEE for fp32 inputs) and the block scale applied to the fp32
  partial product. For GPUs without fp8 dots, and when activation quant is switched off.

Activation choice and source. vLLM's default for `quant_method: fp8` with `weight_block_size`
(Fp8LinearMethod -> W8A8BlockFp8LinearOp, every backend: CUTLASS, DeepGEMM, FlashInfer, AITER,
Triton `w8a8_triton_block_scaled_mm`) quantizes activations dynamically per token per 128
channels (`per_token_group_quant_fp8`) and runs fp8 x fp8 with per-block scales; SGLang does the
same, and DeepSeek's own `inference/kernel.py` ships that kernel (`act_quant` + `fp8_gemm`) — it
is the scheme the model was trained with (1x128 activation tiles, 128x128 weight blocks). The
DeepSeek-V3 demo (`inference/model.py`) defaults to `gemm_impl = "bf16"` (dequantize the weight
and a bf16 GEMM, i.e. weight-only) for simplicity, with "fp8" as the alternative. We match the
production servers: w8a8 by default (also what layers/quant/fp8_block.py's CPU reference
emulates), weight-only where fp8 dots are unavailable (vLLM falls back to a weight-only FP8
Marlin kernel on such GPUs).

Tiling: BLOCK_K = min(128, bk) (must divide bk); BLOCK_M 16 for decode (M <= 16) so the tile is
not wasted; small grids (fewer tiles than SMs) split K: each split writes an fp32 partial
[S, M, N] and a second launch sums them in a fixed order (deterministic) and casts. No host
syncs: CUDA-graph capturable.

Torch references: `fp8_block_linear_ref` (float64: dequantize + matmul, optionally with the
activation quant-dequant first). Shapes: x [..., K] (last dim contiguous after reshape),
weight [N, K] fp8, scale_inv [ceil(N/bn), ceil(K/bk)] fp32 -> [..., N] in x.dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import envs
from .norm_rope import per_token_group_quant_fp8, per_token_group_quant_fp8_ref

_INTERP = envs.triton_interpreted()
_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, n))
BF16, F16, F32 = 0, 1, 2  # weight-only MMA operand dtype (constexpr MDT)


@triton.jit
def _fp8_bits_to_f16(u):
    """e4m3 bytes (uint8) -> fp16 with the same sign/exponent/mantissa bits moved into place:
    value * 2^-8 for e4m3fn (exponent bias 7 vs 15), value * 2^-7 for e4m3fnuz (bias 8);
    subnormals included, exact. Integer ops only, so no fp8 type support is needed (sm80)."""
    v = u.to(tl.int32)
    bits = ((v & 0x80) << 8) | ((v & 0x7F) << 7)
    return bits.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _fp8_block_mm_kernel(A, AS, B, BS, C, M, N, K, kb_per_split,
                         stride_am, stride_ak, stride_asm, stride_asg,
                         stride_bn, stride_bk, stride_bsn, stride_bsg,
                         stride_cs, stride_cm, stride_cn,
                         GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                         W8A8: tl.constexpr, MDT: tl.constexpr, W_UNIT: tl.constexpr):
    """One [BLOCK_M, BLOCK_N] output tile over K steps [pid_k * kb_per_split, ...) of BLOCK_K.
    weight_only: B is the fp8 weight viewed as uint8 and W_UNIT the value of its decoded fp16
    unit (see _fp8_bits_to_f16)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row tiles share the weight tiles they read while in L2
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % rows
    pid_n = (pid % width) // rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    kb0 = pid_k * kb_per_split
    kb1 = tl.minimum(kb0 + kb_per_split, tl.cdiv(K, BLOCK_K))

    a_ptrs = A + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_n.to(tl.int64)[None, :] * stride_bn + offs_k[:, None] * stride_bk
    a_ptrs += kb0 * BLOCK_K * stride_ak
    b_ptrs += kb0 * BLOCK_K * stride_bk
    bs_ptrs = BS + (offs_n // GROUP_N) * stride_bsn
    as_ptrs = AS + offs_m * stride_asm

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb0, kb1):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b_mask = (offs_k[:, None] < k_left) & mask_n[None, :]
        if W8A8:
            b = tl.load(b_ptrs, mask=b_mask, other=0.0)
        else:
            b = tl.load(b_ptrs, mask=b_mask, other=0)  # uint8 bytes
        g = (kb * BLOCK_K) // GROUP_K  # the scale column of this K step
        w_s = tl.load(bs_ptrs + g * stride_bsg, mask=mask_n, other=0.0)
        if W8A8:
            a_s = tl.load(as_ptrs + g * stride_asg, mask=mask_m, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * w_s[None, :]
        else:
            wf = _fp8_bits_to_f16(b)
            if MDT == 0:
                d = tl.dot(a.to(tl.bfloat16), wf.to(tl.bfloat16))
            elif MDT == 1:
                d = tl.dot(a.to(tl.float16), wf)
            else:
                d = tl.dot(a.to(tl.float32), wf.to(tl.float32), input_precision="ieee")
            acc += d * (w_s * W_UNIT)[None, :]
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = (C + pid_k * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm
              + offs_n[None, :] * stride_cn)
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _splitk_sum_kernel(WS, OUT, MN, S, BLOCK: tl.constexpr):
    """OUT[i] = sum_s WS[s, i] (fixed order, fp32), cast to OUT's dtype; WS [S, MN] contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(WS + s * MN + offs, mask=mask, other=0.0)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Fp8LinearConfig:
    """Tile config; split_k None: chosen from the grid size (1 = no split)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    split_k: int | None = None


def default_config(M: int, N: int, K: int) -> Fp8LinearConfig:
    """M-bucketed tiles (decode M <= 16 gets BLOCK_M 16). Starting points for the H200 bench
    (bench/fp8_linear.py --sweep), not tuned values."""
    if M <= 16:
        return Fp8LinearConfig(16, 64, num_warps=4, num_stages=4)
    if M <= 32:
        return Fp8LinearConfig(32, 64, num_warps=4, num_stages=4)
    if M <= 64:
        return Fp8LinearConfig(64, 64, num_warps=4, num_stages=3)
    if M <= 128:
        return Fp8LinearConfig(64, 128, num_warps=4, num_stages=3)
    return Fp8LinearConfig(128, 128, num_warps=8, num_stages=3)


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # CPU / interpreter: small grids still exercise split-K
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=8)
def fp8_dot_supported(device: torch.device) -> bool:
    """Whether tl.dot takes fp8 operands here: NVIDIA sm89+ (Ada, Hopper, Blackwell), AMD
    gfx94x (MI300, e4m3fnuz) and gfx95x (MI355, e4m3fn); the CPU interpreter emulates it."""
    if device.type != "cuda":
        return _INTERP
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(device).gcnArchName
        return "gfx94" in arch or "gfx95" in arch
    return torch.cuda.get_device_capability(device) >= (8, 9)


def choose_split_k(M: int, N: int, K: int, cfg: Fp8LinearConfig, block_k: int,
                   device: torch.device) -> int:
    """Splits of the K loop: enough programs to cover the SMs twice when the output tiles alone
    do not, each split keeping >= 4 K steps (the partials stay small next to the weight)."""
    if cfg.split_k is not None:
        return max(1, cfg.split_k)
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    sms = _num_sms(device)
    if tiles >= sms:
        return 1
    k_steps = triton.cdiv(K, block_k)
    return max(1, min(triton.cdiv(2 * sms, tiles), k_steps // 4))


def _mdt(dtype: torch.dtype) -> int:
    if dtype == torch.float32:
        return F32
    if dtype == torch.float16:
        return F16
    return F32 if _INTERP else BF16  # the interpreter mishandles bf16 dots


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                     block: tuple[int, int] = (128, 128), *, mode: str = "w8a8",
                     ue8m0: bool = False, out: torch.Tensor | None = None,
                     config: Fp8LinearConfig | None = None) -> torch.Tensor:
    """x [..., K] (bf16/fp16/fp32) @ dequant(weight [N, K] fp8, scale_inv)^T -> [..., N] in
    x.dtype (or written into `out`, contiguous [..., N]). mode "w8a8" | "weight_only"."""
    if mode not in ("w8a8", "weight_only"):
        raise ValueError(f"mode {mode!r}: expected 'w8a8' or 'weight_only'")
    N, K = weight.shape
    bn, bk = block
    assert weight.dtype in _FP8 and x.shape[-1] == K
    assert scale_inv.shape == (triton.cdiv(N, bn), triton.cdiv(K, bk))
    block_k = min(128, bk)
    assert bk % block_k == 0 and block_k >= 16 and block_k & (block_k - 1) == 0, block
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if out is None:
        out = torch.empty(*lead, N, dtype=x.dtype, device=x.device)
    assert out.shape == (*lead, N) and out.is_contiguous()
    out2 = out.view(M, N)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    if mode == "w8a8":
        a, a_s = per_token_group_quant_fp8(x2, bk, ue8m0, weight.dtype)
        b, w_unit = weight, 1.0
    else:  # a_s unused; the weight is decoded from its bytes in-kernel
        a, a_s = x2, scale_inv
        b = weight.view(torch.uint8)
        w_unit = 2.0 ** (8 if weight.dtype == torch.float8_e4m3fn else 7)
    cfg = config or default_config(M, N, K)
    split = choose_split_k(M, N, K, cfg, block_k, x.device)
    k_steps = triton.cdiv(K, block_k)
    kb_per_split = triton.cdiv(k_steps, split)
    split = triton.cdiv(k_steps, kb_per_split)  # no empty splits
    c = out2 if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=x.device)
    cs = (0, c.stride(0), c.stride(1)) if split == 1 else c.stride()
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split)
    _fp8_block_mm_kernel[grid](
        a, a_s, b, scale_inv, c, M, N, K, kb_per_split,
        a.stride(0), a.stride(1), a_s.stride(0), a_s.stride(1),
        b.stride(0), b.stride(1), scale_inv.stride(0), scale_inv.stride(1),
        cs[0], cs[1], cs[2],
        GROUP_N=bn, GROUP_K=bk, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        GROUP_M=cfg.group_m, W8A8=mode == "w8a8", MDT=_mdt(x.dtype), W_UNIT=w_unit,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    if split > 1:
        rb = 1024
        _splitk_sum_kernel[(triton.cdiv(M * N, rb),)](c, out2, M * N, split, BLOCK=rb,
                                                      num_warps=4)
    return out


# ---------------------------------------------------------------- torch references
def dequantize_fp8_block_f64(weight: torch.Tensor, scale_inv: torch.Tensor,
                             block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """weight [N, K] fp8 * scale_inv per block, in float64 (exact)."""
    N, K = weight.shape
    s = scale_inv.double().repeat_interleave(block[0], 0)[:N].repeat_interleave(block[1], 1)
    return weight.double() * s[:, :K]


def fp8_block_linear_ref(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int] = (128, 128), *, mode: str = "w8a8",
                         ue8m0: bool = False) -> torch.Tensor:
    """float64 reference of fp8_block_linear: "weight_only" = x @ dequant(W)^T; "w8a8" first
    replaces x by its per-token-group fp8 quant-dequant (torch, same rule and fp8 dtype as the
    kernel path). Returns float64 [..., N]."""
    w = dequantize_fp8_block_f64(weight, scale_inv, block)
    if mode == "w8a8":
        q, s = per_token_group_quant_fp8_ref(x, block[1], ue8m0, weight.dtype)
        xd = q.double().unflatten(-1, (-1, block[1])) if q.shape[-1] % block[1] == 0 else None
        if xd is None:  # K not a multiple of the group: scale each column by its group's s
            cols = torch.arange(q.shape[-1], device=q.device) // block[1]
            xd = q.double() * s.double()[..., cols]
        else:
            xd = (xd * s.double()[..., None]).flatten(-2)
        return xd @ w.T
    return x.double() @ w.T
