"""Interleaved (GPT-J / DeepSeek) rotary embedding with YaRN, applied at every position.

Pair j = (x[2j], x[2j+1]) rotates by theta_j = p * inv_freq[j]. YaRN blends interpolated and
extrapolated frequencies with a linear ramp between the correction dims of beta_fast/beta_slow
(model_spec.md §3), and cos/sin are multiplied by mscale(factor, mscale)/mscale(factor,
mscale_all_dim). YaRN is never switched off by sequence length (pitfall 3).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from atom_stream.config import ModelConfig, yarn_get_mscale


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [rope_dim/2] float64, cos/sin multiplier)."""
    dim = cfg.qk_rope_head_dim
    base = cfg.rope_theta
    inv_ext = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rs = cfg.rope_scaling
    if rs.type != "yarn":
        return inv_ext, 1.0
    inv_int = inv_ext / rs.factor
    low = max(math.floor(_correction_dim(rs.beta_fast, dim, base,
                                         rs.original_max_position_embeddings)), 0)
    high = min(math.ceil(_correction_dim(rs.beta_slow, dim, base,
                                         rs.original_max_position_embeddings)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1.0 - ramp
    inv_freq = inv_int * (1 - extrapolation) + inv_ext * extrapolation
    mult = yarn_get_mscale(rs.factor, rs.mscale) / yarn_get_mscale(rs.factor, rs.mscale_all_dim)
    return inv_freq, mult


class RotaryEmbedding(nn.Module):
    """Holds cos/sin caches [max_pos, rope_dim/2] (float32) and rotates q_pe/k_pe: `forward`
    returns a rotated copy (torch reference), `rotate_` rotates in place (kernel path)."""

    def __init__(self, cfg: ModelConfig, max_positions: int, device=None):
        super().__init__()
        inv_freq, mult = yarn_inv_freq(cfg)
        t = torch.arange(max_positions, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", (freqs.cos() * mult).float().to(device), persistent=False)
        self.register_buffer("sin", (freqs.sin() * mult).float().to(device), persistent=False)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x [T, ..., rope_dim] at positions [T]; returns the rotated tensor in x's dtype."""
        return apply_interleaved_rope(x, self.cos[positions], self.sin[positions])

    def rotate_(self, positions: torch.Tensor, q_pe: torch.Tensor,
                k_pe: torch.Tensor | None = None) -> None:
        """Kernel path: rotate q_pe [T, H, rope_dim] and k_pe [T, rope_dim] | [T, 1, rope_dim]
        in place (one Triton launch; strided views with a contiguous last dim, e.g. the rope
        slice of q and of the kv_a output). Same math as forward (fp32, cast back)."""
        # imported per call: tests reload the kernel module under TRITON_INTERPRET=1
        from atom_stream.kernels.norm_rope import rope_interleaved_
        rope_interleaved_(q_pe, k_pe, self.cos, self.sin, positions)


def apply_interleaved_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, ..., D]; cos/sin [T, D/2]. Rotation in float32, cast back to x's dtype."""
    shape = x.shape
    xf = x.float().reshape(shape[0], -1, shape[-1] // 2, 2)
    c = cos.view(shape[0], 1, -1)
    s = sin.view(shape[0], 1, -1)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.reshape(shape).to(x.dtype)
