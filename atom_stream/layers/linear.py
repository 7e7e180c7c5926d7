"""Linear layers, tensor-parallel aware. Weights are [out, in] like nn.Linear; quantized formats
(layers/quant/) swap in their own parameters and forward through `quant_method`.

- "replicated": every rank holds the whole weight (q_a_proj, kv_a_proj_with_mqa, router).
- "column": each rank holds rows [rank*out/tp, (rank+1)*out/tp) (q_b, kv_b, gate/up, lm_head).
- "row": each rank holds columns [rank*in/tp, ...) and its partial outputs are summed over the
  ranks (o_proj, down_proj) unless the caller defers the reduction (`reduce=False`, MoE).

Each parameter carries `tp_dim` (None, 0 or 1): the dimension the loader narrows a checkpoint
tensor along for this rank. A vocab-sized dimension that the ranks do not divide (lm_head,
embed_tokens) is padded, as vLLM pads its vocab-parallel layers: each rank holds ceil(V/tp)
rows, the parameter carries `tp_full` = V (the checkpoint's extent), the rows past V are zero,
and the model drops their logits after the gather.
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F
from torch import nn

from atom_stream.layers.parallel import all_reduce, tp


class Linear(nn.Module):
    """y = x @ W^T (no bias: no DeepseekV3 linear has one)."""

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype, device=None,
                 parallel: str = "replicated", reduce: bool = True, pad: bool = False):
        """`pad` (column only, lm_head): out_features need not divide over the ranks; each
        holds ceil(out/tp) rows, zero past out (see the module docstring)."""
        super().__init__()
        self.tp = tp()
        self.parallel = parallel
        self.reduce = reduce and parallel == "row"
        full_out = out_features
        if parallel == "column" and pad:
            out_features = padded_shard(out_features, self.tp.size)
        elif parallel == "column":
            out_features = self.tp.shard(out_features, "output features")
        elif parallel == "row":
            in_features = self.tp.shard(in_features, "input features")
        elif parallel != "replicated":
            raise ValueError(f"unknown parallel mode {parallel!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.weight.tp_dim = {"replicated": None, "column": 0, "row": 1}[parallel]
        if out_features * self.tp.size != full_out and parallel == "column":
            self.weight.tp_full = full_out
        self.quant_method = None  # set by layers/quant when the checkpoint quantizes this layer
        # the Triton GEMV up to this many rows (dense_linear; the owner sets both by
        # measurement, e.g. models/mla.py for o_proj; 0 = cuBLAS)
        self.gemv_max_m = 0
        self.gemv_config: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            y = self.quant_method.apply(self, x)
        else:
            y = dense_linear(x, self.weight, self.gemv_max_m, self.gemv_config)
        return all_reduce(y, self.tp) if self.reduce else y

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, parallel={self.parallel}"


def _triton_rows_ok(x: torch.Tensor, w: torch.Tensor, max_m: int, kernel: str) -> bool:
    """Whether x @ w^T may go to the Triton kernel module `kernel` (kernels/gemv.py or
    kernels/gemm_splitk.py): GPU, 1..max_m rows (the caller's measured limit, at most the
    kernel's MAX_M), 16-bit operands of one dtype, w contiguous, x rows contiguous."""
    if not (max_m > 0 and x.is_cuda and x.dim() == 2 and 1 <= x.shape[0] <= max_m):
        return False
    return (x.shape[0] <= _kernel_max_m(kernel) and x.dtype == w.dtype
            and x.dtype in (torch.bfloat16, torch.float16)
            and w.is_contiguous() and x.stride(-1) == 1)


@functools.cache
def _kernel_max_m(kernel: str) -> int:
    """The kernel module's MAX_M, imported on the first GPU call (the kernels import Triton)."""
    return importlib.import_module(f"atom_stream.kernels.{kernel}").MAX_M


def gemv_ok(x: torch.Tensor, w: torch.Tensor, max_m: int) -> bool:
    """Whether x @ w^T goes to the Triton GEMV (kernels/gemv.py). The caller picks max_m per
    projection by measurement (models/mla.py QB_GEMV_MAX_M: q_b; models/deepseek_v3.py ROUTER /
    SHARED_DOWN_GEMV_MAX_M); routing every projection through it was slower (RESULTS session
    16)."""
    return _triton_rows_ok(x, w, max_m, "gemv")


def splitk_ok(x: torch.Tensor, w: torch.Tensor, splitk: tuple[int, dict] | None) -> bool:
    """Whether x @ w^T goes to the Triton split-K GEMM (kernels/gemm_splitk.py): splitk =
    (max_m, config), the caller's measured limit (None or 0 = off)."""
    return splitk is not None and _triton_rows_ok(x, w, splitk[0], "gemm_splitk")


def dense_linear(x: torch.Tensor, w: torch.Tensor, gemv_max_m: int = 0,
                 gemv_config: dict | None = None,
                 splitk: tuple[int, dict] | None = None) -> torch.Tensor:
    """x @ w^T for an unquantized weight [out, in]: the Triton GEMV up to the caller's
    gemv_max_m rows (gemv_config: its tiles), then the Triton split-K GEMM up to splitk's
    (max_m, config), torch's F.linear otherwise (cuBLAS / hipBLASLt). Both Triton kernels run
    only where measured faster than cuBLAS (bench/dense_gemv.py, bench/splitk_gemm.py)."""
    if gemv_ok(x, w, gemv_max_m):
        from atom_stream.kernels.gemv import gemv
        return gemv(x, w, config=gemv_config)
    if splitk_ok(x, w, splitk):
        from atom_stream.kernels.gemm_splitk import gemm_splitk
        return gemm_splitk(x, w, config=splitk[1])
    return F.linear(x, w)


def dense_weight(layer: Linear) -> torch.Tensor:
    """The layer's weight as a dense [out, in] tensor (dequantized when the layer is quantized)."""
    if layer.quant_method is not None:
        return layer.quant_method.dequantize(layer)
    return layer.weight


def padded_shard(full: int, size: int) -> int:
    """Rows per rank of a vocab-sized dim split over `size` ranks: ceil(full / size) (the last
    ranks' rows past `full` are padding)."""
    return -(-full // size)


class VocabEmbedding(nn.Module):
    """Vocab-parallel embedding: rank r holds rows [r*L, (r+1)*L) with L = ceil(V/tp) (rows past
    V are zero padding, never looked up); out-of-shard ids give zeros locally and the
    all-reduce fills them in."""

    def __init__(self, vocab: int, hidden: int, *, dtype: torch.dtype, device=None):
        super().__init__()
        self.tp = tp()
        self.local = padded_shard(vocab, self.tp.size)
        self.start = self.tp.rank * self.local
        self.weight = nn.Parameter(torch.empty(self.local, hidden, dtype=dtype, device=device),
                                   requires_grad=False)
        self.weight.tp_dim = 0
        if self.local * self.tp.size != vocab:
            self.weight.tp_full = vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        inside = (local >= 0) & (local < self.local)
        out = F.embedding(local.clamp(0, self.local - 1), self.weight)
        out = out * inside[:, None].to(out.dtype)
        return all_reduce(out, self.tp)
