"""quantization_config -> per-layer schemes: compressed-tensors `ignore` (names and `re:`), Quark
`exclude` / layer_quant_config / layer_type_quant_config, FP8 block, names with or without the
Kimi `language_model.` prefix, and one clear error for each unsupported config."""

from __future__ import annotations

import copy

import pytest

from atom_stream.config import ConfigError
from atom_stream.layers.quant.config import FP8_BLOCK, INT4, MXFP4, W4A8, parse_quant_config
import quant_writers as qw

EXPERT = "model.layers.{}.mlp.experts.{}.{}"


def test_compressed_tensors_kimi_ignore_list():
    c = parse_quant_config(qw.CT_INT4_CONFIG)
    assert c.scheme(EXPERT.format(5, 0, "gate_proj")).format == INT4
    assert c.scheme(EXPERT.format(5, 383, "down_proj")).group_size == 32
    assert c.experts_scheme("model.layers.5.mlp.experts", 384).format == INT4
    for name in ("lm_head", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.down_proj",
                 "model.layers.5.mlp.shared_experts.up_proj", "model.layers.5.self_attn.kv_b_proj",
                 "model.layers.5.self_attn.q_a_proj"):
        assert c.scheme(name) is None, name


def test_ignore_exact_names_with_or_without_language_model_prefix():
    raw = copy.deepcopy(qw.CT_INT4_CONFIG)
    raw["ignore"] = (["language_model.model.layers.1.mlp.experts.0.gate_proj",
                      "language_model.model.layers.1.mlp.experts.0.up_proj",
                      "language_model.model.layers.1.mlp.experts.0.down_proj",
                      "language_model.layers.2.self_attn.o_proj",  # NVFP4 re-export spelling
                      "model.layers.3.mlp"]                         # a parent module
                     + [f"model.layers.1.mlp.experts.7.{p}"
                        for p in ("gate_proj", "up_proj", "down_proj")])
    c = parse_quant_config(raw)
    assert c.experts_scheme("model.layers.1.mlp.experts", 8) is None
    assert c.scheme("model.layers.2.self_attn.o_proj") is None
    assert c.scheme("model.layers.2.self_attn.q_b_proj").format == INT4
    assert c.scheme("model.layers.3.mlp.experts.4.up_proj") is None
    assert c.scheme("model.layers.4.mlp.experts.4.up_proj").format == INT4
    assert c.scheme("lm_head").format == INT4  # "Linear" targets lm_head unless ignored


def test_quark_exclude_layer_and_type_configs():
    c = parse_quant_config(qw.QUARK_MXFP4_CONFIG)
    s = c.scheme(EXPERT.format(1, 3, "up_proj"))
    assert s.format == MXFP4 and s.act == "mxfp4"
    assert c.experts_scheme("model.layers.2.mlp.experts", 8) is None  # re:.*layers\.2\.mlp...
    for name in ("lm_head", "model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"):
        assert c.scheme(name) is None, name
    assert c.scheme("model.layers.1.mlp.shared_experts.down_proj").format == MXFP4

    raw = copy.deepcopy(qw.QUARK_MXFP4_CONFIG)
    raw["layer_quant_config"] = {"*.mlp.experts.*": qw.QUARK_W4A8_CONFIG["global_quant_config"]}
    c = parse_quant_config(raw)
    assert c.scheme(EXPERT.format(1, 0, "gate_proj")).format == W4A8
    assert c.scheme("model.layers.1.mlp.shared_experts.gate_proj").format == MXFP4
    weight_only = dict(raw["global_quant_config"], input_tensors=None)
    raw["layer_type_quant_config"] = {"Linear": weight_only}
    c = parse_quant_config(raw)
    assert c.scheme("model.layers.1.mlp.shared_experts.gate_proj").act is None  # w4a16
    assert c.scheme(EXPERT.format(1, 0, "gate_proj")).format == W4A8  # layer config first


def test_quark_w4a8_list_of_two_and_static_activations():
    s = parse_quant_config(qw.QUARK_W4A8_CONFIG).scheme(EXPERT.format(1, 0, "down_proj"))
    assert s.format == W4A8 and s.act == "fp8_token"
    raw = copy.deepcopy(qw.QUARK_W4A8_CONFIG)
    raw["global_quant_config"]["input_tensors"]["is_dynamic"] = False
    assert parse_quant_config(raw).scheme(EXPERT.format(1, 0, "down_proj")).act == "fp8_static"


def test_fp8_block_config():
    c = parse_quant_config(dict(qw.FP8_BLOCK_CONFIG, scale_fmt="ue8m0",
                                ignored_layers=["model.layers.0.self_attn.kv_b_proj"]))
    s = c.scheme("model.layers.0.self_attn.q_a_proj")
    assert s.format == FP8_BLOCK and s.block == (128, 128) and s.ue8m0
    assert c.scheme("lm_head") is None
    assert c.scheme("model.layers.0.self_attn.kv_b_proj") is None
    assert c.experts_scheme("model.layers.3.mlp.experts", 256).format == FP8_BLOCK


def test_mixed_expert_schemes_are_one_clear_error():
    raw = copy.deepcopy(qw.CT_INT4_CONFIG)
    raw["ignore"].append("re:.*experts\\.\\d+\\.down_proj")
    with pytest.raises(ConfigError, match="mix schemes"):
        parse_quant_config(raw).experts_scheme("model.layers.1.mlp.experts", 8)


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.update(quant_method="gptq"), "quant_method: 'gptq'"),
    (lambda r: r["config_groups"]["group_0"]["weights"].update(num_bits=8), "group_0"),
    (lambda r: r.update(format="float-quantized"), "pack-quantized"),
])
def test_unsupported_compressed_tensors(mutate, match):
    raw = copy.deepcopy(qw.CT_INT4_CONFIG)
    mutate(raw)
    with pytest.raises(ConfigError, match=match):
        parse_quant_config(raw)


def test_unsupported_quark_and_fp8():
    raw = copy.deepcopy(qw.QUARK_MXFP4_CONFIG)
    raw["global_quant_config"]["weight"] = {"dtype": "int8", "qscheme": "per_channel"}
    with pytest.raises(ConfigError, match="global_quant_config.weight: Quark dtype 'int8'"):
        parse_quant_config(raw)
    with pytest.raises(ConfigError, match="weight_block_size"):
        parse_quant_config({"quant_method": "fp8", "activation_scheme": "dynamic"})
    assert parse_quant_config(None) is None
