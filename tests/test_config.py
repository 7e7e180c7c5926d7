"""Config parsing (flat, rope_parameters, Kimi-K2.5 nested, q_lora null) and validation errors;
omitted keys parse to transformers' DeepseekV3Config defaults (read at test time)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

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


@pytest.mark.parametrize("seqs,budget", [(64, 48), (300, 299), (9, 8)])
def test_more_running_sequences_than_the_step_budget_is_refused(seqs, budget):
    """vLLM's SchedulerConfig check (verify_max_model_len), its message first, then the flags."""
    with pytest.raises(ConfigError) as e:
        EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=budget)
    assert str(e.value).startswith(f"max_num_batched_tokens ({budget}) must be greater than or "
                                   f"equal to max_num_seqs ({seqs})")
    assert "--max-num-batched-tokens" in str(e.value) and "--max-num-seqs" in str(e.value)
    assert isinstance(e.value, ValueError)
    assert EngineConfig(max_num_seqs=budget, max_num_batched_tokens=budget).max_num_seqs == budget


def test_max_num_seqs_left_unset_fits_the_step_budget():
    """As vLLM's EngineArgs: an unset max_num_seqs is the default capped by the budget, so
    setting only a small budget starts; a replace() keeps the resolved value."""
    assert EngineConfig().max_num_seqs == EngineConfig.DEFAULT_MAX_NUM_SEQS == 256
    assert EngineConfig(max_num_batched_tokens=40).max_num_seqs == 40
    assert EngineConfig(max_num_batched_tokens=4096).max_num_seqs == 256
    assert EngineConfig(max_num_seqs=None, max_num_batched_tokens=7).max_num_seqs == 7
    # chunked prefill is always on: a budget below max_model_len is fine (vLLM refuses it only
    # without chunked prefill)
    cfg = EngineConfig(max_model_len=4096, max_num_batched_tokens=512)
    assert dataclasses.replace(cfg, device="cpu").max_num_seqs == 256
    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0, max_num_batched_tokens=7)


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


# ----- defaults for omitted keys: transformers' DeepseekV3Config, read at test time -----

# optional keys a config.json may omit; each must parse to transformers' default
HF_DEFAULTED = ("moe_intermediate_size", "n_shared_experts", "n_routed_experts",
                "num_experts_per_tok", "routed_scaling_factor", "n_group", "topk_group",
                "first_k_dense_replace", "norm_topk_prob", "q_lora_rank",
                "num_nextn_predict_layers", "max_position_embeddings", "rms_norm_eps",
                "tie_word_embeddings", "rope_theta")
# a DeepSeek-shaped config whose every key in HF_DEFAULTED differs from transformers' default
# and which stays valid when any one of them falls back to that default
NON_DEFAULT = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 1000,
    "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
    "num_attention_heads": 8, "kv_lora_rank": 64, "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16, "v_head_dim": 32, "hidden_act": "silu",
    "moe_intermediate_size": 128, "n_shared_experts": 2, "n_routed_experts": 64,
    "num_experts_per_tok": 6, "routed_scaling_factor": 1.5, "n_group": 4, "topk_group": 2,
    "first_k_dense_replace": 1, "norm_topk_prob": False, "q_lora_rank": 96,
    "num_nextn_predict_layers": 0, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True, "rope_theta": 50000.0,
}


def hf_value(hf_cfg, name: str):
    """The value transformers' config object holds for our ModelConfig field `name`."""
    if name == "rope_theta":
        return hf_cfg.rope_parameters["rope_theta"]
    return getattr(hf_cfg, name)


def assert_same_as_hf(cfg: ModelConfig, hf_cfg) -> None:
    """Every defaulted field, the activation and the rope parameters agree with transformers."""
    for name in HF_DEFAULTED + ("hidden_act", "kv_lora_rank", "qk_rope_head_dim"):
        assert getattr(cfg, name) == hf_value(hf_cfg, name), name
    rope = hf_cfg.rope_parameters
    assert cfg.rope_scaling.type == rope["rope_type"]
    if rope["rope_type"] == "yarn":
        assert cfg.rope_scaling.factor == rope["factor"]
        assert (cfg.rope_scaling.original_max_position_embeddings
                == rope["original_max_position_embeddings"])


@pytest.mark.parametrize("field", HF_DEFAULTED)
def test_an_omitted_field_parses_to_transformers_default(field):
    from transformers import DeepseekV3Config
    want = hf_value(DeepseekV3Config(), field)
    assert NON_DEFAULT[field] != want  # so that a wrong default cannot pass
    raw = dict(NON_DEFAULT)
    del raw[field]
    assert getattr(ModelConfig.from_dict(raw), field) == want


def test_all_omitted_at_once_equals_transformers_reading_the_same_dict():
    from transformers import DeepseekV3Config
    raw = {k: v for k, v in NON_DEFAULT.items() if k not in HF_DEFAULTED}
    assert_same_as_hf(ModelConfig.from_dict(raw), DeepseekV3Config.from_dict(raw))
    # the Kimi-K2.5 wrapper: the same defaults inside text_config
    k25 = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
           "text_config": dict(raw, model_type="kimi_k2")}
    assert ModelConfig.from_dict(k25) == dataclasses.replace(
        ModelConfig.from_dict(raw), architecture="KimiK25ForConditionalGeneration")


def test_null_keeps_its_meaning():
    from transformers import DeepseekV3Config
    for name, want in (("q_lora_rank", None), ("norm_topk_prob", False)):
        raw = dict(NON_DEFAULT, **{name: None})
        assert getattr(ModelConfig.from_dict(raw), name) is want, name
        # transformers: q_lora_rank None is a plain q_proj; norm_topk_prob None is falsy
        assert bool(hf_value(DeepseekV3Config.from_dict(raw), name)) == bool(want)
    dense = ModelConfig.from_dict(dict(NON_DEFAULT, n_routed_experts=None))  # ours: dense
    assert dense.n_routed_experts == 0
    assert not any(dense.is_moe_layer(i) for i in range(dense.num_hidden_layers))


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "factor": 16.0},  # every optional YaRN key omitted
    {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 1024, "beta_fast": 32,
     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},  # DeepSeek-V3's
    {"type": "yarn", "factor": 40.0, "mscale": 0.707, "mscale_all_dim": 0.707,
     "beta_fast": None},  # DeepSeek-V2-Lite-like, a null beta
    {"type": "yarn", "factor": 4.0, "mscale": 1.0},  # mscale without mscale_all_dim
])
def test_yarn_frequencies_and_scales_equal_transformers(rope):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale
    raw = dict(NON_DEFAULT, rope_scaling=rope, max_position_embeddings=16384)
    cfg = ModelConfig.from_dict(raw)
    hf = DeepseekV3Config.from_dict(raw)
    assert_same_as_hf(cfg, hf)
    inv, mult = yarn_inv_freq(cfg)
    hf_inv, hf_mult = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    torch.testing.assert_close(inv.float(), hf_inv, rtol=1e-6, atol=0)
    assert mult == pytest.approx(hf_mult, rel=1e-12)
    want_scale = yarn_apply_mscale(hf.rope_parameters, hf.qk_head_dim ** -0.5)
    assert cfg.softmax_scale == pytest.approx(want_scale, rel=1e-12)


@pytest.mark.parametrize("over,match", [
    ({"rope_scaling": {"type": "yarn"}}, "factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "mscale_all_dim": 1.0}}, "mscale"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "mscale": 0.5}}, "mscale"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "attention_factor": 1.2}},
     "attention_factor"),
    ({"rope_interleave": False}, "rope_interleave"),
])
def test_rope_settings_we_would_compute_differently_are_refused(over, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_dict(dict(NON_DEFAULT, **over))


# keys written by hand out of a save_pretrained config.json (transformers writes every key)
E2E_OMITTED = ("n_shared_experts", "n_routed_experts", "num_experts_per_tok",
               "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace",
               "norm_topk_prob", "q_lora_rank", "num_nextn_predict_layers", "rms_norm_eps",
               "tie_word_embeddings", "max_position_embeddings", "hidden_act", "rope_parameters")


def test_checkpoint_omitting_moe_keys_gives_transformers_logits(tmp_path):
    """A tiny model built on transformers' defaults (256 experts, 8 groups / 4 kept, top-8,
    scale 2.5, 3 dense layers, a shared expert, q LoRA 1536), its config.json stripped of
    those keys: our config equals transformers' reading of the same file, and our prefill
    logits equal transformers'."""
    from hf_checkpoints import randomize_norms_and_bias
    from test_model_parity import prefill_logits
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from atom_stream.loader import load_checkpoint
    from atom_stream.models import MODEL_REGISTRY

    hf_cfg = DeepseekV3Config(
        vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, initializer_range=0.08,
        bos_token_id=256, eos_token_id=257)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(hf_cfg).float().eval()
    randomize_norms_and_bias(model, 0)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    path = tmp_path / "config.json"
    raw = json.loads(path.read_text())
    assert all(k in raw for k in E2E_OMITTED)
    path.write_text(json.dumps({k: v for k, v in raw.items() if k not in E2E_OMITTED}))

    cfg = ModelConfig.from_pretrained(str(tmp_path))
    hf_file_cfg = DeepseekV3Config.from_pretrained(str(tmp_path))
    assert_same_as_hf(cfg, hf_file_cfg)
    assert cfg.is_moe_layer(3) and not cfg.is_moe_layer(2)
    hf = DeepseekV3ForCausalLM.from_pretrained(str(tmp_path)).double().eval()
    hf.set_experts_implementation("eager")

    ours = MODEL_REGISTRY[cfg.architecture](cfg, 64, torch.float32)
    load_checkpoint(ours, str(tmp_path), cfg.num_hidden_layers, cfg.tie_word_embeddings)
    ours.process_weights_after_loading()
    ids = torch.randint(0, cfg.vocab_size, (24,), generator=torch.Generator().manual_seed(7))
    logits, ref = prefill_logits(ours, hf, cfg, ids)
    rel = ((logits.double() - ref).norm() / ref.norm()).item()
    assert rel < 1e-4, f"prefill logits differ by {rel:.2e}"
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
