"""DeepSeek-V3 / Kimi-K2-Instruct FP8 block weights (model_spec §4a), dense linears and experts.

On disk per linear: `weight` float8_e4m3fn [out, in] and `weight_scale_inv` fp32
[ceil(out/bn), ceil(in/bk)] (block [bn, bk] = weight_block_size, [128, 128]);
W[i, j] = q[i, j] * scale_inv[i // bn, j // bk] (partial edge blocks allowed).
At rest: the FP8 tensor + block scales (1 B/weight). Experts: w13_weight fp8 [E, 2I, H] with
w13_weight_scale_inv [E, 2 * ceil(I/bn), ceil(H/bk)] (gate's block rows, then up's: each half
keeps its own edge block), w2_weight fp8 [E, H, I] with w2_weight_scale_inv
[E, ceil(H/bn), ceil(I/bk)]. Under TP the sharded dim must be whole blocks per rank.

Activations: dynamic FP8 per token and per bk channels, s = max(amax, 1e-4)/448 (a power of two
when `scale_fmt: ue8m0`), as in production. `method.act_quant = False` (see
quant.set_activation_quant) turns that off, leaving the weight-only dequantized math: the CPU
tests use it to show exact equivalence with the dequantized model.
"""

from __future__ import annotations

import math

import torch

from atom_stream.config import ConfigError
from atom_stream.layers.quant.common import (
    FP8, LinearMethod, MoEMethod, copy_into, fp8_qdq_group, moe_loop, narrow_expert,
    swiglu_expert, tp_narrow, try_fused_moe,
)


def dequantize_fp8_block(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype) -> torch.Tensor:
    """fp8 [..., out, in] * scale_inv [..., ceil(out/bn), ceil(in/bk)] -> [..., out, in]."""
    out, inp = w.shape[-2:]
    full = s.float().repeat_interleave(block[0], -2)[..., :out, :]
    full = full.repeat_interleave(block[1], -1)[..., :inp]
    return (w.float() * full).to(dtype)


def _blocks(n: int, b: int) -> int:
    return math.ceil(n / b)


def _check_tp(n_local: int, b: int, tp_size: int, what: str) -> None:
    if tp_size > 1 and n_local % b:
        raise ConfigError(f"tensor_parallel_size: FP8 block {b} does not divide {what} per rank "
                          f"({n_local})")


def _dummy(w: torch.Tensor, s: torch.Tensor, fan_in: int, gen) -> None:
    w.copy_(torch.randn(w.shape, generator=gen, device=w.device).to(FP8))
    s.fill_(fan_in ** -0.5)


class _ActQuant:
    act_quant = True  # dynamic per-token-group activation quant (production); tests may disable

    def qdq(self, x):
        if not self.act_quant:
            return x
        return fp8_qdq_group(x, self.scheme.block[1], self.scheme.ue8m0)


class Fp8BlockLinearMethod(_ActQuant, LinearMethod):
    format = "fp8_block"
    suffixes = ("weight", "weight_scale_inv")

    def create_buffers(self, layer, device) -> None:
        bn, bk = self.scheme.block
        out, inp = layer.out_features, layer.in_features
        if layer.quant_tp_dim == 0:
            _check_tp(out, bn, layer.tp.size, "the output features")
        if layer.quant_tp_dim == 1:
            _check_tp(inp, bk, layer.tp.size, "the input features")
        layer.register_buffer("weight", torch.zeros(out, inp, dtype=FP8, device=device))
        layer.register_buffer("weight_scale_inv", torch.ones(_blocks(out, bn), _blocks(inp, bk),
                                                             device=device))

    def dummy(self, layer, gen) -> None:
        _dummy(layer.weight, layer.weight_scale_inv, self.full_shape(layer)[1], gen)

    def load(self, layer, suffix, tensor, name) -> None:
        copy_into(getattr(layer, suffix), tp_narrow(tensor, layer.quant_tp_dim, layer.tp, name),
                  name)

    def dequantize(self, layer) -> torch.Tensor:
        return dequantize_fp8_block(layer.weight, layer.weight_scale_inv, self.scheme.block,
                                    layer.quant_dtype)

    def apply(self, layer, x):
        return super().apply(layer, self.qdq(x))


class Fp8BlockMoEMethod(_ActQuant, MoEMethod):
    format = "fp8_block"
    suffixes = ("weight", "weight_scale_inv")

    def create_buffers(self, experts, device) -> None:
        bn, bk = self.scheme.block
        E, H, inter = experts.num_local_experts, experts.hidden, experts.inter
        _check_tp(inter, bn, experts.quant_tp.size, "moe_intermediate_size")
        experts.register_buffer("w13_weight", torch.zeros(E, 2 * inter, H, dtype=FP8,
                                                          device=device))
        experts.register_buffer("w2_weight", torch.zeros(E, H, inter, dtype=FP8, device=device))
        experts.register_buffer("w13_weight_scale_inv", torch.ones(
            E, 2 * _blocks(inter, bn), _blocks(H, bk), device=device))
        experts.register_buffer("w2_weight_scale_inv", torch.ones(
            E, _blocks(H, bn), _blocks(inter, bk), device=device))

    def dummy(self, experts, gen) -> None:
        _dummy(experts.w13_weight, experts.w13_weight_scale_inv, experts.hidden, gen)
        _dummy(experts.w2_weight, experts.w2_weight_scale_inv,
               experts.inter * experts.quant_tp.size, gen)

    def load(self, experts, idx, proj, suffix, tensor, name) -> None:
        t = narrow_expert(tensor, proj, experts, name)
        if proj == "down_proj":
            copy_into(getattr(experts, f"w2_{suffix}")[idx], t, name)
            return
        half = 0 if proj == "gate_proj" else 1
        if suffix == "weight":
            n = experts.inter
            copy_into(experts.w13_weight[idx, half * n:(half + 1) * n], t, name)
        else:
            nb = _blocks(experts.inter, self.scheme.block[0])
            copy_into(experts.w13_weight_scale_inv[idx, half * nb:(half + 1) * nb], t, name)

    def expert_weights(self, experts, e: int):
        block, dt, n = self.scheme.block, experts.quant_dtype, experts.inter
        nb = _blocks(n, block[0])
        w, s = experts.w13_weight[e], experts.w13_weight_scale_inv[e]
        w13 = torch.cat([dequantize_fp8_block(w[:n], s[:nb], block, dt),
                         dequantize_fp8_block(w[n:], s[nb:], block, dt)])
        w2 = dequantize_fp8_block(experts.w2_weight[e], experts.w2_weight_scale_inv[e], block, dt)
        return w13, w2

    def apply(self, experts, x, topk_weights, topk_ids):
        y = try_fused_moe(x, experts.w13_weight, experts.w2_weight, topk_weights, topk_ids,
                          quant="fp8_block", w13_scale=experts.w13_weight_scale_inv,
                          w2_scale=experts.w2_weight_scale_inv, block=self.scheme.block,
                          act_quant=self.act_quant)
        if y is not None:
            return y
        act = self.qdq if self.act_quant else None
        return moe_loop(x, topk_weights, topk_ids, experts.num_experts,
                        lambda e, xs: swiglu_expert(xs, *self.expert_weights(experts, e), act))
