"""Online quantization of unquantized Linear weights as they load (layers/quant/online.py):
"ptpc_fp8" (ATOM's per-token activation, per-channel weight FP8) and "per_block_fp8"
(DeepSeek 128x128 block FP8, fp8_block.py's method).

ptpc_fp8 at rest: `weight` FP8 e4m3 [out, in] (common.platform_fp8_dtype(): e4m3fnuz on MI300
with the scale doubled, same values) and `weight_scale` fp32 [out, 1]:
    s_w[n] = amax(W[n, :]) / 448,  q[n, k] = fp8(W[n, k] / s_w[n]).
The scale of a row-parallel layer's row is taken over the whole checkpoint row before the rank
keeps its columns, so every TP size holds the same FP8 weights.
Forward: the activation is quantized per token, s_x[t] = max(amax(x[t, :]), 1e-4) / 448, and
    y[t, n] = (q_x[t, :] . q[n, :]) * s_x[t] * s_w[n]     (fp32 accumulation, x's dtype out).
GPU (models/kernel_path.active): kernels/fp8_linear.fp8_block_linear with the block (1, Kp),
Kp = next power of two >= K: one weight scale per row and one activation group per token (its
per_token_group_quant_fp8 is the quantizer above), fp8 x fp8 dots ("w8a8"; "weight_only" on
GPUs without fp8 dots or with act_quant off). CPU: the torch reference, F.linear on the
quant-dequantized activation and weight (fp8_qdq_group with one group per row: the same rule).

per_block_fp8: Fp8BlockLinearMethod with `load` quantizing the float weight (this rank's shard,
whole 128-blocks under TP) to fp8 e4m3 with one scale per 128x128 block, s = amax / 448.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from atom_stream.kernels.moe_ref import exact_div
from atom_stream.layers.quant.common import (
    FP8, FP8_MAX, CheckpointError, LinearMethod, copy_into, fp8_qdq_group, fp8_to_platform,
    platform_fp8_dtype, tp_narrow,
)
from atom_stream.layers.quant.fp8_block import (
    Fp8BlockLinearMethod,
    fp8_kernel_mode,
    fp8_linear_kernel,
)


def _pow2(n: int) -> int:
    return 1 << max(4, (n - 1).bit_length())


def _float_weight(tensor: torch.Tensor, name: str) -> torch.Tensor:
    if not tensor.dtype.is_floating_point or tensor.dtype.itemsize == 1:
        raise CheckpointError(f"{name}: online_quant_config quantizes this layer from its float "
                              f"weight, but the checkpoint tensor is {tensor.dtype}")
    return tensor.float()


def channel_scale(w: torch.Tensor) -> torch.Tensor:
    """fp32 [out, 1]: amax of each row / 448 (rows of zeros get a tiny positive scale)."""
    return exact_div(w.float().abs().amax(-1, keepdim=True), FP8_MAX).clamp(min=1e-12)


def quantize_rows(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3fn of w / scale (scale broadcast over the rows' columns)."""
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def ptpc_qdq(x: torch.Tensor) -> torch.Tensor:
    """Per-token FP8 quant-dequant of activations: s = max(amax(row), 1e-4) / 448."""
    return fp8_qdq_group(x, _pow2(x.shape[-1]))


class PtpcFp8LinearMethod(LinearMethod):
    format = "ptpc_fp8"
    suffixes = ("weight",)
    online = True
    act_quant = True  # per-token activation quant (production); set_activation_quant may clear

    def create_buffers(self, layer, device) -> None:
        layer.register_buffer("weight", torch.zeros(layer.out_features, layer.in_features,
                                                    dtype=platform_fp8_dtype(), device=device))
        layer.register_buffer("weight_scale", torch.ones(layer.out_features, 1, device=device))

    def dummy(self, layer, gen) -> None:
        w = torch.randn(layer.weight.shape, generator=gen, device=layer.weight.device)
        self._store(layer, w * self.full_shape(layer)[1] ** -0.5, None, "dummy")

    def load(self, layer, suffix, tensor, name) -> None:
        w = _float_weight(tensor, name)
        dim = layer.quant_tp_dim
        full = self.full_shape(layer)
        if tuple(w.shape) != full:
            raise CheckpointError(f"{name}: shape mismatch, checkpoint has {tuple(w.shape)}, "
                                  f"model expects {full}")
        scale = channel_scale(w)  # over whole rows, before the rank keeps its columns
        self._store(layer, tp_narrow(w, dim, layer.tp, name),
                    tp_narrow(scale, 0, layer.tp, name) if dim == 0 else scale, name)

    def _store(self, layer, w: torch.Tensor, scale: torch.Tensor | None, name: str) -> None:
        scale = channel_scale(w) if scale is None else scale
        q, s = fp8_to_platform(quantize_rows(w, scale), scale, layer.weight.dtype)
        copy_into(layer.weight, q, name)
        copy_into(layer.weight_scale, s, name)

    def dequantize(self, layer) -> torch.Tensor:
        return (layer.weight.float() * layer.weight_scale).to(layer.quant_dtype)

    def kernel_mode(self, x: torch.Tensor) -> str | None:
        """"w8a8" / "weight_only" when kernels/fp8_linear runs this forward; None: the torch
        reference (CPU, or an activation dtype the kernel does not take)."""
        return fp8_kernel_mode(x, self.act_quant, "ptpc_fp8 linears")

    def apply(self, layer, x):
        mode = self.kernel_mode(x)
        if mode is not None:
            block = (1, _pow2(layer.in_features))
            return fp8_linear_kernel().fp8_block_linear(x, layer.weight, layer.weight_scale,
                                                        block, mode=mode)
        return F.linear(ptpc_qdq(x) if self.act_quant else x, self.dequantize(layer))


def block_quantize(w: torch.Tensor, block: tuple[int, int]):
    """(e4m3fn [out, in], fp32 scale_inv [ceil(out/bn), ceil(in/bk)]): s = amax(block) / 448."""
    bn, bk = block
    out, inp = w.shape
    pad = torch.nn.functional.pad(w.float(), (0, (-inp) % bk, 0, (-out) % bn))
    blocks = pad.unflatten(0, (-1, bn)).unflatten(-1, (-1, bk))  # [nb, bn, kb, bk]
    s = exact_div(blocks.abs().amax((1, 3)), FP8_MAX).clamp(min=1e-12)
    full = s.repeat_interleave(bn, 0)[:out].repeat_interleave(bk, 1)[:, :inp]
    return quantize_rows(w, full), s


class OnlineFp8BlockLinearMethod(Fp8BlockLinearMethod):
    """fp8_block.py's method fed from a float weight (per_block_fp8): same buffers and forward."""

    suffixes = ("weight",)
    online = True

    def load(self, layer, suffix, tensor, name) -> None:
        w = tp_narrow(_float_weight(tensor, name), layer.quant_tp_dim, layer.tp, name)
        if tuple(w.shape) != tuple(layer.weight.shape):
            raise CheckpointError(f"{name}: shape mismatch, checkpoint has "
                                  f"{tuple(tensor.shape)}, model expects "
                                  f"{self.full_shape(layer)}")
        q, s = fp8_to_platform(*block_quantize(w, self.scheme.block), layer.weight.dtype)
        copy_into(layer.weight, q, name)
        copy_into(layer.weight_scale_inv, s, name)
