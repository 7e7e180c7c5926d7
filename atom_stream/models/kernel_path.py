"""The one switch between the model's two forward paths, and the router GEMM of the fast path.

- Reference path (CPU engine, parity tests): plain torch ops in HF's order (layers/*.py).
- Kernel path (every CUDA/ROCm tensor): residual carried through the layers and fused with the
  RMSNorms (kernels/norm_rope.fused_add_rmsnorm), RoPE in place (rope_interleaved_), one GEMM
  for q_a/kv_a, the router GEMM in the model dtype with fp32 output + one routing kernel
  (kernels/moe_routing), batched GEMMs for W_UK/W_UV, the Triton KV store and MLA decode.
  Every op on its decode path is CUDA-graph capturable (no host syncs, no data-dependent
  shapes). Both paths compute the same math; outputs agree to the model dtype's rounding.

`active(x)` is true for CUDA tensors, or for any tensor after `set_force_kernels(True)`: CPU tests
force it under TRITON_INTERPRET=1 (set before the kernel modules are imported); forcing it on a
CPU without the interpreter makes Triton fail at the first launch.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from atom_stream import envs
from atom_stream.layers.linear import gemv_ok, splitk_ok

_force = False


def set_force_kernels(on: bool) -> None:
    """Force the kernel path for CPU tensors too (tests under TRITON_INTERPRET=1)."""
    global _force
    _force = bool(on)


@contextmanager
def force_kernels(on: bool = True):
    """Context manager form of set_force_kernels; restores the previous setting."""
    global _force
    prev = _force
    _force = bool(on)
    try:
        yield
    finally:
        _force = prev


def active(x: torch.Tensor) -> bool:
    """Whether the forward over `x` takes the kernel path."""
    return x.is_cuda or _force


@functools.lru_cache(maxsize=8)
def _mm_fp32_out_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm(a, b, out_dtype=float32) runs for `dtype` operands on `device` (cuBLAS /
    hipBLASLt in recent torch; not the CPU). Probed once per device, outside graph capture (the
    runner's warm-up forward comes first)."""
    try:
        a = torch.ones(1, 16, dtype=dtype, device=device)
        return torch.mm(a, a.t(), out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def linear_fp32_out(x: torch.Tensor, weight: torch.Tensor, gemv_max_m: int = 0,
                    gemv_config: dict | None = None,
                    splitk: tuple[int, dict] | None = None) -> torch.Tensor | None:
    """x [N, K] @ weight[M, K]^T as float32 [N, M] straight from one GEMM (fp32 accumulate, no
    rounding to x's dtype; used for the lm_head logits), or None where the backend lacks a
    mixed-output mm and x is not already float32 (the caller keeps its own path). Up to
    gemv_max_m rows (the caller's measured limit) kernels/gemv.py runs it instead (one launch,
    no split-K reduce; gemv_config: its tiles / warps), then up to splitk's (max_m, config)
    kernels/gemm_splitk.py (its split-K sums in the same launch)."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.linear(x, weight)
    if gemv_ok(x, weight, gemv_max_m):
        from atom_stream.kernels.gemv import gemv
        return gemv(x, weight, out_dtype=torch.float32, config=gemv_config)
    if splitk_ok(x, weight, splitk):
        from atom_stream.kernels.gemm_splitk import gemm_splitk
        return gemm_splitk(x, weight, out_dtype=torch.float32, config=splitk[1])
    if x.dtype == weight.dtype and _mm_fp32_out_ok(x.device, x.dtype):
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return None


# One-row steps (B=1 decode): each decoder layer's two add + RMSNorms folded into the GEMV that
# reads their output (q_a + kv_a; router + shared gate/up), kernels/gemv.py `norm=`: one launch
# and one DRAM round trip fewer per norm. ATOM_STREAM_NORM_GEMV=0 keeps the add_rmsnorm launches.
NORM_GEMV = envs.flag("ATOM_STREAM_NORM_GEMV")


class PreNorm:
    """h = RMSNorm(x + residual) for a one-row step, left to the GEMV that reads h.

    DecoderLayer hands this to a sublayer that takes it (`takes_prenorm`) instead of h. The
    sublayer's first GEMM calls `prenorm_linear`: where that GEMM runs on kernels/gemv.py the
    add + RMSNorm happen inside it (`gemv(norm=...)`), otherwise `resolve()` runs the unfused
    add_rmsnorm kernel first. Either way `residual_out` is then the new residual stream (x +
    residual, or x itself for layer 0's residual None) and `h` the normed row where it was
    materialized (always after `resolve()`; after the fused GEMV when asked with need_h).
    shape / dtype / device / is_cuda are x's, so shape checks run unchanged."""

    __slots__ = ("_res_out", "h", "norm", "residual", "x")

    def __init__(self, x: torch.Tensor, residual: torch.Tensor | None, norm) -> None:
        self.x, self.residual, self.norm = x, residual, norm
        self.h: torch.Tensor | None = None
        self._res_out: torch.Tensor | None = None

    shape = property(lambda self: self.x.shape)
    dtype = property(lambda self: self.x.dtype)
    device = property(lambda self: self.x.device)
    is_cuda = property(lambda self: self.x.is_cuda)

    @property
    def residual_out(self) -> torch.Tensor:
        if self._res_out is None:
            raise RuntimeError("PreNorm: read residual_out before any consumer computed it")
        return self._res_out

    def resolve(self) -> torch.Tensor:
        """h by the unfused add + RMSNorm kernel (once; later calls return the same h)."""
        if self.h is None:
            self.h, self._res_out = self.norm.fused(self.x, self.residual)
        return self.h

    def gemv(self, w: torch.Tensor, config: dict | None, out_dtype: torch.dtype | None = None,
             need_h: bool = False) -> torch.Tensor:
        """h @ w^T by kernels/gemv.py with the add + RMSNorm folded in; writes residual_out (and
        h with need_h)."""
        from atom_stream.kernels.gemv import gemv
        x = self.x  # fresh contiguous outputs, whatever x's strides (gemv's contract)
        res_out = (torch.empty(x.shape, dtype=x.dtype, device=x.device)
                   if self.residual is not None else None)
        h = torch.empty(x.shape, dtype=x.dtype, device=x.device) if need_h else None
        y = gemv(x, w, out_dtype=out_dtype, config=config,
                 norm=(self.residual, self.norm.weight, self.norm.eps, res_out, h))
        self._res_out = res_out if res_out is not None else x
        self.h = h
        return y


def prenorm_linear(x, w: torch.Tensor, gemv_max_m: int = 0, gemv_config: dict | None = None,
                   splitk: tuple[int, dict] | None = None, *, fp32_out: bool = False,
                   need_h: bool = False) -> torch.Tensor | None:
    """x @ w^T where x is a tensor or a PreNorm: the add + RMSNorm go into the GEMV when it takes
    the row (gemv_ok at gemv_max_m), else the PreNorm is resolved first. The rest as
    layers.linear.dense_linear (fp32_out: linear_fp32_out, which may return None)."""
    if isinstance(x, PreNorm):
        if x.shape[0] == 1 and gemv_ok(x.x, w, gemv_max_m):  # gemv's norm= takes one row
            return x.gemv(w, gemv_config, torch.float32 if fp32_out else None, need_h)
        x = x.resolve()
    if fp32_out:
        return linear_fp32_out(x, w, gemv_max_m, gemv_config, splitk=splitk)
    from atom_stream.layers.linear import dense_linear
    return dense_linear(x, w, gemv_max_m, gemv_config, splitk)


def router_logits(x: torch.Tensor, weight_lp: torch.Tensor, weight_fp32: torch.Tensor
                  ) -> torch.Tensor:
    """Router logits [T, E] float32 from x [T, H] (model dtype).

    weight_lp [E, H] is the router weight in x's dtype (the checkpoint stores it in bf16, so the
    copy is exact), weight_fp32 the reference's float32 weight. Fast: one GEMM reading the
    bf16 weight, fp32 accumulate and fp32 output. Where the backend has no mixed-output mm,
    the reference's fp32 GEMM (never logits rounded to bf16, which would flip near-tied experts).
    """
    if x.dtype == torch.float32:
        return F.linear(x, weight_fp32)
    if _mm_fp32_out_ok(x.device, x.dtype):
        return torch.mm(x, weight_lp.t(), out_dtype=torch.float32)
    return F.linear(x.float(), weight_fp32)


# The shared expert on a side stream (models/deepseek_v3.MoE): off unless
# ATOM_STREAM_SIDE_STREAM=1. Its first H200 run measured B=1 decode 7.46 ms vs 6.76 ms without
# (confounded with another change); bench/decode.py compares both settings in one session.
SIDE_STREAM = envs.flag("ATOM_STREAM_SIDE_STREAM")
_side_streams: dict[int, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One extra stream per GPU for work that overlaps the main stream inside a layer (fork with
    side.wait_stream(main), join with main.wait_stream(side); graphs capture both)."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    s = _side_streams.get(idx)
    if s is None:
        s = _side_streams[idx] = torch.cuda.Stream(device=idx)
    return s
