"""Test helpers: quantize a tiny random HF checkpoint into each on-disk format of model_spec.md §4,
written from the spec alone (own pack/unpack, independent of atom_stream.layers.quant).

`write_quantized(src, dst, fmt)` writes `dst` (the quantized checkpoint with its
quantization_config) and returns {name: dequantized float32 tensor} for every tensor it
quantized; `write_reference(src, dst, deq)` writes the model carrying those dequantized weights.
"""

from __future__ import annotations

import json
import math
import os
import re

import torch
from safetensors.torch import load_file, save_file

from hf_checkpoints import BASE, FLAVOURS, randomize_norms_and_bias

QUANT_OVERRIDES = dict(moe_intermediate_size=32, intermediate_size=96)


def make_tiny_hf(path: str, flavour: str = "kimi", seed: int = 0, **overrides):
    """save_pretrained a tiny random DeepseekV3 (hf_checkpoints settings + overrides)."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = dict(BASE)
    kw.update(FLAVOURS[flavour])
    kw.update(QUANT_OVERRIDES)
    kw.update(overrides)
    rope = dict(kw.pop("rope_scaling"), rope_theta=kw.pop("rope_theta"))
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kw, rope_parameters=rope)).float().eval()
    randomize_norms_and_bias(model, seed)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)


# ------------------------------------------------------------------ INT4 (compressed-tensors)
def ct_quantize(w: torch.Tensor, group: int = 32):
    """Symmetric int4 per group: (q int [-8, 7], scale bf16 [out, in/group])."""
    g = w.float().reshape(w.shape[0], -1, group)
    scale = (g.abs().amax(-1) / 7.5).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.round(g / scale.float()[..., None]).clamp(-8, 7).to(torch.int32)
    return q.reshape(w.shape), scale


def ct_pack(q: torch.Tensor) -> torch.Tensor:
    """q + 8 as nibbles, element c at bits 4*(c%8) of word c//8 (little-endian int32)."""
    u = (q.to(torch.int64) + 8)
    words = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.int64)
    for i in range(8):
        words |= u[:, i::8] << (4 * i)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def ct_unpack(packed: torch.Tensor) -> torch.Tensor:
    words = packed.to(torch.int64) & 0xFFFFFFFF
    cols = [((words >> (4 * i)) & 0xF) - 8 for i in range(8)]
    return torch.stack(cols, -1).reshape(packed.shape[0], -1)


# ------------------------------------------------------------------ MXFP4 (Quark)
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def mx_exponent(amax: float) -> int:
    """Quark "even": amax rounded to a power of two (up iff its mantissa >= 1.75), minus 2."""
    if amax == 0 or amax < 2.0**-126:
        return -127
    m, e = math.frexp(amax)  # amax = m * 2^e, m in [0.5, 1)
    k = e if m >= 0.875 else e - 1
    return max(-127, min(127, k - 2))


def e2m1_code(v: float) -> int:
    """Nearest e2m1 value, ties to the even code, saturating at 6; bit 3 = sign."""
    mag = abs(v)
    best = min(range(8), key=lambda c: (abs(E2M1[c] - mag), c % 2))
    return best | (8 if v < 0 else 0)


def mx_quantize(w: torch.Tensor):
    """[rows, n] -> (codes uint8 [rows, n], e8m0 uint8 [rows, n/32]) (plain python loops)."""
    rows, n = w.shape
    codes = torch.zeros(rows, n, dtype=torch.uint8)
    scales = torch.zeros(rows, n // 32, dtype=torch.uint8)
    wl = w.float().tolist()
    for r in range(rows):
        for gi in range(n // 32):
            grp = wl[r][gi * 32:(gi + 1) * 32]
            exp = mx_exponent(max(abs(v) for v in grp))
            scales[r, gi] = exp + 127
            for j, v in enumerate(grp):
                codes[r, gi * 32 + j] = e2m1_code(v / 2.0**exp)
    return codes, scales


def mx_pack(codes: torch.Tensor) -> torch.Tensor:
    return codes[:, 0::2] | (codes[:, 1::2] << 4)  # element 2i in the low nibble


def mx_dequant(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    lut = torch.tensor(E2M1 + [-v for v in E2M1])
    vals = lut[codes.long()]
    return vals * torch.exp2(scales.float() - 127).repeat_interleave(32, -1)


def mx_qdq(x: torch.Tensor) -> torch.Tensor:
    """Activation fake-quant (w4a4 reference), vectorized version of the rule above."""
    g = x.float().reshape(*x.shape[:-1], -1, 32)
    amax = g.abs().amax(-1)
    m, e = torch.frexp(amax)
    k = torch.where(m >= 0.875, e, e - 1)
    exp = torch.where(amax < 2.0**-126, torch.full_like(k, -127), (k - 2).clamp(-127, 127))
    scale = torch.exp2(exp.float())[..., None]
    v = g / scale
    lut = torch.tensor(E2M1)
    dist = (v.abs()[..., None] - lut).abs()
    nearest = dist == dist.min(-1, keepdim=True).values
    # among equally near values (exact ties) take the even code
    mag = lut[(nearest.float() * torch.tensor([2.0, 1.0] * 4)).argmax(-1)]
    return (torch.sign(v) * mag * scale).reshape(x.shape).to(x.dtype)


# ------------------------------------------------------------------ W4A8 (Quark)
ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def w4a8_quantize(w: torch.Tensor):
    """fp8 per-tensor scale s, int4 per-channel s2 on w/s: (q, s [] fp32, s2 [out] fp32)."""
    s = w.float().abs().amax() / 448.0
    ws = w.float() / s
    s2 = ws.abs().amax(1) / 7.0
    q = torch.round(ws / s2[:, None]).clamp(-8, 7).to(torch.int32)
    return q, s.reshape(()), s2


def quark_pack_reorder(q: torch.Tensor) -> torch.Tensor:
    """Quark Pack_4_bits: nibble i of word c holds element 8c + ORDER[i], two's complement."""
    words = torch.zeros(q.shape[0], q.shape[1] // 8, dtype=torch.int64)
    for i, src in enumerate(ORDER):
        words |= (q[:, src::8].to(torch.int64) & 0xF) << (4 * i)
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)


def quark_unpack_reorder(packed: torch.Tensor) -> torch.Tensor:
    words = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros(packed.shape[0], packed.shape[1] * 8, dtype=torch.int64)
    for i, dst in enumerate(ORDER):
        nib = (words >> (4 * i)) & 0xF
        out[:, dst::8] = nib - 16 * (nib >= 8).to(torch.int64)
    return out


def w4a8_dequant(q, s, s2) -> torch.Tensor:
    return q.float() * s2.float()[:, None] * s.float()


def fp8_requant(*ws: torch.Tensor):
    """Spec §4d conversion: one FP8 scale (amax/448) shared by the given tensors."""
    scale = max(float(w.abs().amax()) for w in ws) / 448.0
    return [(w / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale for w in ws]


def fp8_token_qdq(x: torch.Tensor) -> torch.Tensor:
    s = (x.float().abs().amax(-1, keepdim=True) / 448.0).clamp(min=1e-12)
    return ((x.float() / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s).to(x.dtype)


# ------------------------------------------------------------------ FP8 block (DeepSeek)
def fp8_block_quantize(w: torch.Tensor, b: int = 128):
    out, inp = w.shape
    nb0, nb1 = math.ceil(out / b), math.ceil(inp / b)
    s = torch.zeros(nb0, nb1)
    q = torch.zeros(out, inp, dtype=torch.float8_e4m3fn)
    for i in range(nb0):
        for j in range(nb1):
            blk = w[i * b:(i + 1) * b, j * b:(j + 1) * b].float()
            s[i, j] = max(float(blk.abs().amax()), 1e-12) / 448.0
            q[i * b:(i + 1) * b, j * b:(j + 1) * b] = (blk / s[i, j]).to(torch.float8_e4m3fn)
    return q, s


def fp8_block_dequant(q, s, b: int = 128):
    full = s.repeat_interleave(b, 0)[: q.shape[0]].repeat_interleave(b, 1)[:, : q.shape[1]]
    return q.float() * full


def fp8_group_qdq(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    out = torch.empty_like(x, dtype=torch.float32)
    for j in range(0, x.shape[-1], group):
        blk = x[..., j:j + group].float()
        s = blk.abs().amax(-1, keepdim=True).clamp(min=1e-4) / 448.0
        out[..., j:j + group] = (blk / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
    return out.to(x.dtype)


# ------------------------------------------------------------------ checkpoints
CT_INT4_CONFIG = {
    "quant_method": "compressed-tensors", "format": "pack-quantized",
    "quantization_status": "compressed", "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                    "group_size": 32, "dynamic": False, "actorder": None,
                    "block_structure": None, "observer": "minmax", "observer_kwargs": {}}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
               "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
}
_MX = {"dtype": "fp4", "qscheme": "per_group", "group_size": 32, "ch_axis": -1,
       "scale_format": "e8m0", "scale_calculation_mode": "even", "round_method": "half_even",
       "observer_cls": "PerBlockMXObserver"}
_EXPORT = {"kv_cache_group": [], "min_kv_scale": 0.0, "pack_method": "reorder",
           "weight_format": "real_quantized", "weight_merge_groups": None}
# Kimi layout (language_model. prefix) spelled in the exclude list; layer 2's experts excluded.
QUARK_MXFP4_CONFIG = {
    "quant_method": "quark", "quant_mode": "eager_mode",
    "global_quant_config": {"weight": dict(_MX, is_dynamic=False),
                            "input_tensors": dict(_MX, is_dynamic=True),
                            "output_tensors": None, "bias": None},
    "layer_quant_config": {}, "layer_type_quant_config": {}, "kv_cache_quant_config": {},
    "exclude": ["language_model.lm_head", "re:.*self_attn.*", "re:.*mlp.gate$",
                "language_model.model.layers.0.mlp.gate_proj",
                "language_model.model.layers.0.mlp.up_proj",
                "language_model.model.layers.0.mlp.down_proj",
                "re:.*layers\\.2\\.mlp\\.experts\\..*", "re:vision_tower.*",
                "re:mm_projector.*"],
    "export": _EXPORT, "algo_config": None, "version": "0.11",
}
QUARK_W4A8_CONFIG = {
    "quant_method": "quark", "quant_mode": "eager_mode",
    "global_quant_config": {
        "weight": [{"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": False},
                   {"dtype": "int4", "qscheme": "per_channel", "symmetric": True, "ch_axis": 0,
                    "is_dynamic": False}],
        "input_tensors": {"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": True},
        "output_tensors": None, "bias": None},
    "layer_quant_config": {}, "layer_type_quant_config": {}, "kv_cache_quant_config": {},
    "exclude": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp.gate$",
                "re:.*mlp\\.(gate|up|down)_proj.*"],
    "export": _EXPORT, "algo_config": None, "version": "0.11",
}
FP8_BLOCK_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                    "weight_block_size": [128, 128]}

_LINEAR = re.compile(r"^model\.layers\.(\d+)\.(self_attn|mlp)\.(.+)\.weight$")


def _selected(fmt: str, name: str) -> bool:
    """Which `.weight` tensors each format quantizes (the writer's own view of the configs)."""
    m = _LINEAR.match(name)
    if not m or name.endswith("norm.weight") or name.endswith("mlp.gate.weight"):
        return False
    layer, rest = int(m.group(1)), m.group(2) + "." + m.group(3)
    routed = rest.startswith("mlp.experts.")
    if fmt in ("int4", "w4a8"):
        return routed
    if fmt == "mxfp4":
        return (routed and layer != 2) or rest.startswith("mlp.shared_experts.")
    return fmt == "fp8_block"


def write_quantized(src: str, dst: str, fmt: str, kimi_layout: bool = False) -> dict:
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    deq: dict[str, torch.Tensor] = {}
    for name, w in tensors.items():
        if not _selected(fmt, name):
            out[name] = w
            continue
        base = name[: -len(".weight")]
        if fmt == "int4":
            q, s = ct_quantize(w)
            out[base + ".weight_packed"] = ct_pack(q)
            out[base + ".weight_scale"] = s
            out[base + ".weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int32)
            deq[name] = q.float() * s.float().repeat_interleave(32, -1)
        elif fmt == "mxfp4":
            codes, s = mx_quantize(w)
            out[base + ".weight"] = mx_pack(codes)
            out[base + ".weight_scale"] = s
            deq[name] = mx_dequant(codes, s)
        elif fmt == "w4a8":
            q, s, s2 = w4a8_quantize(w)
            out[base + ".weight"] = quark_pack_reorder(q)
            out[base + ".weight_scale"] = s
            out[base + ".weight_scale_2"] = s2
            deq[name] = w4a8_dequant(q, s, s2)
        else:
            q, s = fp8_block_quantize(w)
            out[base + ".weight"] = q
            out[base + ".weight_scale_inv"] = s
            deq[name] = fp8_block_dequant(q, s)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    cfg["quantization_config"] = {"int4": CT_INT4_CONFIG, "mxfp4": QUARK_MXFP4_CONFIG,
                                  "w4a8": QUARK_W4A8_CONFIG, "fp8_block": FP8_BLOCK_CONFIG}[fmt]
    if kimi_layout:
        cfg["model_type"] = "kimi_k2"
        cfg = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
               "text_config": cfg, "vision_config": {"hidden_size": 8},
               "bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg.get("eos_token_id")}
        out = {"language_model." + k: v for k, v in out.items()}
        out["vision_tower.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 2)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(dst, "model.safetensors"))
    return deq


def write_reference(src: str, dst: str, deq: dict) -> None:
    """The unquantized checkpoint carrying the dequantized weights (float32)."""
    os.makedirs(dst, exist_ok=True)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors.update(deq)
    save_file({k: v.contiguous() for k, v in tensors.items()},
              os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
