"""EngineConfig as vLLM's EngineArgs takes it: the boolean fields read 0 / 1 as false / true.
vLLM's `quantization` engine argument (LLM(quantization=...), EngineConfig, `-q /
--quantization`): unset, or the checkpoint's own quant_method, serves; another method, or any
method for an unquantized checkpoint, is a start-up ConfigError naming `quantization` (it was
refused for every value but None, even the checkpoint's own)."""

from __future__ import annotations

import json

import pytest
import quant_writers as qw

from atom_stream import LLM, SamplingParams
from atom_stream.cli import engine_config_from_args, serve_parser
from atom_stream.config import ConfigError, EngineConfig
from atom_stream.layers.quant.apply import weight_bytes_report
from atom_stream.layers.quant.config import check_requested_method

CT = {"quant_method": "compressed-tensors"}


@pytest.mark.parametrize("requested,raw", [
    (None, None), (None, CT), ("compressed-tensors", CT), ("Compressed_Tensors", CT),
    ("fp8", {"quant_method": "fp8"}), ("quark", {"quant_method": "quark"}),
])
def test_unset_or_the_checkpoints_own_method_passes(requested, raw):
    check_requested_method(requested, raw)


@pytest.mark.parametrize("requested,raw,words", [
    ("fp8", CT, "does not match"), ("awq", {"quant_method": "fp8"}, "does not match"),
    ("fp8", None, "unquantized"), ("compressed-tensors", {}, "unquantized"),
])
def test_another_method_is_refused_naming_quantization(requested, raw, words):
    with pytest.raises(ConfigError, match=f"^quantization: .*{words}"):
        check_requested_method(requested, raw)


@pytest.mark.parametrize("bad", ["", "  ", 8, True])
def test_engine_config_refuses_a_non_name(bad):
    with pytest.raises(ConfigError, match="^quantization"):
        EngineConfig(quantization=bad)


def test_cli_flag_reaches_the_engine_config():
    for argv in (["-q", "compressed-tensors"], ["--quantization", "fp8"]):
        args = serve_parser().parse_args(argv)
        assert engine_config_from_args(args).quantization == argv[-1]
    assert engine_config_from_args(serve_parser().parse_args([])).quantization is None


def test_demo_model_refuses_a_method_at_start_up():
    with pytest.raises(ConfigError, match="^quantization: 'fp8' .*unquantized"):
        LLM(model="demo", quantization="fp8")


def test_int4_checkpoint_serves_with_its_own_method_and_refuses_another(tmp_path):
    """A checkpoint directory whose config.json carries the compressed-tensors INT4 config (the
    demo model's shapes, dummy weights: the check reads the config, the model runs its INT4
    experts either way)."""
    from atom_stream.models.demo import DEMO_CONFIG

    with open(tmp_path / "config.json", "w") as f:
        json.dump(dict(DEMO_CONFIG, quantization_config=qw.CT_INT4_CONFIG), f)
    kw = {"model": str(tmp_path), "load_format": "dummy", "device": "cpu", "dtype": "float32",
          "num_kv_blocks": 32}
    with LLM(quantization="compressed-tensors", **kw) as llm:
        out = llm.generate(prompt_token_ids=[[3, 5, 7]], sampling_params=SamplingParams(
            max_tokens=4, temperature=0, ignore_eos=True))[0]
        assert "int4_pack" in weight_bytes_report(llm.llm_engine.runner.model)  # INT4 experts
    assert len(out.token_ids) == 4 and out.finish_reason == "length"
    with pytest.raises(ConfigError, match="quant_method 'compressed-tensors'.*'fp8'"):
        LLM(quantization="fp8", **kw)


@pytest.mark.parametrize("name", ["enforce_eager", "trust_remote_code", "enable_prefix_caching",
                                  "enable_expert_parallel"])
def test_bool_fields_take_0_and_1_as_vllm_does(name):
    for v in (0, 1):
        assert getattr(EngineConfig(**{name: v}), name) is bool(v)
    for bad in (2, -1, "yes", 1.0, None):
        with pytest.raises(ConfigError, match=f"^{name}: must be true or false"):
            EngineConfig(**{name: bad})
