"""Config parsing (flat, rope_parameters, Kimi-K2.5 nested, q_lora null) and validation errors."""

from __future__ import annotations

import pytest

from atom_stream.config import ConfigError, EngineConfig, ModelConfig
from atom_stream.layers.rotary import yarn_inv_freq

K25_TEXT = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "kimi_k2", "vocab_size": 163840,
    "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 384,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 1, "n_group": 1,
    "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.827, "rope_theta": 50000,
    "rope_scaling": {"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    "max_position_embeddings": 262144, "rms_norm_eps": 1e-5, "num_nextn_predict_layers": 0,
}
INT4_QCFG = {"quant_method": "compressed-tensors", "format": "pack-quantized"}


def test_kimi_k25_nested_config():
    raw = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
           "text_config": dict(K25_TEXT), "quantization_config": INT4_QCFG,
           "bos_token_id": 163584, "eos_token_id": 163585, "vision_config": {}}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.architecture == "KimiK25ForConditionalGeneration"
    assert cfg.quantization_config == INT4_QCFG  # copied down from the top level
    assert cfg.eos_token_id == (163585,)
    assert cfg.kv_cache_dim == 576
    assert cfg.softmax_scale == pytest.approx(0.14467963, rel=1e-7)


def test_quantization_config_inside_text_config():
    text = dict(K25_TEXT, quantization_config=INT4_QCFG)
    cfg = ModelConfig.from_dict({"architectures": ["KimiK25ForConditionalGeneration"],
                                 "text_config": text})
    assert cfg.quantization_config == INT4_QCFG


def test_yarn_inv_freq_check_values_from_spec():
    inv, mult = yarn_inv_freq(ModelConfig.from_dict(K25_TEXT))
    assert mult == pytest.approx(1.0)
    for j, want in {0: 1.0, 8: 0.066874, 9: 0.0437767, 20: 1.80702e-5, 31: 4.38221e-7}.items():
        assert inv[j].item() == pytest.approx(want, rel=1e-5), j


def test_rope_parameters_form_equals_rope_scaling_form():
    flat = ModelConfig.from_dict(K25_TEXT)
    v5 = dict(K25_TEXT)
    rs = v5.pop("rope_scaling")
    v5.pop("rope_theta")
    v5["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 50000.0,
                             **{k: v for k, v in rs.items() if k != "type"}}
    assert ModelConfig.from_dict(v5) == flat


def test_deepseek_v3_scale_and_no_q_lora():
    ds = dict(K25_TEXT, model_type="deepseek_v3", q_lora_rank=None, num_attention_heads=128,
              rope_theta=10000, n_group=8, topk_group=4, n_routed_experts=256)
    ds["rope_scaling"] = dict(K25_TEXT["rope_scaling"], factor=40.0)
    cfg = ModelConfig.from_dict(ds)
    assert cfg.q_lora_rank is None
    assert cfg.softmax_scale == pytest.approx(0.13523378, rel=1e-6)


@pytest.mark.parametrize("field,value", [("n_group", 5), ("num_experts_per_tok", 999),
                                         ("hidden_act", "gelu")])
def test_bad_model_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_dict(dict(K25_TEXT, **{field: value}))


def test_missing_required_field_names_it():
    raw = dict(K25_TEXT)
    del raw["kv_lora_rank"]
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        ModelConfig.from_dict(raw)


@pytest.mark.parametrize("field,value", [
    ("kv_cache_dtype", "int3"), ("block_size", 12), ("max_num_seqs", 0), ("dtype", "fp64"),
    ("gpu_memory_utilization", 1.5), ("num_kv_blocks", -1), ("tensor_parallel_size", "2"),
    ("load_format", "pt"), ("device", "tpu"), ("cudagraph_capture_sizes", [0]),
])
def test_engine_config_error_names_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}:"):
        EngineConfig(**{field: value})


def test_engine_config_unknown_kwarg():
    with pytest.raises(ConfigError, match="max_num_seq"):
        EngineConfig.from_kwargs(max_num_seq=4)


@pytest.mark.parametrize("kw,name", [
    ({"enforce_eager": "no"}, "enforce_eager"), ({"enable_prefix_caching": "false"},
                                                  "enable_prefix_caching"),
    ({"trust_remote_code": 2}, "trust_remote_code"), ({"max_model_len": True}, "max_model_len"),
    ({"num_kv_blocks": True}, "num_kv_blocks"), ({"cudagraph_capture_sizes": [True]},
                                                  "cudagraph_capture_sizes"),
    ({"gpu_memory_utilization": "abc"}, "gpu_memory_utilization"),
    ({"gpu_memory_utilization": None}, "gpu_memory_utilization"),
    ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"), ({"seed": 1.5}, "seed"),
    ({"dtype": "int8"}, "dtype")])
def test_wrong_types_are_config_errors_naming_the_field(kw, name):
    # a string "false" must not turn a feature on; a bool is not a count
    with pytest.raises(ConfigError, match=f"^{name}: "):
        EngineConfig(**kw)


def test_vllm_spellings_of_dtype_and_seed():
    import torch
    for given, want in (("half", "float16"), ("float", "float32"), (torch.bfloat16, "bfloat16"),
                        (torch.float32, "float32"), ("auto", "auto")):
        assert EngineConfig(dtype=given).dtype == want, given
    seeds = {EngineConfig(seed=None).seed for _ in range(4)}
    assert all(isinstance(s, int) for s in seeds) and len(seeds) > 1  # drawn, then fixed
    assert EngineConfig(seed=7).seed == 7
