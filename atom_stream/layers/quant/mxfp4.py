"""AMD Quark OCP MXFP4 (amd/Kimi-K2.5-MXFP4): w4a4 (dynamic fp4 activations) or w4a16.

On disk per linear (model_spec §4c): `weight` uint8 [out, in/2] holding two e2m1 codes per byte,
element 2i in the LOW nibble (Quark Pack_fp4 is little-endian); `weight_scale` uint8 [out, in/32]
e8m0 (scale = 2^(e - 127)). e2m1 codes 0..7 = {0, .5, 1, 1.5, 2, 3, 4, 6}; bit 3 is the sign.
At rest the experts stay 4-bit: w13_weight [E, 2I, H/2] + w13_weight_scale [E, 2I, H/32],
w2_weight [E, H, I/2] + w2_weight_scale [E, H, I/32].

Activations (w4a4) are quantized per 32 contiguous channels at runtime exactly as Quark does
(`scale_calculation_mode: even`, `round_method: half_even`): amax is rounded to a power of two
by adding 2^21 to its float32 bits and masking the mantissa (so amax >= 1.75 * 2^k rounds up),
the shared exponent is log2(that) - 2 (e2m1's emax) clamped to [-127, 127], and x / 2^exp is
rounded to the nearest e2m1 value, ties to even, saturating at 6. Without FP4 matrix units (the
CPU, and every device until a fused FP4 kernel is used) this is emulated exactly: quant-dequant
in fp32, then a matmul with the dequantized weights; the log says so once.
"""

from __future__ import annotations

import math

import torch

from atom_stream.config import ConfigError
from atom_stream.layers.quant.common import (
    LinearMethod, MoEMethod, copy_into, log_once, moe_loop, narrow_expert, proj_rows,
    repack_for_kernel, swiglu_expert, tp_narrow, try_fused_moe,
)

GROUP = 32
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_LUT = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32)
_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])  # midpoints between values
_ON_DEVICE: dict[tuple[int, torch.device], torch.Tensor] = {}


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`, copied once: a forward under graph capture must not copy from the host
    (the warm-up forwards before capture fill this cache)."""
    key = (id(t), device)
    if key not in _ON_DEVICE:
        _ON_DEVICE[key] = t.to(device)
    return _ON_DEVICE[key]
_TIES_UP = (0.75, 1.75, 3.5)  # midpoints whose even neighbour is the upper one


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., n/2] -> float32 [..., n] e2m1 values (element 2i from the low nibble)."""
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)
    return _on(_LUT, packed.device)[codes.long()]


def e8m0_to_float(s: torch.Tensor) -> torch.Tensor:
    return torch.exp2(s.float() - 127.0)


def dequantize_mxfp4(w: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[..., out, in/2] uint8 + [..., out, in/32] e8m0 -> [..., out, in] (exact in fp32/bf16)."""
    v = unpack_fp4(w).unflatten(-1, (-1, GROUP)) * e8m0_to_float(s).unsqueeze(-1)
    return v.flatten(-2).to(dtype)


def shared_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Quark "even" e8m0 exponent (unbiased, int32) of a group's amax (float32, >= 0)."""
    bits = amax.float().contiguous().view(torch.int32)
    rounded = (bits + (1 << 21)) & 0x7F800000  # carry into the exponent iff mantissa >= .75
    biased = rounded >> 23
    return (biased - 127 - 2).clamp(-127, 127)  # amax 0 / subnormal -> -127, as Quark


def round_e2m1(v: torch.Tensor) -> torch.Tensor:
    """Codes (uint8, sign in bit 3) of v rounded to e2m1, ties to even, saturating at 6."""
    mag = v.abs()
    idx = torch.bucketize(mag, _on(_BOUNDS, v.device), right=False)
    tie_up = torch.zeros_like(mag, dtype=torch.bool)
    for t in _TIES_UP:
        tie_up |= mag == t
    code = (idx + tie_up.to(idx.dtype)).clamp(max=7)
    return (code | ((v < 0).to(code.dtype) << 3)).to(torch.uint8)


def quantize_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] (n % 32 == 0) -> (uint8 [..., n/2] packed, uint8 [..., n/32] e8m0)."""
    g = x.float().unflatten(-1, (-1, GROUP))
    exp = shared_exponent(g.abs().amax(-1))
    codes = round_e2m1(g * torch.exp2(-exp.float()).unsqueeze(-1)).flatten(-2)
    pairs = codes.unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4), (exp + 127).to(torch.uint8)


def mxfp4_qdq(x: torch.Tensor) -> torch.Tensor:
    """Dynamic MXFP4 quant-dequant of activations along the last dim (w4a4 emulation)."""
    n = x.shape[-1]
    if n % GROUP:
        raise ValueError(f"MXFP4 activations need a multiple of {GROUP} channels, got {n}")
    g = x.float().unflatten(-1, (-1, GROUP))
    scale = torch.exp2(shared_exponent(g.abs().amax(-1)).float()).unsqueeze(-1)
    v = _on(_LUT, x.device)[round_e2m1(g / scale).long()] * scale
    return v.flatten(-2).to(x.dtype)


def _dummy(weight: torch.Tensor, scale: torch.Tensor, fan_in: int, gen) -> None:
    weight.copy_(torch.randint(0, 256, weight.shape, generator=gen, device=weight.device,
                               dtype=torch.int32).to(torch.uint8))
    # e2m1 codes uniform: std ~ 2.93; aim at std(W) ~ fan_in^-0.5
    scale.fill_(round(math.log2(fan_in ** -0.5 / 2.93)) + 127)


def _act(scheme, device) -> object:
    if scheme.act != "mxfp4":
        return None
    log_once("mxfp4-emulated", "MXFP4 w4a4: FP4 activation quantization is emulated exactly "
             "(quant-dequant per 32 in fp32, dequantized weights) on %s: no FP4 matrix-unit "
             "kernel in use", device)
    return mxfp4_qdq


def _check(n: int, what: str) -> None:
    if n % GROUP:
        raise ConfigError(f"quantization_config: MXFP4 needs {what} divisible by {GROUP} "
                          f"({n} on this rank)")


class Mxfp4LinearMethod(LinearMethod):
    format = "mxfp4"
    suffixes = ("weight", "weight_scale")
    optional = ("input_scale",)

    def create_buffers(self, layer, device) -> None:
        _check(layer.in_features, "the input features")
        out, inp = layer.out_features, layer.in_features
        layer.register_buffer("weight", torch.zeros(out, inp // 2, dtype=torch.uint8,
                                                    device=device))
        layer.register_buffer("weight_scale", torch.zeros(out, inp // GROUP, dtype=torch.uint8,
                                                          device=device))

    def dummy(self, layer, gen) -> None:
        _dummy(layer.weight, layer.weight_scale, self.full_shape(layer)[1], gen)

    def load(self, layer, suffix, tensor, name) -> None:
        copy_into(getattr(layer, suffix), tp_narrow(tensor, layer.quant_tp_dim, layer.tp, name),
                  name)

    def dequantize(self, layer) -> torch.Tensor:
        return dequantize_mxfp4(layer.weight, layer.weight_scale, layer.quant_dtype)

    def apply(self, layer, x):
        act = _act(self.scheme, x.device)
        return super().apply(layer, act(x) if act is not None else x)


class Mxfp4MoEMethod(MoEMethod):
    format = "mxfp4"
    suffixes = ("weight", "weight_scale")
    optional = ("input_scale",)

    def create_buffers(self, experts, device) -> None:
        E, H, inter = experts.num_local_experts, experts.hidden, experts.inter
        _check(H, "hidden_size")
        _check(inter, "moe_intermediate_size")
        for name, shape in (("w13_weight", (E, 2 * inter, H // 2)),
                            ("w13_weight_scale", (E, 2 * inter, H // GROUP)),
                            ("w2_weight", (E, H, inter // 2)),
                            ("w2_weight_scale", (E, H, inter // GROUP))):
            experts.register_buffer(name, torch.zeros(shape, dtype=torch.uint8, device=device))

    def dummy(self, experts, gen) -> None:
        _dummy(experts.w13_weight, experts.w13_weight_scale, experts.hidden, gen)
        _dummy(experts.w2_weight, experts.w2_weight_scale,
               experts.inter * experts.quant_tp.size, gen)

    def load(self, experts, idx, proj, suffix, tensor, name) -> None:
        t = narrow_expert(tensor, proj, experts, name)
        if proj == "down_proj":
            copy_into(getattr(experts, f"w2_{suffix}")[idx], t, name)
        else:
            copy_into(getattr(experts, f"w13_{suffix}")[idx, proj_rows(experts, proj)], t, name)

    def finalize(self, experts) -> None:
        from atom_stream.kernels.fused_moe import has_fp4_mma, repack_mxfp4_moe
        if not has_fp4_mma(experts.w13_weight.device):  # FP4 MMA GPUs take the raw layout
            repack_for_kernel(experts, "w13_weight", "w2_weight", repack_mxfp4_moe,
                              "w13_weight_scale")

    def apply(self, experts, x, topk_weights, topk_ids):
        if getattr(experts, "kernel_layout", False):  # GPU without FP4 units: repacked at load
            from atom_stream.kernels.fused_moe import fused_moe
            return fused_moe(x, experts.w13_weight_kernel, experts.w2_weight_kernel, topk_weights,
                             topk_ids, quant="mxfp4", w13_scale=experts.w13_weight_scale,
                             w2_scale=experts.w2_weight_scale,
                             act_quant=self.scheme.act == "mxfp4")
        y = try_fused_moe(x, experts.w13_weight, experts.w2_weight, topk_weights, topk_ids,
                          quant="mxfp4", w13_scale=experts.w13_weight_scale,
                          w2_scale=experts.w2_weight_scale, act_quant=self.scheme.act == "mxfp4")
        if y is not None:
            return y
        act, dt = _act(self.scheme, x.device), experts.quant_dtype

        def expert(e, xs):
            w13 = dequantize_mxfp4(experts.w13_weight[e], experts.w13_weight_scale[e], dt)
            w2 = dequantize_mxfp4(experts.w2_weight[e], experts.w2_weight_scale[e], dt)
            return swiglu_expert(xs, w13, w2, act)

        return moe_loop(x, topk_weights, topk_ids, experts.num_experts, expert)
