"""Checkpoint loading: the Kimi-K2.5 layout, sharded index, MTP skip, and one clear error for each
bad checkpoint (missing tensor, shape mismatch, unsupported architecture, corrupt file)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from atom_stream.config import ConfigError, ModelConfig
from atom_stream.loader import CheckpointError, load_checkpoint
from atom_stream.models import MODEL_REGISTRY
from hf_checkpoints import write_hf_checkpoint


@pytest.fixture(scope="module")
def hf_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("kimi_flat"))
    hf = write_hf_checkpoint(path, "kimi", seed=3)
    return path, hf


def build(path: str):
    cfg = ModelConfig.from_pretrained(path)
    model = MODEL_REGISTRY[cfg.architecture](cfg, 256, torch.float32)
    load_checkpoint(model, path, cfg.num_hidden_layers, cfg.tie_word_embeddings)
    model.process_weights_after_loading()
    return cfg, model


def write_kimi_layout(src: str, dst: str) -> None:
    """Re-save a flat HF checkpoint as Kimi-K2.5 does: nested text_config (model_type kimi_k2),
    `language_model.` prefix, vision tower + projector tensors, two shards with an index."""
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        text = json.load(f)
    text["model_type"] = "kimi_k2"
    text["architectures"] = ["DeepseekV3ForCausalLM"]
    top = {
        "architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
        "auto_map": {"AutoConfig": "configuration_kimi_k25.KimiK25Config"},
        "text_config": text, "vision_config": {"hidden_size": 8},
        "bos_token_id": 256, "eos_token_id": 257, "tie_word_embeddings": False,
    }
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(top, f)
    tensors = {f"language_model.{k}": v for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    tensors["vision_tower.encoder.blocks.0.wqkv.weight"] = torch.randn(24, 8)
    tensors["vision_tower.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 2)
    tensors["mm_projector.proj.0.weight"] = torch.randn(8, 8)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half],
              "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, os.path.join(dst, fname))
        weight_map.update({k: fname for k in keys})
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def greedy(model, cfg, prompt, n=16):
    from test_model_parity import PagedSeq
    seq = PagedSeq(cfg)
    pos, md = seq.step_md(len(prompt), decode=False)
    h = model(prompt, pos, seq.caches, md)
    toks = [int(model.compute_logits(h[-1:]).argmax(-1))]
    for _ in range(n - 1):
        pos, md = seq.step_md(1, decode=True)
        toks.append(int(model.compute_logits(model(torch.tensor(toks[-1:]), pos, seq.caches, md)).argmax(-1)))
    return toks


def test_kimi_k25_layout_loads_and_gives_same_tokens(hf_ckpt, tmp_path, monkeypatch):
    src, _ = hf_ckpt
    dst = str(tmp_path / "kimi")
    write_kimi_layout(src, dst)
    read: list[str] = []
    import safetensors
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.h = real_open(*a, **k)

        def keys(self):
            return self.h.keys()

        def get_slice(self, k):
            return self.h.get_slice(k)

        def get_tensor(self, k):
            read.append(k)
            return self.h.get_tensor(k)

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    cfg_k, model_k = build(dst)
    assert cfg_k.architecture == "KimiK25ForConditionalGeneration"
    assert not any(k.startswith(("vision_tower.", "mm_projector.")) for k in read)
    monkeypatch.undo()
    cfg_f, model_f = build(src)
    prompt = torch.randint(0, cfg_f.vocab_size, (11,))
    assert greedy(model_k, cfg_k, prompt) == greedy(model_f, cfg_f, prompt)


def test_mtp_layer_is_ignored(hf_ckpt, tmp_path):
    src, _ = hf_ckpt
    dst = tmp_path / "mtp"
    dst.mkdir()
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["num_nextn_predict_layers"] = 1
    json.dump(cfg, open(dst / "config.json", "w"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    n = cfg["num_hidden_layers"]
    tensors[f"model.layers.{n}.eh_proj.weight"] = torch.randn(64, 128)
    tensors[f"model.layers.{n}.self_attn.q_a_proj.weight"] = torch.randn(7, 7)  # wrong shape too
    save_file(tensors, str(dst / "model.safetensors"))
    c, _ = build(str(dst))
    assert c.num_hidden_layers == n


def _copy_ckpt(src, dst, mutate):
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    mutate(cfg, tensors)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(tensors, os.path.join(dst, "model.safetensors"))


def test_missing_tensor_is_one_clear_error(hf_ckpt, tmp_path):
    src, _ = hf_ckpt
    victim = "model.layers.1.mlp.experts.3.up_proj.weight"
    _copy_ckpt(src, str(tmp_path), lambda c, t: t.pop(victim))
    with pytest.raises(CheckpointError, match=r"missing tensor .*experts\.3\.up_proj"):
        build(str(tmp_path))


def test_shape_mismatch_is_one_clear_error(hf_ckpt, tmp_path):
    src, _ = hf_ckpt
    name = "model.layers.0.self_attn.kv_b_proj.weight"
    _copy_ckpt(src, str(tmp_path), lambda c, t: t.__setitem__(name, torch.randn(3, 5)))
    with pytest.raises(CheckpointError, match=r"kv_b_proj.*shape mismatch"):
        build(str(tmp_path))


def test_unsupported_architecture_is_one_clear_error(hf_ckpt, tmp_path):
    src, _ = hf_ckpt

    def mutate(c, t):
        c["architectures"] = ["LlamaForCausalLM"]
        c["model_type"] = "llama"

    _copy_ckpt(src, str(tmp_path), mutate)
    with pytest.raises(ConfigError, match="unsupported architecture 'LlamaForCausalLM'"):
        build(str(tmp_path))


def test_corrupt_file_is_one_clear_error(hf_ckpt, tmp_path):
    src, _ = hf_ckpt
    _copy_ckpt(src, str(tmp_path), lambda c, t: None)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\xff" * 16 + data[16:])  # garbage header length / JSON
    with pytest.raises(CheckpointError, match="model.safetensors"):
        build(str(tmp_path))


def test_truncated_file_is_one_clear_error(hf_ckpt, tmp_path):
    src, _ = hf_ckpt
    _copy_ckpt(src, str(tmp_path), lambda c, t: None)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        build(str(tmp_path))


def test_no_weights_is_one_clear_error(hf_ckpt, tmp_path):
    src, _ = hf_ckpt
    (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        build(str(tmp_path))


def build_served(path: str):
    """As the model runner loads: MTP layers from config.json skipped, other extras reported."""
    cfg = ModelConfig.from_pretrained(path)
    model = MODEL_REGISTRY[cfg.architecture](cfg, 256, torch.float32)
    load_checkpoint(model, path, cfg.num_hidden_layers, cfg.tie_word_embeddings,
                    mtp_layers=cfg.num_nextn_predict_layers)
    return cfg, model


@pytest.mark.parametrize("bad", ["int32", "bool", "fp8"])
def test_a_non_float_tensor_for_real_values_is_an_error(hf_ckpt, tmp_path, bad):
    # an int/bool tensor, or fp8 weights under a config without quantization_config, used to
    # be cast silently (garbage out)
    src, _ = hf_ckpt
    name = "model.layers.0.self_attn.o_proj.weight"

    def mutate(c, t):
        w = t[name]
        t[name] = {"int32": (w * 100).to(torch.int32), "bool": w > 0,
                   "fp8": w.to(torch.float8_e4m3fn)}[bad]

    _copy_ckpt(src, str(tmp_path), mutate)
    match = "quantization_config" if bad == "fp8" else "o_proj.weight: checkpoint tensor is"
    with pytest.raises(CheckpointError, match=match):
        build(str(tmp_path))


def test_a_tensor_in_two_shards_is_an_error(hf_ckpt, tmp_path):
    src, _ = hf_ckpt
    tensors = load_file(os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    save_file(tensors, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"model.norm.weight": torch.zeros_like(tensors["model.norm.weight"])},
              str(tmp_path / "model-00002-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.norm.weight.*in both "
                                              r"model-00001-of-00002.*model-00002-of-00002"):
        build(str(tmp_path))


def test_tp_checks_the_whole_shape_before_slicing():
    # a row too many along the split dimension used to be rounded away at TP > 1
    from atom_stream.layers.parallel import TPInfo
    from atom_stream.loader import WeightLoader
    m = torch.nn.Module()
    m.w = torch.nn.Parameter(torch.zeros(3, 4), requires_grad=False)
    m.w.tp_dim = 0
    loader = WeightLoader(m, 1, tp_info=TPInfo(rank=1, size=2))
    with pytest.raises(CheckpointError, match=r"\(7, 4\).*\(6, 4\).*split 2 ways"):
        loader._copy("w", torch.randn(7, 4), src="w")
    full = torch.randn(6, 4)
    loader._copy("w", full, src="w")
    assert torch.equal(m.w, full[3:])


def test_extra_layers_past_the_mtp_layers_are_reported(hf_ckpt, tmp_path, caplog):
    src, _ = hf_ckpt
    with open(os.path.join(src, "config.json")) as f:
        n = json.load(f)["num_hidden_layers"]

    def mutate(c, t):
        c["num_nextn_predict_layers"] = 1
        t[f"model.layers.{n}.eh_proj.weight"] = torch.randn(4, 4)  # the MTP layer: quiet
        t[f"model.layers.{n + 1}.eh_proj.weight"] = torch.randn(4, 4)  # past it: reported

    _copy_ckpt(src, str(tmp_path), mutate)
    with caplog.at_level("WARNING", logger="atom_stream.loader"):
        build_served(str(tmp_path))
    (msg,) = [r.getMessage() for r in caplog.records]
    assert f"model.layers.{n + 1}.eh_proj.weight" in msg and f"layers.{n}." not in msg


@pytest.mark.parametrize("field,value,match", [
    ("hidden_size", "abc", "malformed field"), ("num_attention_heads", 0, "num_attention_heads"),
    ("num_hidden_layers", 0, "num_hidden_layers"), ("topk_method", "noaux_tc_typo",
                                                    "topk_method"),
    ("quantization_config", "fp8", "quantization_config"), ("q_lora_rank", "32", "q_lora_rank"),
    ("max_position_embeddings", 0, "max_position_embeddings")])
def test_malformed_config_fields_are_config_errors(hf_ckpt, tmp_path, field, value, match):
    src, _ = hf_ckpt
    _copy_ckpt(src, str(tmp_path), lambda c, t: c.__setitem__(field, value))
    with pytest.raises(ConfigError, match=match):
        build(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_a_model_path_that_is_a_file_is_an_error(hf_ckpt):
    from atom_stream import LLM
    src, _ = hf_ckpt
    with pytest.raises(ConfigError, match="is a file; give the checkpoint directory"):
        LLM(os.path.join(src, "config.json"), device="cpu", dtype="float32", num_kv_blocks=16)
