"""Tiny random DeepseekV3 checkpoints written with transformers' save_pretrained (test helpers).

Three flavours cover the routing/rope variants the parity tests need:
- "kimi": n_group 1, YaRN factor 64, beta_fast 32 (Kimi-K2.5-like), rms eps 1e-5.
- "deepseek": n_group 4, topk_group 2, first_k_dense_replace 2, YaRN factor 40.
- "bias": non-zero correction bias, norm_topk_prob false, q_lora_rank null.
Norms and correction biases are randomized (HF's init leaves them trivial).
"""

from __future__ import annotations

import os

import torch

BASE = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32,
    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, head_dim=8,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
    n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.827,
    max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
    bos_token_id=256, eos_token_id=257, attention_bias=False, initializer_range=0.08,
)

FLAVOURS = {
    "kimi": dict(rope_scaling=dict(rope_type="yarn", factor=64.0,
                                   original_max_position_embeddings=64, beta_fast=32.0,
                                   beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                 rope_theta=50000.0),
    "deepseek": dict(n_group=4, topk_group=2, first_k_dense_replace=2, num_hidden_layers=4,
                     num_experts_per_tok=3, rms_norm_eps=1e-6, routed_scaling_factor=2.5,
                     rope_scaling=dict(rope_type="yarn", factor=40.0,
                                       original_max_position_embeddings=64, beta_fast=32.0,
                                       beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                     rope_theta=10000.0),
    "bias": dict(norm_topk_prob=False, q_lora_rank=None, n_group=2, topk_group=1,
                 rope_scaling=dict(rope_type="yarn", factor=8.0,
                                   original_max_position_embeddings=128, beta_fast=32.0,
                                   beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
                 rope_theta=10000.0),
}


def make_hf_model(flavour: str, seed: int = 0):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = dict(BASE)
    kw.update(FLAVOURS[flavour])
    rope = kw.pop("rope_scaling")
    theta = kw.pop("rope_theta")
    rope = dict(rope, rope_theta=theta)
    cfg = DeepseekV3Config(**kw, rope_parameters=rope)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    model.set_experts_implementation("eager")
    randomize_norms_and_bias(model, seed, 0.5 if flavour == "bias" else 0.1)
    return model


def randomize_norms_and_bias(model, seed: int, bias_scale: float = 0.1) -> None:
    """HF's init leaves the RMSNorm weights at 1 and the routing correction bias at 0: give
    them random values (generator seeded seed + 1; norms first, then the biases)."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(bias_scale * torch.randn(b.shape, generator=g))


def write_hf_checkpoint(path: str, flavour: str, seed: int = 0):
    """save_pretrained a tiny random model; returns the in-memory HF model (float32)."""
    model = make_hf_model(flavour, seed)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    return model
