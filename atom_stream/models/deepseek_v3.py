"""DeepseekV3 (Kimi-K2/K2.5, DeepSeek-V3/R1, Moonlight): the model, top to bottom.

Math follows ../shared/reference/model_spec.md §3. One forward runs a flattened step of T tokens
(decodes first, then prefill chunks; see layers/attention.AttentionMetadata):

    x = embed(ids)
    for each layer: h = x + MLA(RMSNorm(x)); x = h + FFN(RMSNorm(h))    (FFN: dense or MoE)
    logits = lm_head(RMSNorm(x))       (only for the rows the runner samples)

MLA keeps one latent cache entry per token, [c | k_pe] (kv_lora_rank + rope dims). Decode tokens
use the absorbed path (q folded through W_UK, attention over the latent, out through W_UV);
prefill chunks use the naive path (K/V expanded through kv_b_proj), with the cached prefix read
back from the latent cache. Both paths use softmax_scale = qk_head_dim^-0.5 * mscale^2.
Parameter names equal the HF checkpoint names, except routed experts, which are stacked
expert-major in `mlp.experts.w13` [E, 2I, H] and `mlp.experts.w2` [E, H, I].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atom_stream.config import ModelConfig
from atom_stream.layers.attention import (
    AttentionMetadata, gather_kv, mla_decode_ref, mla_prefill_ref, store_kv,
)
from atom_stream.layers.linear import Linear, VocabEmbedding, dense_weight
from atom_stream.layers.moe import experts_dense_ref, experts_ref, route
from atom_stream.layers.norm import RMSNorm
from atom_stream.layers.parallel import all_gather_last, all_reduce, local_topk, tp
from atom_stream.layers.rotary import RotaryEmbedding

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: HF builds them without eps (pitfall 1)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype, device=None):
        super().__init__()
        self.cfg = cfg
        self.num_heads = tp().shard(cfg.num_attention_heads, "num_attention_heads")
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.r = cfg.kv_lora_rank
        self.scale = cfg.softmax_scale
        H, qk = cfg.num_attention_heads, cfg.qk_head_dim  # global heads; linears shard them
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, dtype=dtype, device=device)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, dtype, device)
            self.q_b_proj = Linear(cfg.q_lora_rank, H * qk, dtype=dtype, device=device,
                                   parallel="column")
        else:
            self.q_proj = Linear(cfg.hidden_size, H * qk, dtype=dtype, device=device,
                                 parallel="column")
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, self.r + self.rope, dtype=dtype,
                                         device=device)
        self.kv_a_layernorm = RMSNorm(self.r, LATENT_NORM_EPS, dtype, device)
        self.kv_b_proj = Linear(self.r, H * (self.nope + self.v_dim), dtype=dtype, device=device,
                                parallel="column")
        self.o_proj = Linear(H * self.v_dim, cfg.hidden_size, dtype=dtype, device=device,
                             parallel="row")
        self.rotary = rotary
        self.k_scale = 1.0  # fp8 KV cache scale (checkpoint k_scale when present)
        # Triton kernels need power-of-two latent/rope widths >= 16 (512/64 in real models)
        self.use_kernels = all(d >= 16 and d & (d - 1) == 0 for d in (self.r, self.rope))
        self.w_uk: torch.Tensor | None = None  # [H, nope, r]
        self.w_uv: torch.Tensor | None = None  # [H, v, r]

    def process_weights_after_loading(self) -> None:
        """Split kv_b_proj into the absorbed W_UK / W_UV views (kept in the model dtype)."""
        w = dense_weight(self.kv_b_proj).view(self.num_heads, self.nope + self.v_dim, self.r)
        self.w_uk = w[:, : self.nope].contiguous()
        self.w_uv = w[:, self.nope:].contiguous()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        T = x.shape[0]
        H = self.num_heads
        if self.cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q = q.view(T, H, self.nope + self.rope)
        q_nope, q_pe = q[..., : self.nope], q[..., self.nope:]
        kv = self.kv_a_proj_with_mqa(x)
        c = self.kv_a_layernorm(kv[:, : self.r])
        q_pe = self.rotary(positions, q_pe)
        k_pe = self.rotary(positions, kv[:, None, self.r:]).squeeze(1)
        if self.use_kernels and x.is_cuda:
            from atom_stream.kernels.kv_store import kv_store
            kv_store(kv_cache, md.slot_mapping, c, k_pe, self.k_scale, rope_dim=self.rope)
        else:
            store_kv(kv_cache, md.slot_mapping, torch.cat([c, k_pe], dim=-1), self.k_scale)

        out = torch.empty(T, H, self.v_dim, dtype=x.dtype, device=x.device)
        nd = md.num_decodes
        if nd:
            q_lat = torch.einsum("thn,hnr->thr", q_nope[:nd], self.w_uk)
            seq_lens = md.decode_seq_lens
            if seq_lens is None:
                seq_lens = torch.tensor(md.seq_lens[:nd], dtype=torch.int32, device=x.device)
            o_lat = self._decode(q_lat, q_pe[:nd], kv_cache, md.block_tables[:nd], seq_lens)
            out[:nd] = torch.einsum("thr,hvr->thv", o_lat.to(x.dtype), self.w_uv)
        for i in range(nd, md.num_seqs):
            s, e = md.query_start_loc[i], md.query_start_loc[i + 1]
            out[s:e] = self._prefill_one(q_nope[s:e], q_pe[s:e], c[s:e], k_pe[s:e],
                                         kv_cache, md.block_tables[i], md.seq_lens[i])
        return self.o_proj(out.reshape(T, H * self.v_dim))

    def _decode(self, q_lat, q_pe, kv_cache, block_tables, seq_lens):
        """Absorbed decode over the paged cache: the Triton kernel on GPUs (split-KV, graph-
        capturable), the torch reference elsewhere (static length on GPUs so graphs capture)."""
        if self.use_kernels and q_lat.is_cuda:
            from atom_stream.kernels.mla_decode import mla_decode
            return mla_decode(q_lat, q_pe, kv_cache, block_tables, seq_lens, self.scale,
                              self.k_scale, rope_dim=self.rope)
        return mla_decode_ref(q_lat, q_pe, kv_cache, block_tables, seq_lens, self.r, self.scale,
                              self.k_scale, static_len=q_lat.is_cuda)

    def _prefill_one(self, q_nope, q_pe, c_new, k_pe_new, kv_cache, block_table, seq_len):
        """Naive path for one chunk: queries are the last q_len of seq_len positions."""
        q_len = q_nope.shape[0]
        prefix = seq_len - q_len
        if prefix:
            cached = gather_kv(kv_cache, block_table, prefix, c_new.dtype, self.k_scale)
            c_all = torch.cat([cached[:, : self.r], c_new])
            k_pe_all = torch.cat([cached[:, self.r:], k_pe_new])
        else:
            c_all, k_pe_all = c_new, k_pe_new
        kv = F.linear(c_all, dense_weight(self.kv_b_proj))
        kv = kv.view(seq_len, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv[..., : self.nope], kv[..., self.nope:]
        k = torch.cat([k_nope, k_pe_all[:, None, :].expand(-1, self.num_heads, -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        return mla_prefill_ref(q, k, v, self.scale)


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Dense layers and shared experts; the
    intermediate dim is split over TP ranks (`reduce=False` leaves the sum to the caller)."""

    def __init__(self, hidden: int, inter: int, dtype, device=None, reduce: bool = True):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, dtype=dtype, device=device, parallel="column")
        self.up_proj = Linear(hidden, inter, dtype=dtype, device=device, parallel="column")
        self.down_proj = Linear(inter, hidden, dtype=dtype, device=device, parallel="row",
                                reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """`mlp.gate`: weight [E, H] and e_score_correction_bias [E], both kept in float32."""

    def __init__(self, cfg: ModelConfig, device=None):
        super().__init__()
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=torch.float32,
                                               device=device), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(E, dtype=torch.float32, device=device), requires_grad=False)


class Experts(nn.Module):
    """Routed experts stacked expert-major: w13 [E, 2I, H], w2 [E, H, I], where I is this TP
    rank's share of moe_intermediate_size (`tp_dim` is the dim of the per-expert checkpoint
    tensor the loader narrows: rows of gate/up [I, H], columns of down [H, I]).

    Expert parallel (layers/parallel.py): E is this rank's `num_local_experts` (global ids
    [expert_start, expert_start + E)) and I the full moe_intermediate_size (no tp_dim)."""

    def __init__(self, cfg: ModelConfig, dtype, device=None):
        super().__init__()
        E, H = cfg.n_routed_experts, cfg.hidden_size
        info = tp()
        # EP: local experts at the full intermediate size; else all experts, intermediate split
        self.expert_start, self.num_local_experts = info.expert_range(E)
        inter = info.moe_tp.shard(cfg.moe_intermediate_size, "moe_intermediate_size")
        self.num_experts, self.hidden, self.inter = E, H, inter  # num_experts: global count
        n = self.num_local_experts
        self.w13 = nn.Parameter(torch.empty(n, 2 * inter, H, dtype=dtype, device=device),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(n, H, inter, dtype=dtype, device=device),
                               requires_grad=False)
        self.w13.tp_dim, self.w2.tp_dim = (0, 1) if info.ep_size == 1 else (None, None)
        self.quant_method = None

    def forward(self, x, topk_weights, topk_ids):
        if self.num_local_experts != self.num_experts:  # EP dispatch: global -> local ids
            topk_weights, topk_ids = local_topk(topk_weights, topk_ids, self.expert_start,
                                                self.num_local_experts)
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, topk_weights, topk_ids)
        if x.is_cuda:
            fused = _fused_moe()
            if fused is not None:
                try:
                    return fused(x, self.w13, self.w2, topk_weights, topk_ids)
                except (ValueError, NotImplementedError):
                    pass  # shapes the kernel's tiles do not divide (tiny test models)
            return experts_dense_ref(x, self.w13, self.w2, topk_weights, topk_ids)
        return experts_ref(x, self.w13, self.w2, topk_weights, topk_ids)


def _fused_moe():
    """The Triton fused MoE (kernels/fused_moe.py) when present, else None."""
    try:
        from atom_stream.kernels.fused_moe import fused_moe
    except ImportError:
        return None
    return fused_moe


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype, device=None):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg, device)
        self.experts = Experts(cfg, dtype, device)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, device,
                reduce=False)
            if cfg.n_shared_experts else None
        )
        self.tp = tp()
        self.record: list | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        logits = F.linear(x.float(), self.gate.weight)
        weights, ids = route(
            logits, self.gate.e_score_correction_bias if cfg.topk_method == "noaux_tc" else None,
            top_k=cfg.num_experts_per_tok, n_group=cfg.n_group, topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob, routed_scaling_factor=cfg.routed_scaling_factor,
            scoring_func=cfg.scoring_func)
        if self.record is not None:  # bench/decode.py: the routing actually taken
            self.record.append(ids)
        y = self.experts(x, weights, ids)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return all_reduce(y, self.tp)  # one reduction for routed + shared partial sums


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, rotary: RotaryEmbedding, dtype, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = MLA(cfg, rotary, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = (MoE(cfg, dtype, device) if cfg.is_moe_layer(idx)
                    else MLP(cfg.hidden_size, cfg.intermediate_size, dtype, device))

    def forward(self, x, positions, kv_cache, md):
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, md)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekV3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, dtype, device=None):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                           device=device)
        self.rotary = RotaryEmbedding(cfg, max_positions, device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, self.rotary, dtype, device) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(self, input_ids, positions, kv_caches, md):
        x = self.embed_tokens(input_ids)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, positions, cache, md)
        return self.norm(x)


class DeepseekV3ForCausalLM(nn.Module):
    """The text model. `forward` returns final hidden states [T, hidden];
    `compute_logits(hidden[rows])` returns float32 logits [N, vocab]."""

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV3Model(cfg, max_positions, dtype, device)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, device=device,
                              parallel="column")

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], md: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, md)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return all_gather_last(self.lm_head(hidden).float(), self.lm_head.tp)

    def process_weights_after_loading(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.process_weights_after_loading()
            experts = getattr(layer.mlp, "experts", None)
            method = getattr(experts, "quant_method", None)
            if hasattr(method, "finalize"):  # e.g. repack 4-bit experts for the GPU kernel
                method.finalize(experts)
