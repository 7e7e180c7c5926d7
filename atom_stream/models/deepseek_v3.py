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

Two forward paths, chosen per step by models/kernel_path.active(x) (CUDA tensors, or forced for
interpreter tests): the torch reference above, and the kernel path, which carries the residual
through the layers vLLM-style (`DecoderLayer.forward(x, residual) -> (sublayer_out, residual)`,
each RMSNorm fused with the preceding residual add), fuses gate/up GEMMs of dense MLPs and
shared experts, routes with a model-dtype router GEMM (fp32 output) and one routing kernel, and
runs MLA as in models/mla.py. Same math and rounding points (HF: add in the model dtype,
normalize in fp32, cast, multiply by the weight); no host syncs on the decode path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from atom_stream import envs
from atom_stream.config import ModelConfig
from atom_stream.layers.attention import AttentionMetadata
from atom_stream.layers.linear import Linear, VocabEmbedding, dense_linear, gemv_ok
from atom_stream.layers.moe import experts_dense_ref, experts_ref, route
from atom_stream.layers.norm import RMSNorm
from atom_stream.layers.parallel import all_gather_last, all_reduce, local_topk, tp
from atom_stream.layers.rotary import RotaryEmbedding
from atom_stream.models import kernel_path
from atom_stream.models.mla import LATENT_NORM_EPS, MLA, fuse_linear_weights  # noqa: F401


class MLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)). Dense layers and shared experts; the
    intermediate dim is split over TP ranks (`reduce=False` leaves the sum to the caller)."""

    def __init__(self, hidden: int, inter: int, dtype, device=None, reduce: bool = True):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, dtype=dtype, device=device, parallel="column")
        self.up_proj = Linear(hidden, inter, dtype=dtype, device=device, parallel="column")
        self.down_proj = Linear(inter, hidden, dtype=dtype, device=device, parallel="row",
                                reduce=reduce)
        self.w_gate_up: torch.Tensor | None = None  # [2 * inter, hidden] (kernel path)

    def process_weights_after_loading(self) -> None:
        """Fuse gate/up into one weight (unquantized only) for the kernel path's single GEMM."""
        self.w_gate_up = fuse_linear_weights(self.gate_proj, self.up_proj)

    def forward(self, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden] (this rank's partial sum when reduce=False), plus `add`
        [T, hidden] when given (the kernel path folds it into the down GEMM's epilogue and may
        write the sum into `add` itself: pass a tensor the caller no longer needs)."""
        if self.w_gate_up is not None and kernel_path.active(x):
            return self.down_add(self.act(x), add)
        y = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return y if add is None else add + y

    def act(self, x: torch.Tensor) -> torch.Tensor:
        """Kernel path, first half: silu(gate(x)) * up(x) [T, inter] from one gate/up GEMM."""
        from atom_stream.kernels.silu_mul import silu_mul  # one launch instead of silu + mul

        return silu_mul(dense_linear(x, self.w_gate_up))

    def down_add(self, act: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
        """Kernel path, second half: down(act) (+ add, folded into the GEMM when possible, then
        in place: the result may be `add` itself)."""
        down = self.down_proj
        if add is not None and down.quant_method is None and not down.reduce:
            # add += act @ W^T in place, one launch: `add` is the caller's fresh partial sum (the
            # routed experts' output); out-of-place addmm made cuBLAS copy it first (an extra
            # memcpy32_post kernel per layer in the B=1 profile)
            if gemv_ok(act, down.weight, SHARED_DOWN_GEMV_MAX_M):
                from atom_stream.kernels.gemv import gemv
                return gemv(act, down.weight, add=add, out=add)
            return add.addmm_(act, down.weight.t())
        y = down(act)
        return y if add is None else add + y


class Router(nn.Module):
    """`mlp.gate`: weight [E, H] and e_score_correction_bias [E], both kept in float32; the
    kernel path reads `weight_lp`, a model-dtype copy (exact: checkpoints store it in bf16)."""

    def __init__(self, cfg: ModelConfig, dtype, device=None):
        super().__init__()
        E = cfg.n_routed_experts
        self.dtype = dtype
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=torch.float32,
                                               device=device), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(E, dtype=torch.float32, device=device), requires_grad=False)
        self.weight_lp: torch.Tensor | None = None  # [E, H] model dtype (kernel path)

    def process_weights_after_loading(self) -> None:
        self.weight_lp = self.weight.detach().to(self.dtype)  # the same tensor when fp32


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
            return experts_dense_ref(x, self.w13, self.w2, topk_weights, topk_ids.long())
        return experts_ref(x, self.w13, self.w2, topk_weights, topk_ids)


def _fused_moe():
    """The Triton fused MoE (kernels/fused_moe.py) when present, else None."""
    try:
        from atom_stream.kernels.fused_moe import fused_moe
    except ImportError:
        return None
    return fused_moe


# Kernel path: the router GEMM and the shared expert's gate/up GEMM read the same x, so with
# ATOM_STREAM_FUSE_ROUTER_SHARED=1 they are one GEMM over [E + 2I_shared, H] with fp32 output
# (the logits as before; SiLU*mul reads the shared half in fp32): one launch fewer per MoE layer.
# On by default (H200 same-run A/B, bench/RESULTS.md session 4: B=1 5.99 -> 5.86 ms, never
# slower at B = 4, 8, 64); =0 keeps two GEMMs. Read at load (MoE.process_weights_after_loading).
FUSE_ROUTER_SHARED = envs.flag("ATOM_STREAM_FUSE_ROUTER_SHARED")
# Decode rows up to which kernels/gemv.py runs these GEMMs instead of cuBLAS (split-K kernel +
# reduce / addmm_): the fused router + shared gate/up (fp32 out) and the shared expert's down
# (adding into the routed output in place). Defaults 2 / 1 (H200, bench/RESULTS.md session 17:
# kernel 10.3-10.4 vs 11.4-11.7 µs for router + routing, 2.97 vs 3.39 µs for the shared down;
# decode B=1 -1.7 to -3.3 % in three alternated runs; the router at 2 rows since session 18's
# tiles, below). 0 = cuBLAS.
ROUTER_GEMV_MAX_M = envs.integer("ATOM_STREAM_ROUTER_GEMV_MAX_M")
SHARED_DOWN_GEMV_MAX_M = envs.integer("ATOM_STREAM_SHARED_DOWN_GEMV_MAX_M")
# H200 (bench/dense_gemv.py, RESULTS session 18): rows p, p + G, ... per program (STRIDED), 4
# rows x 4096 K per step on 8 warps, both steps' loads in flight (UNROLL): 5.65 µs at M=1 (vs
# 6.32 at session 17's 2 x 2048 tiles, 7.71 cuBLAS split-K + reduce), 6.98 vs 7.60 at M=2
ROUTER_GEMV_CONFIG = {"BLOCK_N": 4, "BLOCK_K": 4096, "num_warps": 8, "STRIDED": True,
                      "UNROLL": True}
# From ROUTER_GEMV_MAX_M + 1 rows up to ROUTER_SPLITK[0] the Triton split-K GEMM
# (kernels/gemm_splitk.py): 7.4-7.7 vs cuBLAS 7.9-8.1 us at M = 4..16, H200 (bench/splitk_gemm.py,
# RESULTS session 24; loses from 32); decode B = 4 / 16 / 32 -3.0 / -1.6 / -1.8 % with the q_a+kv_a
# one (mla.QKV_SPLITK). Not the lm_head: 65 vs 72 us of kernel time, yet +0.3 ms per step.
ROUTER_SPLITK = (envs.integer("ATOM_STREAM_ROUTER_SPLITK_MAX_M"),
                 {"BLOCK_N": 64, "BLOCK_K": 256, "SPLIT": 8, "W_AS_M": True, "num_warps": 4,
                  "num_stages": 4})


class MoE(nn.Module):
    takes_prenorm = True  # forward(x) may get a kernel_path.PreNorm (one-row steps)

    def __init__(self, cfg: ModelConfig, dtype, device=None):
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg, dtype, device)
        self.experts = Experts(cfg, dtype, device)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, dtype, device,
                reduce=False)
            if cfg.n_shared_experts else None
        )
        self.tp = tp()
        self.record: list | None = None
        self.w_router_shared: torch.Tensor | None = None  # [E + 2I_shared, H] (FUSE_ROUTER_SHARED)

    def process_weights_after_loading(self) -> None:
        """Router copy first, then (FUSE_ROUTER_SHARED, shared gate/up fused and unquantized, same
        dtype) one [E + 2I, H] weight that the router copy and the shared gate/up Linears view
        (no extra memory at rest)."""
        self.gate.process_weights_after_loading()
        shared, lp = self.shared_experts, self.gate.weight_lp
        if not (FUSE_ROUTER_SHARED and shared is not None and shared.w_gate_up is not None
                and lp.dtype == shared.w_gate_up.dtype):
            return
        E, inter = lp.shape[0], shared.gate_proj.weight.shape[0]
        fused = torch.cat([lp, shared.w_gate_up.detach()], 0)
        self.gate.weight_lp = fused[:E]
        for lyr, start in ((shared.gate_proj, E), (shared.up_proj, E + inter)):
            p = nn.Parameter(fused[start:start + inter], requires_grad=False)
            p.__dict__.update(lyr.weight.__dict__)  # tp_dim and other loader attributes
            lyr.weight = p
        shared.w_gate_up = fused[E:]
        self.w_router_shared = fused

    def _router_and_shared(self, x):
        """FUSE_ROUTER_SHARED: (logits [T, E] fp32 view, the shared expert's gate/up [T, 2I] fp32
        view, an empty act buffer [T, I] in x's dtype) from one fp32-output GEMM (up to
        ROUTER_GEMV_MAX_M rows kernels/gemv.py's), or None where the backend has no such GEMM
        (the caller's path runs). The routing launch fills act with SiLU(gate) * up
        (kernels/moe_routing.py, `act=`). x may be a kernel_path.PreNorm: its add + RMSNorm then
        run inside the GEMV where the GEMV takes the row (h materialized for the experts)."""
        out = kernel_path.prenorm_linear(x, self.w_router_shared, ROUTER_GEMV_MAX_M,
                                         ROUTER_GEMV_CONFIG, ROUTER_SPLITK, fp32_out=True,
                                         need_h=True)
        if out is None:
            return None
        E = self.cfg.n_routed_experts
        act = torch.empty(x.shape[0], (out.shape[1] - E) // 2, dtype=x.dtype, device=x.device)
        return out[:, :E], out[:, E:], act

    def forward(self, x) -> torch.Tensor:
        """x [T, hidden] (or a kernel_path.PreNorm of one row) -> [T, hidden]: routed experts +
        shared expert, one TP reduction. topk ids are int64 on the reference path and int32
        from the routing kernel."""
        cfg = self.cfg
        bias = self.gate.e_score_correction_bias if cfg.topk_method == "noaux_tc" else None
        # DeepSeek-V2's "greedy" ignores the groups (transformers' DeepseekV2TopkRouter)
        E, G = cfg.n_routed_experts, 1 if cfg.topk_method == "greedy" else cfg.n_group
        if isinstance(x, kernel_path.PreNorm) and kernel_path.SIDE_STREAM:
            x = x.resolve()  # the side stream reads h first; else the router GEMM takes it in
        fast = kernel_path.active(x) and self.gate.weight_lp is not None
        shared, side = self.shared_experts, None
        if (shared is not None and shared.w_gate_up is not None and x.is_cuda
                and kernel_path.SIDE_STREAM):
            # GPU, opt-in: the shared expert's gate/up GEMM + SiLU*mul run on a side stream
            # while the router, routing and routed experts run here (CUDA/HIP graphs capture
            # the fork/join); its down GEMM then adds the routed output in one addmm.
            main, side = torch.cuda.current_stream(x.device), kernel_path.side_stream(x.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                act = shared.act(x)
        kernel_routing = (fast and cfg.scoring_func == "sigmoid" and (G == 1 or E // G >= 2)
                          and cfg.topk_method != "group_limited_greedy")
        fused = None
        if kernel_routing and side is None and self.w_router_shared is not None:
            fused = self._router_and_shared(x)
        if isinstance(x, kernel_path.PreNorm):  # h: from the router's GEMV, or computed now
            x = x.resolve()
        if kernel_routing:
            from atom_stream.kernels.moe_routing import moe_routing
            if fused is not None:  # the shared SiLU*mul rides in the routing launch
                logits, gu, act = fused
            else:
                logits = kernel_path.router_logits(x, self.gate.weight_lp, self.gate.weight)
            weights, ids = moe_routing(
                logits, bias, top_k=cfg.num_experts_per_tok, n_group=G,
                topk_group=cfg.topk_group, norm_topk_prob=cfg.norm_topk_prob,
                routed_scaling_factor=cfg.routed_scaling_factor,
                act=None if fused is None else (gu, act))
        else:
            logits = F.linear(x.float(), self.gate.weight)
            weights, ids = route(
                logits, bias, top_k=cfg.num_experts_per_tok, n_group=G, topk_group=cfg.topk_group,
                norm_topk_prob=cfg.norm_topk_prob,
                routed_scaling_factor=cfg.routed_scaling_factor, scoring_func=cfg.scoring_func,
                group_score="max" if cfg.topk_method == "group_limited_greedy" else "top2_sum")
        if self.record is not None:  # bench/decode.py: the routing actually taken
            self.record.append(ids)
        y = self.experts(x, weights, ids)
        if side is not None:  # join: the shared expert's first half ran beside the routing
            main.wait_stream(side)
            act.record_stream(main)
            y = shared.down_add(act, y)
        elif fused is not None:  # its first half came out of the router GEMM
            y = shared.down_add(act, y)
        elif shared is not None:
            y = shared(x, add=y)
        return all_reduce(y, self.tp)  # one reduction for routed + shared partial sums


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, idx: int, rotary: RotaryEmbedding, dtype, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = MLA(cfg, rotary, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = (MoE(cfg, dtype, device) if cfg.is_moe_layer(idx)
                    else MLP(cfg.hidden_size, cfg.intermediate_size, dtype, device))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                kv_cache: torch.Tensor, md: AttentionMetadata
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Kernel path: x is the previous sublayer's output [T, hidden] (the embeddings, with
        residual None, for layer 0) and residual the running sum; returns (this layer's FFN
        output, the residual stream before it) -- the next RMSNorm adds them.
        Reference path: residual must be None; returns (the layer's output, None)."""
        if kernel_path.active(x):
            if kernel_path.NORM_GEMV and x.shape[0] == 1:  # the norms ride in the GEMVs
                pre = kernel_path.PreNorm(x, residual, self.input_layernorm)
                h = self.self_attn(pre, positions, kv_cache, md)
                pre = kernel_path.PreNorm(h, pre.residual_out, self.post_attention_layernorm)
                h = self.mlp(pre if getattr(self.mlp, "takes_prenorm", False)
                             else pre.resolve())
                return h, pre.residual_out
            h, residual = self.input_layernorm.fused(x, residual)
            h = self.self_attn(h, positions, kv_cache, md)
            h, residual = self.post_attention_layernorm.fused(h, residual)
            return self.mlp(h), residual
        assert residual is None
        x = x + self.self_attn(self.input_layernorm(x), positions, kv_cache, md)
        return x + self.mlp(self.post_attention_layernorm(x)), None


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
        residual = None
        for layer, cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, cache, md)
        if residual is not None:  # kernel path: the last FFN output joins the residual here
            return self.norm.fused(x, residual)[0]
        return self.norm(x)


class DeepseekV3ForCausalLM(nn.Module):
    """The text model. `forward` returns final hidden states [T, hidden];
    `compute_logits(hidden[rows])` returns float32 logits [N, vocab]."""

    def __init__(self, cfg: ModelConfig, max_positions: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.config = cfg
        self.model = DeepseekV3Model(cfg, max_positions, dtype, device)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, dtype=dtype, device=device,
                              parallel="column", pad=True)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[torch.Tensor], md: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, md)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab]. The kernel path takes them in fp32
        straight from the GEMM where the backend can (one launch, no bf16 rounding)."""
        head = self.lm_head
        logits = None
        if kernel_path.active(hidden) and head.quant_method is None:
            logits = kernel_path.linear_fp32_out(hidden, head.weight)
        if logits is None:
            logits = head(hidden).float()
        logits = all_gather_last(logits, head.tp)
        V = self.config.vocab_size
        # TP with a vocab the ranks do not divide: drop the padding rows' columns
        return logits if logits.shape[-1] == V else logits[:, :V].contiguous()

    def process_weights_after_loading(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.process_weights_after_loading()
            mlp = layer.mlp
            for dense in (mlp, getattr(mlp, "shared_experts", None)):
                if isinstance(dense, MLP):
                    dense.process_weights_after_loading()
            if isinstance(mlp, MoE):
                mlp.process_weights_after_loading()  # the router copy (+ FUSE_ROUTER_SHARED)
            experts = getattr(layer.mlp, "experts", None)
            method = getattr(experts, "quant_method", None)
            if hasattr(method, "finalize"):  # e.g. repack 4-bit experts for the GPU kernel
                method.finalize(experts)
