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

Dense linears on the kernel path (CUDA/ROCm tensors, or forced under TRITON_INTERPRET=1):
kernels/fp8_linear.fp8_block_linear reads the fp8 weight and applies the block scales in its K
loop (no dequantized copy): "w8a8" (fp8 x fp8 dot, the activation quant above done by
kernels/norm_rope.per_token_group_quant_fp8) when act_quant and the GPU has fp8 dots, else
"weight_only". The CPU reference path dequantizes per forward (and quant-dequantizes x).

MI300 (e4m3fnuz): weights are stored in common.platform_fp8_dtype(); checkpoint e4m3fn tensors
are converted as they load (common.fp8_to_platform: same bits, 0x80 -> 0, scale_inv * 2), so
every dequantized value is unchanged.
"""

from __future__ import annotations

import math

import torch

from atom_stream.config import ConfigError
from atom_stream.layers.quant.common import (
    FP8, LinearMethod, MoEMethod, copy_into, fp8_qdq_group, fp8_scale_to_platform,
    fp8_to_platform, log_once, moe_loop, narrow_expert, platform_fp8_dtype, swiglu_expert,
    tp_narrow, try_fused_moe,
)
from atom_stream.models import kernel_path


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
    """Random e4m3fn values, converted like a checkpoint: the same dequantized weights on every
    platform."""
    q, scale = fp8_to_platform(torch.randn(w.shape, generator=gen, device=w.device).to(FP8),
                               torch.full((), fan_in ** -0.5, device=s.device), w.dtype)
    w.copy_(q)
    s.copy_(scale.expand(s.shape))


def _load_fp8(dst: torch.Tensor, suffix: str, t: torch.Tensor, name: str,
              wdtype: torch.dtype) -> None:
    """Copy a checkpoint `weight` (e4m3fn) or `weight_scale_inv` into `dst`, converted for the
    module's fp8 weight dtype `wdtype` (fnuz: same bits, scale * 2) without changing the
    dequantized values."""
    if suffix == "weight":
        t = fp8_to_platform(t if t.dtype == FP8 else t.to(FP8), target=wdtype)[0]
    else:
        t = fp8_scale_to_platform(t.float(), wdtype)
    copy_into(dst, t, name)


def _fp8_buffers(module, wname: str, wshape, sname: str, sshape, device) -> None:
    """Register an fp8 weight in the platform's FP8 dtype and its fp32 scale_inv."""
    module.register_buffer(wname, torch.zeros(*wshape, dtype=platform_fp8_dtype(),
                                              device=device))
    module.register_buffer(sname, torch.ones(*sshape, device=device))


_fp8_linear = None


def fp8_linear_kernel():
    """kernels/fp8_linear (None when Triton is unavailable)."""
    global _fp8_linear
    if _fp8_linear is None:
        try:
            from atom_stream.kernels import fp8_linear
            _fp8_linear = fp8_linear
        except ImportError:
            _fp8_linear = False
    return _fp8_linear or None


class _ActQuant:
    act_quant = True  # dynamic per-token-group activation quant (production); tests may disable

    def qdq(self, x):
        if not self.act_quant:
            return x
        return fp8_qdq_group(x, self.scheme.block[1], self.scheme.ue8m0)


def fp8_kernel_mode(x: torch.Tensor, act_quant: bool, what: str,
                    tiles_ok: bool = True) -> str | None:
    """How kernels/fp8_linear runs an FP8-weight linear's forward over `x`: "w8a8" (FP8
    activations) / "weight_only" (the GPU has no FP8 dot, or no activation quantization), or
    None for the torch reference (CPU, tiles the kernel does not take, an activation dtype it
    does not take, no kernel). `what` names the layers in the one-time log lines."""
    if (not tiles_ok or not kernel_path.active(x)
            or x.dtype not in (torch.bfloat16, torch.float16, torch.float32)):
        return None
    kern = fp8_linear_kernel()
    if kern is None:
        log_once(f"nofp8linear:{what}", "kernels/fp8_linear unavailable: %s dequantize per "
                 "forward", what)
        return None
    if act_quant and not kern.fp8_dot_supported(x.device):
        log_once(f"fp8wonly:{what}", "no fp8 dot on %s: %s run weight-only (activations not "
                 "quantized)", x.device, what)
        return "weight_only"
    return "w8a8" if act_quant else "weight_only"


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
        _fp8_buffers(layer, "weight", (out, inp), "weight_scale_inv",
                     (_blocks(out, bn), _blocks(inp, bk)), device)

    def dummy(self, layer, gen) -> None:
        _dummy(layer.weight, layer.weight_scale_inv, self.full_shape(layer)[1], gen)

    def load(self, layer, suffix, tensor, name) -> None:
        _load_fp8(getattr(layer, suffix), suffix,
                  tp_narrow(tensor, layer.quant_tp_dim, layer.tp, name), name, layer.weight.dtype)

    def dequantize(self, layer) -> torch.Tensor:
        return dequantize_fp8_block(layer.weight, layer.weight_scale_inv, self.scheme.block,
                                    layer.quant_dtype)

    def kernel_mode(self, x: torch.Tensor) -> str | None:
        """"w8a8" / "weight_only" when kernels/fp8_linear runs this forward, None: the torch
        reference (CPU, or a block the kernel does not tile: bk must be a power of two >= 16)."""
        bk = self.scheme.block[1]
        return fp8_kernel_mode(x, self.act_quant, "FP8 block linears",
                               bk >= 16 and not bk & (bk - 1))

    def apply(self, layer, x):
        mode = self.kernel_mode(x)
        if mode is not None:
            return fp8_linear_kernel().fp8_block_linear(
                x, layer.weight, layer.weight_scale_inv, self.scheme.block, mode=mode,
                ue8m0=self.scheme.ue8m0)
        return super().apply(layer, self.qdq(x))


class Fp8BlockMoEMethod(_ActQuant, MoEMethod):
    format = "fp8_block"
    suffixes = ("weight", "weight_scale_inv")

    def create_buffers(self, experts, device) -> None:
        bn, bk = self.scheme.block
        E, H, inter = experts.num_local_experts, experts.hidden, experts.inter
        _check_tp(inter, bn, experts.quant_tp.size, "moe_intermediate_size")
        _fp8_buffers(experts, "w13_weight", (E, 2 * inter, H), "w13_weight_scale_inv",
                     (E, 2 * _blocks(inter, bn), _blocks(H, bk)), device)
        _fp8_buffers(experts, "w2_weight", (E, H, inter), "w2_weight_scale_inv",
                     (E, _blocks(H, bn), _blocks(inter, bk)), device)

    def dummy(self, experts, gen) -> None:
        _dummy(experts.w13_weight, experts.w13_weight_scale_inv, experts.hidden, gen)
        _dummy(experts.w2_weight, experts.w2_weight_scale_inv,
               experts.inter * experts.quant_tp.size, gen)

    def load(self, experts, idx, proj, suffix, tensor, name) -> None:
        t = narrow_expert(tensor, proj, experts, name)
        wdt = experts.w13_weight.dtype
        if proj == "down_proj":
            _load_fp8(getattr(experts, f"w2_{suffix}")[idx], suffix, t, name, wdt)
            return
        half = 0 if proj == "gate_proj" else 1
        if suffix == "weight":
            n = experts.inter
            dst = experts.w13_weight[idx, half * n:(half + 1) * n]
        else:
            nb = _blocks(experts.inter, self.scheme.block[0])
            dst = experts.w13_weight_scale_inv[idx, half * nb:(half + 1) * nb]
        _load_fp8(dst, suffix, t, name, wdt)

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
