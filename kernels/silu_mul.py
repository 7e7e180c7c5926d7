"""SiLU(gate) * up in one launch: the activation of SwiGLU MLPs (dense layers, shared experts).

silu_mul(gu [T, 2I]) -> [T, I] in gu's dtype, gu = [gate | up] along the last dim (the output of
the fused gate/up GEMM; rows may be strided, the last dim contiguous). Same rounding points as
the torch form `F.silu(gu[:, :I]) * gu[:, I:]`: silu in fp32 rounded to the dtype, then the
product in fp32 rounded to the dtype (so the two agree to exp's last-bit differences).
silu_mul_ref is that torch form. Graph capturable (grid from shapes only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(GU, OUT, I, stride_g, stride_o, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(GU + t * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + t * stride_g + I + offs, mask=mask, other=0.0).to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + t * stride_o + offs, (s * u).to(OUT.dtype.element_ty), mask=mask)


def silu_mul(gu: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gu [T, 2I] -> out [T, I] (allocated when None), see the module docstring."""
    T, two_i = gu.shape
    if two_i % 2 or gu.stride(-1) != 1:
        raise ValueError(f"silu_mul: want [T, 2I] with a contiguous last dim, got "
                         f"{tuple(gu.shape)} strides {gu.stride()}")
    inter = two_i // 2
    if out is None:
        out = torch.empty(T, inter, dtype=gu.dtype, device=gu.device)
    if T:
        block = min(1024, triton.next_power_of_2(inter))
        _silu_mul_kernel[(T, triton.cdiv(inter, block))](
            gu, out, inter, gu.stride(0), out.stride(0), BLOCK=block, num_warps=4)
    return out


def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    inter = gu.shape[-1] // 2
    return F.silu(gu[:, :inter]) * gu[:, inter:]
