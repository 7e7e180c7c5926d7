"""Checkpoint / config review (session 23): each test reproduces one discrepancy with
reference/model_spec.md or transformers that was found and fixed.

- DeepSeek-V2 / V2-Lite (`DeepseekV2ForCausalLM`, topk_method greedy, softmax scores, no
  correction bias, q_lora_rank null, YaRN mscale 0.707): a transformers-written checkpoint
  failed to load (the Router's e_score_correction_bias was required), and its config, which
  transformers writes without `scoring_func`, was read as sigmoid routing.
- `attention_bias: true` (q_a / kv_a / o_proj biases): the biases were dropped with a warning
  and wrong tokens served; now a ConfigError, and a stray bias tensor a CheckpointError.
- Quark W4A8 experts with a wrong-shaped weight / weight_scale / weight_scale_2: a bare torch
  RuntimeError; now a CheckpointError naming the tensor.
- A served layer's tensor that no parameter takes (config n_shared_experts 0 beside
  shared-expert weights): dropped with a warning, wrong tokens; now a CheckpointError.
- generation_config.json's eos_token_id (Kimi-K2.5: <|im_end|>) was not a stop token when the
  engine runs without a tokenizer (skip_tokenizer_init): ModelConfig now carries it.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from hf_checkpoints import BASE, randomize_norms_and_bias, write_hf_checkpoint
from safetensors.torch import load_file, save_file

from atom_stream.config import ConfigError, ModelConfig
from atom_stream.loader import CheckpointError

PROMPT = torch.randint(0, 320, (12,), generator=torch.Generator().manual_seed(1)).tolist()


def llm_for(path: str):
    from atom_stream import LLM
    return LLM(model=path, device="cpu", dtype="float32", skip_tokenizer_init=True,
               max_model_len=128, num_kv_blocks=64, block_size=4)


def greedy(llm, n: int = 16, ignore_eos: bool = True):
    from atom_stream import SamplingParams
    out = llm.generate(prompt_token_ids=[PROMPT], sampling_params=SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=ignore_eos))[0]
    return list(out.token_ids), out.finish_reason


def hf_greedy(hf, n: int = 16) -> list[int]:
    hf = hf.double()
    hf.set_experts_implementation("eager")
    p = torch.tensor([PROMPT])
    with torch.no_grad():
        out = hf.generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n,
                          min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, p.shape[1]:].tolist()


# ------------------------------------------------------------------ DeepSeek-V2 (greedy/softmax)
V2_ROPE = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64,
           "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707,
           "rope_theta": 10000.0}


def write_v2(path: str):
    """A tiny DeepSeek-V2-Lite-like model (softmax greedy routing, scale 1.0, two shared
    experts, no q LoRA) written by transformers' DeepseekV2ForCausalLM."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM
    kw = {k: v for k, v in BASE.items() if k != "head_dim"}
    kw.update(q_lora_rank=None, topk_method="greedy", norm_topk_prob=False, n_group=1,
              topk_group=1, routed_scaling_factor=1.0, n_shared_experts=2)
    torch.manual_seed(0)
    hf = DeepseekV2ForCausalLM(DeepseekV2Config(**kw, rope_parameters=V2_ROPE)).float().eval()
    randomize_norms_and_bias(hf, 0)
    hf.save_pretrained(path, safe_serialization=True)
    return hf


def test_deepseek_v2_checkpoint_loads_and_matches_transformers(tmp_path):
    hf = write_v2(str(tmp_path))
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "scoring_func" not in raw and raw["model_type"] == "deepseek_v2"
    cfg = ModelConfig.from_pretrained(str(tmp_path))
    assert (cfg.scoring_func, cfg.topk_method) == ("softmax", "greedy")  # HF V2's router
    tokens, _ = greedy(llm_for(str(tmp_path)))
    assert tokens == hf_greedy(hf)


def test_deepseek_v2_omitted_keys_take_deepseek_v2_config_defaults():
    from transformers import DeepseekV2Config
    raw = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
           "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "kv_lora_rank": 16,
           "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
           "num_experts_per_tok": 2}
    cfg = ModelConfig.from_dict(raw)
    hf = DeepseekV2Config.from_dict(raw)
    for name in ("n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                 "first_k_dense_replace", "moe_intermediate_size", "topk_method",
                 "max_position_embeddings", "q_lora_rank"):
        assert getattr(cfg, name) == getattr(hf, name), name
    assert cfg.norm_topk_prob is False and cfg.scoring_func == "softmax"
    assert (cfg.n_group, cfg.topk_group) == (1, 1)  # None in transformers: no group limit


# ------------------------------------------------------------------ linear biases
def test_attention_bias_true_is_refused():
    raw = dict(BASE, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
               attention_bias=True)
    with pytest.raises(ConfigError, match="attention_bias"):
        ModelConfig.from_dict(raw)
    assert ModelConfig.from_dict(dict(raw, attention_bias=False)).hidden_size == 64


@pytest.mark.parametrize("name,size", [("model.layers.1.self_attn.o_proj.bias", 64),
                                       ("lm_head.bias", 320)])
def test_a_bias_tensor_the_model_would_drop_is_a_load_error(tmp_path, name, size):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write_hf_checkpoint(src, "kimi", seed=2)
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors[name] = torch.randn(size)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        llm_for(dst)


# ------------------------------------------------------------------ W4A8 piece shapes
@pytest.mark.parametrize("suffix", ["weight", "weight_scale", "weight_scale_2"])
def test_w4a8_wrong_shaped_expert_piece_is_a_checkpoint_error(tmp_path, suffix):
    import quant_writers as qw
    src, q, bad = (str(tmp_path / n) for n in ("src", "q", "bad"))
    qw.make_tiny_hf(src, "kimi", seed=1)
    qw.write_quantized(src, q, "w4a8")
    shutil.copytree(q, bad)
    tensors = load_file(os.path.join(q, "model.safetensors"))
    name = f"model.layers.1.mlp.experts.3.up_proj.{suffix}"
    v = tensors[name]
    tensors[name] = v.reshape(1).repeat(2) if v.dim() == 0 else torch.cat([v, v[:1]])
    save_file(tensors, os.path.join(bad, "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"{name}: shape mismatch"):
        llm_for(bad)


# ------------------------------------------------------------------ generation_config EOS
def test_generation_config_eos_stops_without_a_tokenizer(tmp_path):
    write_hf_checkpoint(str(tmp_path), "kimi", seed=5)
    free, _ = greedy(llm_for(str(tmp_path)), n=8)
    # the first token not seen before it (config.json's eos, 257, must not occur at all)
    k = next(i for i in range(1, 8) if free[i] not in free[:i])
    stop = free[k]
    assert 257 not in free
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [257, stop]}))
    assert ModelConfig.from_pretrained(str(tmp_path)).eos_token_id == (257, stop)
    llm = llm_for(str(tmp_path))
    tokens, reason = greedy(llm, n=8, ignore_eos=False)
    assert (tokens, reason) == (free[:k + 1], "stop")
    # vLLM (SamplingParams.update_from_generation_config): generation_config's EOS ids other
    # than the primary one are stop tokens, so the stop_reason is the id ...
    from atom_stream import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=8)
    assert llm.generate(prompt_token_ids=[PROMPT], sampling_params=params)[0].stop_reason == stop
    # ... while the primary EOS (config.json's / the tokenizer's own) has none
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(json.loads(cfg.read_text()), eos_token_id=stop)))
    out = llm_for(str(tmp_path)).generate(prompt_token_ids=[PROMPT], sampling_params=params)[0]
    assert (out.token_ids, out.finish_reason, out.stop_reason) == (free[:k + 1], "stop", None)


# ------------------------------------------------------------------ unused tensors of served layers
def test_served_layer_tensor_the_config_has_no_place_for_is_a_load_error(tmp_path):
    """config.json says no shared expert, the checkpoint has them: this served wrong tokens
    (the tensors were dropped with a warning)."""
    write_hf_checkpoint(str(tmp_path), "kimi", seed=6)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), n_shared_experts=0)))
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.shared_experts\..*no place"):
        llm_for(str(tmp_path))


def test_extra_attribute_of_a_module_the_model_has_only_warns(tmp_path, caplog):
    """An unused extra tensor of a module the model has (an activation input_scale a converter
    left beside a bf16 weight) is logged, not refused: the module's weights all loaded."""
    hf = write_hf_checkpoint(str(tmp_path), "kimi", seed=6)
    f = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(f)
    tensors["model.layers.1.self_attn.o_proj.input_scale"] = torch.ones(1)
    save_file(tensors, f, metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="atom_stream.loader"):
        llm = llm_for(str(tmp_path))
    assert "o_proj.input_scale" in caplog.text
    assert greedy(llm)[0] == hf_greedy(hf)
