"""Model / checkpoint / CPU tensor-parallel review (session 24): each test reproduces one gap
with vLLM or transformers that was found and fixed, plus parity pins for config variants the
earlier parity tests did not cover.

- A vocab the TP ranks do not divide (e.g. 321 at TP=2) was refused by every rank after it
  started; vLLM pads its vocab-parallel embedding / lm_head. Now each rank holds ceil(V/tp)
  rows (zero past V) and the padding's logits are dropped after the gather.
- A tensor_parallel_size that does not divide the heads (or the MLP widths) failed on every
  spawned rank after its start-up (seconds per rank); now one ConfigError before any spawn.
- A shard named in the index but absent on disk was refused even when it held only tensors
  the served model skips (a dropped MTP shard); vLLM loads the shards it finds. A missing shard
  with a served tensor is still one error, naming the shard and the tensor.
- transformers-5's native Kimi_K25 layout (`model.language_model.*`) was not mapped.
- transformers writes empty [0, H] shared-expert tensors for n_shared_experts 0: refused as
  tensors "with no place in the model".
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from hf_checkpoints import BASE, randomize_norms_and_bias
from safetensors.torch import load_file, save_file

from atom_stream.config import ConfigError, ModelConfig
from atom_stream.loader import CheckpointError, init_dummy_weights, load_checkpoint
from atom_stream.models import MODEL_REGISTRY

PROMPT = torch.randint(0, 320, (11,), generator=torch.Generator().manual_seed(24)).tolist()
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}


def make_hf(path: str, seed: int = 0, mlp_dense: tuple[int, ...] = (), **over):
    """save_pretrained a tiny random DeepseekV3 (BASE + overrides; `rope_parameters` may be
    given); `mlp_dense`: layers whose MoE is swapped for a dense MLP (moe_layer_freq tests).
    Returns the float32 HF model."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MLP

    kw = dict(BASE, **over)
    rope = kw.pop("rope_parameters", DEFAULT_ROPE)
    cfg = DeepseekV3Config(**kw, rope_parameters=rope)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    for i in mlp_dense:
        model.model.layers[i].mlp = DeepseekV3MLP(cfg)
        for p in model.model.layers[i].mlp.parameters():
            torch.nn.init.normal_(p, std=0.08)
    model.set_experts_implementation("eager")
    randomize_norms_and_bias(model, seed, 0.3)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return model


def build(path: str, dummy: bool = False):
    cfg = ModelConfig.from_pretrained(path)
    model = MODEL_REGISTRY[cfg.architecture](cfg, 128, torch.float32)
    if dummy:
        init_dummy_weights(model, seed=3)
    else:
        load_checkpoint(model, path, cfg.num_hidden_layers, cfg.tie_word_embeddings)
    model.process_weights_after_loading()
    return cfg, model


def greedy(path: str, n: int = 10, dummy: bool = False) -> list[int]:
    from test_model_parity import PagedSeq

    cfg, model = build(path, dummy)
    seq = PagedSeq(cfg)
    pos, md = seq.step_md(len(PROMPT), decode=False)
    logits = model.compute_logits(model(torch.tensor(PROMPT), pos, seq.caches, md)[-1:])
    assert logits.shape == (1, cfg.vocab_size)
    toks = [int(logits.argmax(-1))]
    for _ in range(n - 1):
        pos, md = seq.step_md(1, decode=True)
        h = model(torch.tensor(toks[-1:]), pos, seq.caches, md)
        toks.append(int(model.compute_logits(h).argmax(-1)))
    return toks


def hf_greedy(hf, n: int = 10) -> list[int]:
    p = torch.tensor([PROMPT])
    with torch.no_grad():
        out = hf.double().generate(p, attention_mask=torch.ones_like(p), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)
    return out[0, p.shape[1]:].tolist()


# ------------------------------------------------------------------ TP: padded vocab
def _tp_worker(rank: int, world: int, init: str, jobs: list, out: str) -> None:
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from atom_stream.layers.parallel import TPInfo, tp_context
    try:
        with tp_context(TPInfo(rank, world)):
            torch.save([greedy(path, dummy=dummy) for path, dummy in jobs], f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def test_tp2_pads_a_vocab_the_ranks_do_not_divide(tmp_path):
    """vocab 321 (untied, 2 layers) and 323 (tied, q_lora_rank null): TP=2 gives TP=1's greedy
    tokens, which are transformers'; dummy weights too (the same model at every TP size)."""
    odd, tied = str(tmp_path / "odd"), str(tmp_path / "tied")
    hf_odd = make_hf(odd, 1, vocab_size=321, num_hidden_layers=2)
    make_hf(tied, 2, vocab_size=323, num_hidden_layers=2, tie_word_embeddings=True,
            q_lora_rank=None)
    jobs = [(odd, False), (tied, False), (odd, True)]
    want = [greedy(p, dummy=d) for p, d in jobs]
    assert want[0] == hf_greedy(hf_odd)
    tmp = tempfile.mkdtemp()
    mp.start_processes(_tp_worker, args=(2, f"file://{tmp}/rdzv", jobs, f"{tmp}/out"),
                       nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        assert torch.load(f"{tmp}/out.{rank}") == want, f"rank {rank}"


def test_padded_vocab_shard_loads_only_the_rows_it_has():
    """The loader's slice of a padded dim: the last rank's rows past V are zero."""
    from atom_stream.layers.linear import VocabEmbedding
    from atom_stream.layers.parallel import TPInfo, tp_context
    from atom_stream.loader import WeightLoader

    full = torch.randn(7, 3)
    for rank, rows in ((0, full[:4]), (1, torch.cat([full[4:], torch.zeros(1, 3)]))):
        with tp_context(TPInfo(rank, 2)):
            emb = VocabEmbedding(7, 3, dtype=torch.float32)
        emb.weight.data.fill_(float("nan"))
        loader = WeightLoader(emb, 0, TPInfo(rank, 2))
        loader._copy("weight", full, (), "embed_tokens.weight")
        assert torch.equal(emb.weight.data, rows)
    with pytest.raises(CheckpointError, match=r"expects \(7, 3\)"):
        loader._copy("weight", torch.randn(8, 3), (), "embed_tokens.weight")


# ------------------------------------------------------------------ TP: bad sizes, before spawn
def _config_only(path, **over) -> str:
    os.makedirs(path, exist_ok=True)
    raw = dict(BASE, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", **over)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    return str(path)


@pytest.mark.parametrize("tp,over,what", [
    (3, {}, r"num_attention_heads \(4\) is not divisible by 3"),
    (4, {"moe_intermediate_size": 30}, r"moe_intermediate_size \(30\)"),
    (2, {"intermediate_size": 95}, r"intermediate_size \(95\)"),
])
def test_bad_tp_size_is_one_config_error_before_any_rank_starts(tmp_path, monkeypatch, tp,
                                                                over, what):
    import atom_stream.engine.distributed as dist
    from atom_stream import LLM

    def no_spawn(*a, **k):
        raise AssertionError("a rank was spawned")

    monkeypatch.setattr(dist, "LocalWorkers", no_spawn)
    path = _config_only(tmp_path, **over)
    with pytest.raises(ConfigError, match=f"tensor_parallel_size: {what}"):
        LLM(model=path, device="cpu", dtype="float32", skip_tokenizer_init=True,
            load_format="dummy", num_kv_blocks=16, block_size=4, max_model_len=32,
            tensor_parallel_size=tp)


def test_tp_shape_check_accepts_what_the_layers_accept():
    from atom_stream.engine.distributed import check_tp_shapes

    cfg = ModelConfig.from_dict(dict(BASE, vocab_size=321, intermediate_size=95,
                                     first_k_dense_replace=0))
    check_tp_shapes(cfg, 4, False)  # no dense layer: intermediate_size unused; vocab padded
    ep = ModelConfig.from_dict(dict(BASE, moe_intermediate_size=30, n_shared_experts=2))
    check_tp_shapes(ep, 4, True)  # expert parallel: experts split, not their width
    with pytest.raises(ConfigError, match=r"moe_intermediate_size \(30\)"):
        check_tp_shapes(ep, 4, False)
    with pytest.raises(ConfigError, match=r"n_routed_experts \(8\)"):
        check_tp_shapes(ModelConfig.from_dict(dict(BASE, num_attention_heads=16)), 16, True)


# ------------------------------------------------------------------ shards
def _sharded(src: str, dst: str, extra: dict[str, torch.Tensor]) -> None:
    """src re-saved as two shards + an index; `extra` tensors go into a third shard."""
    shutil.copytree(src, dst)
    os.remove(os.path.join(dst, "model.safetensors"))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    parts = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for fname, keys in parts.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(dst, fname))
        weight_map.update(dict.fromkeys(keys, fname))
    save_file(extra, os.path.join(dst, "c.safetensors"))
    weight_map.update(dict.fromkeys(extra, "c.safetensors"))
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_missing_shard_with_only_skipped_tensors_loads(tmp_path, caplog):
    src = str(tmp_path / "src")
    make_hf(src, 3, num_hidden_layers=2)
    dst = str(tmp_path / "dst")
    _sharded(src, dst, {"model.layers.2.eh_proj.weight": torch.randn(64, 128),
                        "vision_tower.patch_embed.proj.weight": torch.randn(8, 2)})
    want = greedy(dst)
    os.remove(os.path.join(dst, "c.safetensors"))  # the MTP / vision shard, never read
    with caplog.at_level("WARNING", logger="atom_stream.loader"):
        assert greedy(dst) == want
    assert "c.safetensors" in caplog.text
    os.remove(os.path.join(dst, "b.safetensors"))  # holds served tensors: one clear error
    with pytest.raises(CheckpointError, match=r"shard 'b\.safetensors' .*missing.*model\."):
        build(dst)


# ------------------------------------------------------------------ layouts / tensors
def test_transformers_native_kimi_k25_tensor_names_load(tmp_path):
    """transformers-5 Kimi_K25ForConditionalGeneration (save_original_format=False) writes
    model.language_model.{layers,embed_tokens,norm}.*, lm_head.*, model.vision_tower.*."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    make_hf(src, 4, num_hidden_layers=2)
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    renamed = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
               for k, v in tensors.items()}
    renamed["model.vision_tower.patch_embed.proj.weight"] = torch.randn(8, 3)
    renamed["model.mm_projector.in_proj.weight"] = torch.randn(8, 8)
    save_file(renamed, os.path.join(dst, "model.safetensors"))
    assert greedy(dst) == greedy(src)
    assert MODEL_REGISTRY["Kimi_K25ForConditionalGeneration"] is MODEL_REGISTRY[
        "KimiK25ForConditionalGeneration"]


def test_n_shared_experts_0_checkpoint_with_empty_tensors_matches_transformers(tmp_path):
    hf = make_hf(str(tmp_path), 5, num_hidden_layers=2, n_shared_experts=0)
    assert load_file(str(tmp_path / "model.safetensors"))[
        "model.layers.1.mlp.shared_experts.up_proj.weight"].shape == (0, 64)
    assert greedy(str(tmp_path)) == hf_greedy(hf)


# ------------------------------------------------------------------ parity pins (no fix needed)
YARN = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 32,
        "beta_fast": 32.0, "beta_slow": 1.0, "rope_theta": 10000.0}
PINS = {
    # cos/sin multiplier mscale(f, 0.9) / mscale(f, 0.6) != 1, softmax scale with 0.6
    "mscale_ratio": {"rope_parameters": dict(YARN, mscale=0.9, mscale_all_dim=0.6)},
    # every layer MoE, tied embeddings, 8 groups of 2 keep 3, plain top-k weights (scale 1)
    "fkd0_tied_groups": {"first_k_dense_replace": 0, "num_hidden_layers": 2,
                         "tie_word_embeddings": True, "n_routed_experts": 16, "n_group": 8,
                         "topk_group": 3, "num_experts_per_tok": 4, "norm_topk_prob": False,
                         "routed_scaling_factor": 1.0},
}


@pytest.mark.parametrize("name", sorted(PINS))
def test_config_variant_prefill_logits_match_transformers(tmp_path, name):
    from test_model_parity import prefill_logits

    hf = make_hf(str(tmp_path), 6, **PINS[name]).double()
    cfg, model = build(str(tmp_path))
    ids = torch.randint(0, cfg.vocab_size, (33,), generator=torch.Generator().manual_seed(6))
    logits, ref = prefill_logits(model, hf, cfg, ids)
    assert ((logits.double() - ref).norm() / ref.norm()).item() < 1e-5


def test_moe_layer_freq_2_places_moe_on_even_layers(tmp_path):
    """moe_layer_freq (DeepSeek's remote code and vLLM: MoE where layer % freq == 0 past
    first_k_dense_replace; transformers' V3 ignores it): layers 1 and 3 dense."""
    hf = make_hf(str(tmp_path), 7, mlp_dense=(1, 3), num_hidden_layers=4)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), moe_layer_freq=2)))
    assert greedy(str(tmp_path)) == hf_greedy(hf)


# ------------------------------------------------------------------ DeepSeek-V2 routing
def _v2_router(topk_method: str, n_group: int, topk_group: int):
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    kw = {k: v for k, v in BASE.items() if k != "head_dim"}
    kw.update(n_routed_experts=16, num_experts_per_tok=3, routed_scaling_factor=16.0,
              norm_topk_prob=False,
              topk_method=topk_method, n_group=n_group, topk_group=topk_group)
    router = DeepseekV2TopkRouter(DeepseekV2Config(**kw))
    torch.nn.init.normal_(router.weight, std=0.3, generator=torch.Generator().manual_seed(9))
    return router, kw


@pytest.mark.parametrize("topk_method", ["group_limited_greedy", "greedy"])
def test_deepseek_v2_routing_matches_transformers_router(topk_method):
    """DeepSeek-V2 / V2.5 (236B): group_limited_greedy ranks a group by its best softmax
    score (V3 sums the top two); "greedy" ignores n_group (route took the group limit)."""
    from atom_stream.models.deepseek_v3 import MoE

    hf, kw = _v2_router(topk_method, 4, 2)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(1))
    _, w_ref, ids_ref = hf(x)
    cfg = ModelConfig.from_dict(dict(kw, architectures=["DeepseekV2ForCausalLM"],
                                     model_type="deepseek_v2", topk_method="greedy"))
    # config.py's validation decides which methods it admits; the model follows any of them
    cfg = dataclasses.replace(cfg, topk_method=topk_method)
    moe = MoE(cfg, torch.float32)
    moe.gate.weight.data.copy_(hf.weight)
    seen = []
    moe.experts.forward = lambda x, w, ids: seen.append((w, ids)) or torch.zeros_like(x)
    moe.shared_experts = None
    moe(x)
    (w, ids), = seen
    order_ref, order = ids_ref.sort(-1)[1], ids.sort(-1)[1]
    assert torch.equal(ids_ref.gather(1, order_ref), ids.gather(1, order))
    torch.testing.assert_close(w_ref.gather(1, order_ref), w.gather(1, order))
