"""compressed-tensors `pack-quantized` INT4 (Kimi-K2-Thinking / K2.5 routed experts), W4A16.

On disk per linear (model_spec §4b): `weight_packed` int32 [out, in/8], `weight_scale`
[out, in/G] (bf16, G = group_size, 32 for Kimi), `weight_shape` int32 [2] = [out, in].
Element column c of row r sits in `weight_packed[r, c//8]` at bits 4*(c%8) (least significant
nibble first) as the unsigned nibble q + 8, q in [-8, 7]. W[r, c] = q * weight_scale[r, c//G].

At rest the experts stay packed: w13_weight_packed [E, 2I, H/8] int32 + w13_weight_scale
[E, 2I, H/G], w2_weight_packed [E, H, I/8] + w2_weight_scale [E, H, I/G] (I: this rank's share;
gate rows then up rows, as the dense w13). 0.5 B/weight + scales.
"""

from __future__ import annotations

import torch

from atom_stream.config import ConfigError
from atom_stream.layers.quant.common import (
    CheckpointError, LinearMethod, MoEMethod, copy_into, moe_loop, narrow_expert,
    proj_rows, repack_for_kernel, scale_dtype, swiglu_expert, tp_narrow, try_fused_moe,
)

_SHIFTS = tuple(range(0, 32, 4))


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n/8] -> int8 [..., n] with values in [-8, 7]."""
    # arange, not torch.tensor(_SHIFTS): no host-to-device copy (graph capture forbids one)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF
    return (nib.to(torch.int8) - 8).flatten(-2)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int [..., n] in [-8, 7] (n % 8 == 0) -> int32 [..., n/8] (inverse of unpack_int4)."""
    u = ((q.to(torch.int64) + 8) & 0xF).unflatten(-1, (-1, 8))
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device)
    word = (u << shifts).sum(-1)  # disjoint bits: the sum is the bitwise or, < 2^32
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """[..., out, in/8] + [..., out, in/G] -> [..., out, in] in dtype (products exact in fp32)."""
    q = unpack_int4(packed).float().unflatten(-1, (-1, group))
    return (q * scale.float().unsqueeze(-1)).flatten(-2).to(dtype)


def _dummy_packed(t: torch.Tensor, gen: torch.Generator) -> None:
    """Random nibbles with mean 0: uniform codes give q in [-8, 7] (mean -0.5), and that shared
    offset adds one common direction to every token's hidden state over 61 layers, so every
    token routes to the same experts (seen on the H200: far fewer experts touched than MXFP4).
    Code 0 (q = -8) becomes 8 (q = 0): q in [-7, 7], symmetric."""
    t.copy_(torch.randint(-2**31, 2**31 - 1, t.shape, generator=gen, device=t.device,
                          dtype=torch.int32))
    for k in range(8):
        zero = ((t >> (4 * k)) & 0xF) == 0
        bit = torch.tensor(1 << (4 * k + 3), dtype=torch.int64).to(torch.int32)  # k=7: sign bit
        t |= zero.to(torch.int32) * bit.to(t.device)


def _check_group(n: int, group: int, what: str) -> None:
    if n % group or n % 8:
        raise ConfigError(f"quantization_config: group_size {group} does not divide {what} "
                          f"({n} on this rank)")


class Int4LinearMethod(LinearMethod):
    format = "int4_pack"
    suffixes = ("weight_packed", "weight_scale", "weight_shape")

    def create_buffers(self, layer, device) -> None:
        g = self.scheme.group_size
        _check_group(layer.in_features, g, "the input features")
        out, inp = layer.out_features, layer.in_features
        layer.register_buffer("weight_packed", torch.zeros(out, inp // 8, dtype=torch.int32,
                                                           device=device))
        layer.register_buffer("weight_scale", torch.zeros(out, inp // g, device=device,
                                                          dtype=scale_dtype(layer.quant_dtype)))

    def dummy(self, layer, gen) -> None:
        _dummy_packed(layer.weight_packed, gen)
        layer.weight_scale.fill_(self.full_shape(layer)[1] ** -0.5 / 4.2)  # std(q) ~ 4.2

    def load(self, layer, suffix, tensor, name) -> None:
        if suffix == "weight_shape":
            if [int(v) for v in tensor.flatten()] != list(self.full_shape(layer)):
                raise CheckpointError(f"{name}: weight_shape {tensor.tolist()} != "
                                      f"{list(self.full_shape(layer))}")
            return
        copy_into(getattr(layer, suffix), tp_narrow(tensor, layer.quant_tp_dim, layer.tp, name),
                  name)

    def dequantize(self, layer) -> torch.Tensor:
        return dequantize_int4(layer.weight_packed, layer.weight_scale, self.scheme.group_size,
                               layer.quant_dtype)


class Int4MoEMethod(MoEMethod):
    format = "int4_pack"
    suffixes = ("weight_packed", "weight_scale", "weight_shape")

    def create_buffers(self, experts, device) -> None:
        g = self.scheme.group_size
        E, H, inter = experts.num_local_experts, experts.hidden, experts.inter
        _check_group(H, g, "hidden_size")
        _check_group(inter, g, "moe_intermediate_size")
        sd = scale_dtype(experts.quant_dtype)
        for name, shape in (("w13_weight_packed", (E, 2 * inter, H // 8)),
                            ("w2_weight_packed", (E, H, inter // 8))):
            experts.register_buffer(name, torch.zeros(shape, dtype=torch.int32, device=device))
        experts.register_buffer("w13_weight_scale", torch.zeros(E, 2 * inter, H // g, dtype=sd,
                                                                device=device))
        experts.register_buffer("w2_weight_scale", torch.zeros(E, H, inter // g, dtype=sd,
                                                               device=device))

    def dummy(self, experts, gen) -> None:
        _dummy_packed(experts.w13_weight_packed, gen)
        _dummy_packed(experts.w2_weight_packed, gen)
        experts.w13_weight_scale.fill_(experts.hidden ** -0.5 / 4.2)
        experts.w2_weight_scale.fill_((experts.inter * experts.quant_tp.size) ** -0.5 / 4.2)

    def load(self, experts, idx, proj, suffix, tensor, name) -> None:
        H, full_i = experts.hidden, experts.inter * experts.quant_tp.size
        if suffix == "weight_shape":
            want = [H, full_i] if proj == "down_proj" else [full_i, H]
            if [int(v) for v in tensor.flatten()] != want:
                raise CheckpointError(f"{name}: weight_shape {tensor.tolist()} != {want}")
            return
        t = narrow_expert(tensor, proj, experts, name)
        kind = suffix  # weight_packed | weight_scale
        if proj == "down_proj":
            copy_into(getattr(experts, f"w2_{kind}")[idx], t, name)
        else:
            copy_into(getattr(experts, f"w13_{kind}")[idx, proj_rows(experts, proj)], t, name)

    def expert_weights(self, experts, e: int):
        g, dt = self.scheme.group_size, experts.quant_dtype
        return (dequantize_int4(experts.w13_weight_packed[e], experts.w13_weight_scale[e], g, dt),
                dequantize_int4(experts.w2_weight_packed[e], experts.w2_weight_scale[e], g, dt))

    def finalize(self, experts) -> None:
        from atom_stream.kernels.fused_moe import repack_int4_moe
        repack_for_kernel(experts, "w13_weight_packed", "w2_weight_packed", repack_int4_moe,
                          "w13_weight_scale")

    def apply(self, experts, x, topk_weights, topk_ids):
        if getattr(experts, "kernel_layout", False):  # GPU: repacked at load
            from atom_stream.kernels.fused_moe import fused_moe
            return fused_moe(x, experts.w13_weight_packed_kernel, experts.w2_weight_packed_kernel,
                             topk_weights, topk_ids, quant=f"int4_g{self.scheme.group_size}",
                             w13_scale=experts.w13_weight_scale, w2_scale=experts.w2_weight_scale)
        y = try_fused_moe(x, experts.w13_weight_packed, experts.w2_weight_packed, topk_weights,
                          topk_ids, quant=f"int4_g{self.scheme.group_size}",
                          w13_scale=experts.w13_weight_scale, w2_scale=experts.w2_weight_scale)
        if y is not None:
            return y
        return moe_loop(x, topk_weights, topk_ids, experts.num_experts,
                        lambda e, xs: swiglu_expert(xs, *self.expert_weights(experts, e)))
