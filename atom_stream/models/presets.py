"""Bench presets: full-size per-rank shapes with dummy weights (`--model k25-tp8-rank`).

`k25-tp8-rank` is ONE tensor-parallel rank of Kimi-K2.5 at TP8, at full depth: what a single
MI355 / H200 holds and computes per decode step when 8 GPUs serve the model. Per rank: 64/8 = 8
attention heads (q_a/kv_a replicated, q_b/kv_b/o split), dense MLP 18432/8, every one of the 384
experts with intermediate 2048/8 = 256, the shared expert 2048/8, the vocab shard 163840/8. The
routed experts are INT4 group-32 (Kimi's native compressed-tensors packing), MXFP4 or W4A8
(FP8 at rest); the rest bf16; the KV cache fp8. `-bf16` variants keep bf16 experts and fewer
layers (bf16 at full depth does not fit one GPU).

Several GPUs (issue 11): `k25-tp4-rank` is one TP4 rank (16 heads, expert intermediate 512,
vocab shard 163840/4): served with `--tensor-parallel-size 2`, each GPU holds exactly one TP8
rank's shapes (ranks 0-1 of a TP8 group) and the pair all-reduces as TP8 ranks do;
`k25-tp2-rank` (32 heads, expert intermediate 1024) at `--tensor-parallel-size 4` does the same
on four GPUs (ranks 0-3, 4-way all-reduces). `k25` is the whole text model: at
`--tensor-parallel-size 8` each GPU holds one TP8 rank.
"""

from __future__ import annotations

_K25_FULL = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
    "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 64,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "n_routed_experts": 384, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1,
    "norm_topk_prob": True, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "rope_theta": 50000.0,
    "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 262144, "rms_norm_eps": 1e-5, "hidden_act": "silu",
    "tie_word_embeddings": False, "bos_token_id": 163584, "eos_token_id": 163585,
}

_SPLIT = ("vocab_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads")


def k25_rank(tp: int) -> dict:
    """One rank of Kimi-K2.5's text model at tensor parallel `tp`: the TP-split dims (heads,
    dense and expert intermediate, vocab) divided by `tp`; q_a / kv_a, the 384 experts, hidden
    size and depth unchanged."""
    return dict(_K25_FULL, **{k: _K25_FULL[k] // tp for k in _SPLIT})


_K25_TEXT = k25_rank(8)

INT4_EXPERTS = {
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

_MXFP4_SPEC = {"dtype": "fp4", "qscheme": "per_group", "group_size": 32, "ch_axis": -1,
               "scale_format": "e8m0", "scale_calculation_mode": "even",
               "round_method": "half_even", "observer_cls": "PerBlockMXObserver"}
MXFP4_EXPERTS = {
    "quant_method": "quark", "quant_mode": "eager_mode",
    "global_quant_config": {"weight": dict(_MXFP4_SPEC, is_dynamic=False),
                            "input_tensors": dict(_MXFP4_SPEC, is_dynamic=True),
                            "output_tensors": None, "bias": None},
    "layer_quant_config": {}, "layer_type_quant_config": {}, "kv_cache_quant_config": {},
    "exclude": ["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$", "re:.*shared_experts.*",
                "re:.*layers\\.0\\.mlp.*"],
    "export": {"kv_cache_group": [], "min_kv_scale": 0.0, "pack_method": "reorder",
               "weight_format": "real_quantized", "weight_merge_groups": None},
}

# Quark W4A8 (amd/Kimi-K2.5-W4A8 style): INT4 experts converted to FP8 at load, so at rest the
# experts take 1 B/weight: ~127 GB for one TP8 rank at full depth (the usage guide serves this
# variant at TP4); leave the KV pool room with gpu_memory_utilization ~0.97.
W4A8_EXPERTS = {
    "quant_method": "quark", "quant_mode": "eager_mode",
    "global_quant_config": {
        "weight": [{"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": False},
                   {"dtype": "int4", "qscheme": "per_channel", "symmetric": True, "ch_axis": 0,
                    "is_dynamic": False}],
        "input_tensors": {"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": True},
        "output_tensors": None, "bias": None},
    "layer_quant_config": {}, "layer_type_quant_config": {}, "kv_cache_quant_config": {},
    "exclude": ["lm_head", "re:.*self_attn.*", "re:.*mlp.gate$", "re:.*shared_experts.*",
                "re:.*layers\\.0\\.mlp.*"],
    "export": {"kv_cache_group": [], "min_kv_scale": 0.0, "pack_method": "reorder",
               "weight_format": "real_quantized", "weight_merge_groups": None},
}

PRESETS: dict[str, dict] = {
    "k25-tp8-rank": dict(_K25_TEXT, quantization_config=INT4_EXPERTS),
    "k25-tp8-rank-mxfp4": dict(_K25_TEXT, quantization_config=MXFP4_EXPERTS),
    "k25-tp8-rank-w4a8": dict(_K25_TEXT, quantization_config=W4A8_EXPERTS),
    "k25-tp8-rank-bf16": dict(_K25_TEXT, num_hidden_layers=16),
    "k25-tp4-rank": dict(k25_rank(4), quantization_config=INT4_EXPERTS),
    "k25-tp4-rank-mxfp4": dict(k25_rank(4), quantization_config=MXFP4_EXPERTS),
    "k25-tp2-rank": dict(k25_rank(2), quantization_config=INT4_EXPERTS),
    "k25": dict(_K25_FULL, quantization_config=INT4_EXPERTS),
}
