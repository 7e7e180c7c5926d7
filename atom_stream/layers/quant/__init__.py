"""Quantized checkpoints (issue 8; model_spec.md §4): compressed-tensors INT4 (int4_pack), Quark
MXFP4 (mxfp4), Quark W4A8 converted to FP8 at load (w4a8), DeepSeek FP8 block (fp8_block), and the
FP8 KV cache's per-layer k_scale (kv_cache). `config` maps quantization_config to per-layer
schemes; `apply` wires them into the model and the loader (see its docstring for the sequence).
ATOM's --online_quant_config (`online`) quantizes unquantized Linear weights as they load
(`ptpc_fp8`: FP8 per-channel weights, per-token activations; per_block_fp8 via fp8_block).
"""

from __future__ import annotations

from atom_stream.layers.quant.apply import (
    QuantLoader,
    apply_quantization,
    init_online_dummy_weights,
    quant_init,
    set_activation_quant,
    weight_bytes_report,
)
from atom_stream.layers.quant.config import QuantScheme, parse_quant_config

__all__ = ["QuantLoader", "QuantScheme", "apply_quantization", "init_online_dummy_weights",
           "parse_quant_config", "quant_init", "set_activation_quant", "weight_bytes_report"]
