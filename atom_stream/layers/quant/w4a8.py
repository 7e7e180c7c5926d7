"""AMD Quark W4A8 (INT4 weights, FP8 activations), converted AT LOAD to FP8 e4m3 per tensor.

On disk per linear (model_spec §4d): `weight` int32 [out, in/8], `weight_scale` (per-tensor
scalar), `weight_scale_2` [out] (per-channel int4 scale), `input_scale` when activations are
static. INT4 is two's complement; with `pack_method: reorder` nibble i (bits 4i..4i+3) of each
int32 holds element [0, 2, 4, 6, 1, 3, 5, 7][i] of its group of 8 (Quark Pack_4_bits, checked
against its source: the per_channel scheme packs [out, in] untransposed, `& 0x0F` per element).
W = (q * weight_scale_2[row]) * weight_scale.

Load-time conversion (ATOM QuarkW4A8MoEMethod; model_spec §4d): dequantize in fp32, then
re-quantize to FP8 with one scale per tensor, S = amax / 448. Gate and up of an expert share one
scale (the max of the two, i.e. the amax over both halves) so w13 is one FP8 tensor with one
scale per expert; down keeps its own. A layer's pieces may arrive in any order: they are staged
until gate+up (or down) are complete, then converted and dropped.
At rest: w13_weight fp8 [E, 2I, H] + w13_weight_scale fp32 [E]; w2_weight fp8 [E, H, I] +
w2_weight_scale [E] (1 B/weight, by design).

Serving: FP8 per-tensor MoE. Activations: dynamic per token (s = amax(row)/448; a refinement of
per-tensor dynamic that keeps a token's output independent of its batch), or static per tensor
with the max over experts of the checkpoint input_scale (what a fused kernel takes). On CUDA
the experts run kernels/fused_moe.py's "fp8_tensor" format (the same quantization math, fp8 x
fp8 products summed in fp32; CUDA-graph capturable); the CPU runs `apply_ref` (torch).
"""

from __future__ import annotations

import torch

from atom_stream.layers.quant.common import (
    FP8, FP8_MAX, CheckpointError, LinearMethod, MoEMethod, copy_into, exact_div,
    fp8_qdq_per_token, fp8_qdq_static, fp8_to_platform, fused_moe_kernel, moe_loop,
    narrow_expert, platform_fp8_dtype, proj_rows, swiglu_expert, tp_narrow,
)

REORDER = (0, 2, 4, 6, 1, 3, 5, 7)        # nibble i holds element REORDER[i]
_INVERSE = (0, 4, 1, 5, 2, 6, 3, 7)       # element j sits in nibble _INVERSE[j]
_SHIFTS = tuple(range(0, 32, 4))


def unpack_int4_reorder(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., n/8] (Quark reorder, two's complement) -> int8 [..., n] in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)  # no H2D copy
    nib = (packed.unsqueeze(-1) >> shifts) & 0xF
    vals = torch.where(nib >= 8, nib - 16, nib)
    return vals[..., list(_INVERSE)].flatten(-2).to(torch.int8)


def pack_int4_reorder(q: torch.Tensor) -> torch.Tensor:
    """int [..., n] in [-8, 7] -> int32 [..., n/8] (inverse of unpack_int4_reorder)."""
    u = (q.to(torch.int64) & 0xF).unflatten(-1, (-1, 8))[..., list(REORDER)]
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device)
    word = (u << shifts).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def dequantize_w4a8(packed, scale, scale_2) -> torch.Tensor:
    """The checkpoint's weight in float32: (q * weight_scale_2[row]) * weight_scale."""
    q = unpack_int4_reorder(packed).float()
    return q * scale_2.float().reshape(-1, 1) * scale.float().reshape(())


def to_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def amax_scale(*ws: torch.Tensor) -> torch.Tensor:
    amax = torch.stack([w.abs().amax() for w in ws]).amax()
    return exact_div(amax.float(), FP8_MAX).clamp(min=1e-12)


_PIECES = ("weight", "weight_scale", "weight_scale_2")


def check_piece(suffix: str, t: torch.Tensor, rows: int, cols: int, name: str) -> None:
    """A CheckpointError naming `name` unless this rank's piece fits an [rows, cols] weight:
    weight [rows, cols / 8], weight_scale one value, weight_scale_2 `rows` values."""
    if suffix == "weight":
        ok, want = tuple(t.shape) == (rows, cols // 8), str((rows, cols // 8))
    elif suffix == "weight_scale":
        ok, want = t.numel() == 1, "one value"
    else:
        ok, want = t.numel() == rows, f"{rows} values"
    if not ok:
        raise CheckpointError(f"{name}: shape mismatch, checkpoint has {tuple(t.shape)}, model "
                              f"expects {want}")


def _act(scheme, input_scale: torch.Tensor | None):
    if scheme.act == "fp8_static":
        return lambda x: fp8_qdq_static(x, input_scale)
    return fp8_qdq_per_token


class W4A8LinearMethod(LinearMethod):
    format = "w4a8_fp8"
    suffixes = _PIECES
    optional = ("input_scale",)

    def __init__(self, scheme):
        super().__init__(scheme)
        self._stage: dict[int, dict[str, torch.Tensor]] = {}
        if scheme.act == "fp8_static":
            self.suffixes = _PIECES + ("input_scale",)

    def create_buffers(self, layer, device) -> None:
        layer.register_buffer("weight", torch.zeros(layer.out_features, layer.in_features,
                                                    dtype=platform_fp8_dtype(), device=device))
        layer.register_buffer("weight_scale", torch.ones((), device=device))
        if self.scheme.act == "fp8_static":
            layer.register_buffer("input_scale", torch.ones((), device=device))

    def dummy(self, layer, gen) -> None:
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen,
                                       device=layer.weight.device).to(layer.weight.dtype))
        layer.weight_scale.fill_(self.full_shape(layer)[1] ** -0.5)

    def load(self, layer, suffix, tensor, name) -> None:
        if suffix == "input_scale":
            layer.input_scale.copy_(tensor.float().reshape(()))
            return
        dim = layer.quant_tp_dim
        if suffix == "weight_scale_2":  # per output row: sharded only with the rows
            tensor = tp_narrow(tensor.reshape(-1), 0, layer.tp, name) if dim == 0 else tensor
        elif suffix == "weight":
            tensor = tp_narrow(tensor, dim, layer.tp, name)
        check_piece(suffix, tensor, *layer.weight.shape, name)
        stage = self._stage.setdefault(id(layer), {})
        stage[suffix] = tensor
        if all(k in stage for k in _PIECES):
            del self._stage[id(layer)]
            w = dequantize_w4a8(stage["weight"], stage["weight_scale"], stage["weight_scale_2"])
            want = tuple(layer.weight.shape)
            if tuple(w.shape) != want:
                raise CheckpointError(f"{name}: shape mismatch, checkpoint has "
                                      f"{tuple(w.shape)}, model expects {want}")
            s = amax_scale(w)
            q, s = fp8_to_platform(to_fp8(w, s), s, layer.weight.dtype)
            layer.weight.copy_(q)  # e4m3fn, or e4m3fnuz on MI300 with the scale doubled
            layer.weight_scale.copy_(s)

    def dequantize(self, layer) -> torch.Tensor:
        return (layer.weight.float() * layer.weight_scale).to(layer.quant_dtype)

    def apply(self, layer, x):
        return super().apply(layer, _act(self.scheme, getattr(layer, "input_scale", None))(x))


class W4A8MoEMethod(MoEMethod):
    format = "w4a8_fp8"
    suffixes = _PIECES
    optional = ("input_scale",)

    def __init__(self, scheme):
        super().__init__(scheme)
        self._stage: dict[tuple, dict[str, torch.Tensor]] = {}
        if scheme.act == "fp8_static":
            self.suffixes = _PIECES + ("input_scale",)

    def create_buffers(self, experts, device) -> None:
        E, H, inter = experts.num_local_experts, experts.hidden, experts.inter
        fp8 = platform_fp8_dtype()  # e4m3fnuz on MI300 (common.fp8_to_platform)
        experts.register_buffer("w13_weight", torch.zeros(E, 2 * inter, H, dtype=fp8,
                                                          device=device))
        experts.register_buffer("w2_weight", torch.zeros(E, H, inter, dtype=fp8, device=device))
        names = ("w13_weight_scale", "w2_weight_scale") + (
            ("w13_input_scale", "w2_input_scale") if self.scheme.act == "fp8_static" else ())
        for name in names:
            experts.register_buffer(name, torch.ones(E, device=device))

    def dummy(self, experts, gen) -> None:
        for w in (experts.w13_weight, experts.w2_weight):
            w.copy_(torch.randn(w.shape, generator=gen, device=w.device).to(w.dtype))
        experts.w13_weight_scale.fill_(experts.hidden ** -0.5)
        experts.w2_weight_scale.fill_((experts.inter * experts.quant_tp.size) ** -0.5)

    def load(self, experts, idx, proj, suffix, tensor, name) -> None:
        if suffix == "input_scale":  # static activations: gate/up share the larger scale
            buf = experts.w2_input_scale if proj == "down_proj" else experts.w13_input_scale
            key = (id(experts), idx, "input_scale")
            prev = self._stage.pop(key, None) if proj != "down_proj" else None
            v = tensor.float().reshape(())
            if prev is not None:
                v = torch.maximum(v, prev["v"])
            elif proj != "down_proj":
                self._stage[key] = {"v": v}
            buf[idx] = v
            return
        if suffix == "weight_scale_2":
            tensor = tensor.reshape(-1)
        tensor = narrow_expert(tensor, proj, experts, name)
        shape = ((experts.hidden, experts.inter) if proj == "down_proj"
                 else (experts.inter, experts.hidden))
        check_piece(suffix, tensor, *shape, name)
        group = "w2" if proj == "down_proj" else "w13"
        key = (id(experts), idx, group)
        stage = self._stage.setdefault(key, {})
        stage[f"{proj}.{suffix}"] = tensor
        projs = ("down_proj",) if group == "w2" else ("gate_proj", "up_proj")
        if all(f"{p}.{k}" in stage for p in projs for k in _PIECES):
            del self._stage[key]
            ws = [dequantize_w4a8(*(stage[f"{p}.{k}"] for k in _PIECES)) for p in projs]
            s = amax_scale(*ws)  # gate and up share max(s_gate, s_up)
            dst = experts.w2_weight if group == "w2" else experts.w13_weight
            for p, w in zip(projs, ws):
                rows = slice(None) if group == "w2" else proj_rows(experts, p)
                q, s_dst = fp8_to_platform(to_fp8(w, s), s, dst.dtype)
                copy_into(dst[idx, rows], q, name)
            getattr(experts, f"{group}_weight_scale")[idx] = s_dst

    def apply(self, experts, x, topk_weights, topk_ids):
        """CUDA: the Triton fused MoE ("fp8_tensor": graph capturable, no host syncs); the CPU,
        and shapes the kernel does not tile (H or I not a multiple of 32): `apply_ref`."""
        static = self.scheme.act == "fp8_static"
        fused = fused_moe_kernel() if x.is_cuda and _kernel_shapes(experts) else None
        if fused is not None:
            return fused(x, experts.w13_weight, experts.w2_weight, topk_weights, topk_ids,
                         quant="fp8_tensor", w13_scale=experts.w13_weight_scale,
                         w2_scale=experts.w2_weight_scale,
                         a13_scale=experts.w13_input_scale.max() if static else None,
                         a2_scale=experts.w2_input_scale.max() if static else None)
        return self.apply_ref(experts, x, topk_weights, topk_ids)

    def apply_ref(self, experts, x, topk_weights, topk_ids):
        """The torch reference: per chosen expert, dequantize to the model dtype, quant-dequant
        the activations (per token, or static with the max input scale over experts)."""
        static = self.scheme.act == "fp8_static"
        a13 = experts.w13_input_scale.max() if static else None
        a2 = experts.w2_input_scale.max() if static else None
        dt = experts.quant_dtype

        def expert(e, xs):
            w13 = (experts.w13_weight[e].float() * experts.w13_weight_scale[e]).to(dt)
            w2 = (experts.w2_weight[e].float() * experts.w2_weight_scale[e]).to(dt)
            if not static:
                return swiglu_expert(xs, w13, w2, fp8_qdq_per_token)
            inter = w2.shape[-1]
            h = torch.nn.functional.linear(fp8_qdq_static(xs, a13), w13)
            a = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
            return torch.nn.functional.linear(fp8_qdq_static(a, a2), w2)

        return moe_loop(x, topk_weights, topk_ids, experts.num_experts, expert)


def _kernel_shapes(experts) -> bool:
    """fused_moe's FP8C path tiles H and I in multiples of 32 and reads e4m3fn weights."""
    return (experts.hidden % 32 == 0 and experts.inter % 32 == 0
            and experts.w13_weight.dtype == torch.float8_e4m3fn)
