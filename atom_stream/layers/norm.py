"""RMSNorm as HF computes it: normalize in float32, cast back, then scale by the weight.

`RMSNorm.forward(x)` is the torch reference (CPU engine). `RMSNorm.fused(x, residual)` is the
kernel path (models/kernel_path.py): one Triton launch (kernels/norm_rope.fused_add_rmsnorm)
that first adds the residual in x's dtype (HF's `h = x + sublayer(x)`) and returns
(normed, residual_out) with residual_out = x + residual (x itself when residual is None).
x [..., D] may be a strided view whose last dim is contiguous (e.g. the q_a slice of the fused
q_a/kv_a GEMM output); normed is a new contiguous tensor in x's dtype.
"""

from __future__ import annotations

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * (x / sqrt(mean(x^2) + eps)); x [..., D], weight [D]; returns x's dtype."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def fused(self, x: torch.Tensor, residual: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel path: (rms_norm(x + residual), x + residual); see the module docstring."""
        # imported per call: tests reload the kernel module under TRITON_INTERPRET=1
        from atom_stream.kernels.norm_rope import fused_add_rmsnorm
        return fused_add_rmsnorm(x, residual, self.weight, self.eps)
