"""Linear layers. Weights are [out, in] like nn.Linear; quantized formats (layers/quant/) swap in
their own parameters and `forward` through `quant_method`.

Tensor parallelism (issue 9) shards these by rows (column-parallel) or columns (row-parallel);
with tp_size 1 they are plain linears.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x @ W^T (no bias: no DeepseekV3 linear has one)."""

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=dtype, device=device), requires_grad=False
        )
        self.quant_method = None  # set by layers/quant when the checkpoint quantizes this layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x)
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}"


def dense_weight(layer: Linear) -> torch.Tensor:
    """The layer's weight as a dense [out, in] tensor (dequantized when the layer is quantized)."""
    if layer.quant_method is not None:
        return layer.quant_method.dequantize(layer)
    return layer.weight
