"""Multi-head latent attention (MLA) of DeepseekV3 / Kimi: the reference and the kernel path.

Math: model_spec.md §3. Per token x [T, hidden] (T = decode tokens first, then prefill chunks;
layers/attention.AttentionMetadata):

    q    = q_b(RMSNorm(q_a(x)))  (or q_proj(x))   -> [T, H, nope + rope]
    kv   = kv_a_proj_with_mqa(x)                  -> [T, r + rope]; c = RMSNorm(kv[:, :r])
    q_pe, k_pe = RoPE(q[..., nope:]), RoPE(kv[:, r:])
    cache[slot] = [c | k_pe]                      (latent cache [blocks, block_size, r + rope])
    decode (absorbed): q_lat = q_nope @ W_UK [H, nope, r]; o_lat = MQA over the latent cache;
                       o = o_lat @ W_UV^T        (W_UV [H, v, r])
    prefill (naive):   K/V expanded through kv_b_proj over the cached prefix + the chunk;
                       causal attention by kernels/mla_prefill.py's Triton flash kernel on
                       GPUs in 16-bit (`_prefill_kernel_ok`), else the float32 reference
    out  = o_proj(o.reshape(T, H * v))            -> [T, hidden]
softmax_scale = qk_head_dim^-0.5 * mscale^2 on both paths.

Kernel path (models/kernel_path.active): q_a_proj and kv_a_proj_with_mqa run as one GEMM over a
fused [q_lora + r + rope, hidden] weight (unquantized layers only; the two Linears keep views
into it), the latent norms are one Triton launch each on strided views, RoPE rotates q_pe and
k_pe in place, W_UK/W_UV are batched GEMMs over [H, T, *] views writing straight into the
output, and the Triton KV store / MLA decode run when r and rope are powers of two >= 16 (their
kernels' constraint; otherwise the torch versions, graph-capturable via static lengths). The RoPE
kernel needs a power-of-two number of pairs (else the torch rotation is copied back in place).
With FUSED_PROLOGUE (ATOM_STREAM_FUSED_PROLOGUE, default on) and the fused q_a/kv_a weight at
those widths, one kernel (kernels/mla_prologue.py) does both latent norms, k_pe's RoPE and the
KV store; q_pe's RoPE stays a separate in-place launch after q_b (4 launches -> 2). Small decode
batches fold more (Q_ABSORB_MAX_B, MERGE_UV_MAX_B, QB_GEMV_MAX_M below): q_nope @ W_UK with
q_pe's RoPE in one launch (kernels/mla_q_absorb.py), W_UV inside the attention's merge launch
(mla_decode(uv=...)), q_b by the Triton GEMV (kernels/gemv.py).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from atom_stream import envs
from atom_stream.config import ModelConfig
from atom_stream.layers.attention import (
    AttentionMetadata,
    gather_kv,
    mla_decode_ref,
    mla_prefill_ref,
    store_kv,
)
from atom_stream.layers.linear import Linear, dense_linear, dense_weight, gemv_ok
from atom_stream.layers.norm import RMSNorm
from atom_stream.layers.parallel import tp
from atom_stream.layers.rotary import RotaryEmbedding
from atom_stream.models import kernel_path, mla_prefix

logger = logging.getLogger(__name__)

# The fused MLA prologue (kernels/mla_prologue.py: q_a norm, kv_a norm, k_pe RoPE and the KV store
# in one launch) on the kernel path: on unless ATOM_STREAM_FUSED_PROLOGUE=0 (H200, session 14,
# two same-run A/Bs, bench/RESULTS.md: decode step B=1 -2.5 %, B=16 -1.8 %, B=64 -0.8 %).
# Read at import; tests flip the module attribute.
FUSED_PROLOGUE = envs.flag("ATOM_STREAM_FUSED_PROLOGUE")
# Decode-only batches on the kernel path can take q_lat and q_pe from ONE GEMM over a
# precomputed [H * (r + rope), q_lora] weight: W_UK folded into q_b's nope rows (fp32 product,
# rounded once to the model dtype) beside q_b's rope rows. One launch fewer per layer (the W_UK
# bmm) for ~3x q_b's bytes (Kimi TP8 rank: 14.2 MB vs 4.7 + 1 MB; +0.86 GB of weights per
# rank over 61 layers). Taken by decode-only batches of at least ABSORB_QB_MIN_B rows, where
# the GEMM is latency-bound and the extra bytes are nearly free; with the fp8 cache's v5 decode
# q_pe's RoPE then rides in the attention launch (mla_decode rope=), so the step loses the
# q_absorb launch and gains nothing. H200, session 20 (bench/RESULTS.md), three alternated runs:
# B=16 -2.1 % (1K) / -1.3 % (8K), B=64 -0.9 %, B=256 even; B=1 +3.3 % (the GEMV reads 3x the
# bytes: hence the row minimum). Read at load (process_weights_after_loading); built only when
# the folded weight is at most ABSORB_QB_MAX_BYTES per layer (DeepSeek at TP1, 128 heads,
# would need 226 MB per layer). Tests flip the module attributes before loading.
ABSORB_QB = envs.flag("ATOM_STREAM_ABSORB_QB")
ABSORB_QB_MIN_B = envs.integer("ATOM_STREAM_ABSORB_QB_MIN_B")
ABSORB_QB_MAX_BYTES = 64 << 20
# Decode rows on the kernel path: up to Q_ABSORB_MAX_B of them in a decode-only batch with the
# fused prologue, q_nope @ W_UK + q_pe's RoPE in one launch (kernels/mla_q_absorb.py) instead
# of a bmm + the RoPE launch; up to MERGE_UV_MAX_B, W_UV folded into the attention's merge
# launch (mla_decode(uv=...)) instead of a bmm after it. Above them the bmm's (weights read
# once per batch) stay. 0 = off. Defaults 128 / 4 by H200 kernel times (bench/mla_absorb.py,
# bench/RESULTS.md session 16): q_absorb 3.5 vs 5.3 us at B=1 ... 5.3 vs 6.8 at B=128, but 8.0
# vs 6.0 at B=256 (W_UK re-read per 16-row tile); merge + W_UV wins at B <= 4 (B=1: 11.8 vs
# 13.4 us with the attention), ties at 8 and loses from 16 (28.4 vs 16.4: W_UV re-read per b).
Q_ABSORB_MAX_B = envs.integer("ATOM_STREAM_MLA_Q_ABSORB_MAX_B")
MERGE_UV_MAX_B = envs.integer("ATOM_STREAM_MLA_MERGE_UV_MAX_B")
# q_b (bf16, q_lora 1536 -> 8 x 192 at a Kimi TP8 rank) on up to this many rows by the Triton
# GEMV (kernels/gemv.py) instead of cuBLAS: H200, bench/dense_gemv.py (RESULTS session 16):
# 3.1-3.9 vs 6.5 us at M=1, 4.0 vs 5.7 at M=2, 6.2 vs 6.1 at M=4. 0 = cuBLAS.
QB_GEMV_MAX_M = envs.integer("ATOM_STREAM_QB_GEMV_MAX_M")
# its tiles: the whole K (1536) in one masked 2048-wide step on 8 warps; H200 (bench/RESULTS.md
# session 17, bench/dense_gemv.py): 3.32 vs 3.60 us at M=1, 4.05 vs 4.71 at M=2 (default tiles);
# that step unrolled (UNROLL, session 18): 2.94 vs 3.34 at M=1, 3.34 vs 3.91 at M=2
QB_GEMV_CONFIG = {"num_warps": 8, "BLOCK_K": 2048, "UNROLL": True}
# the fused q_a + kv_a GEMM (hidden 7168 -> 1536 + 576) on up to this many rows by the GEMV,
# each program owning rows p, p + G, ... (STRIDED), 4 rows x 4096 K per step on 8 warps with
# both steps' loads in flight (UNROLL): 9.65 vs 12.39 us for cuBLAS (split-K + reduce) at M=1,
# 12.49 vs 12.79 at M=2, on the H200 (bench/dense_gemv.py, RESULTS session 18). 0 = cuBLAS.
# One-token steps (B=1 decode, one-token prefill chunks): the fused prologue's kv part (latent
# norm, k_pe RoPE, KV store) and the q_a norm run inside the q_b GEMV's launch
# (kernels/mla_prologue.qb_prologue: the norm folded into the GEMV, one more program for the kv
# part) where q_b runs on the GEMV: one launch fewer per layer. 0 keeps the two launches.
QB_PROLOGUE = envs.flag("ATOM_STREAM_QB_PROLOGUE")
QKV_GEMV_MAX_M = envs.integer("ATOM_STREAM_QKV_GEMV_MAX_M")
QKV_GEMV_CONFIG = {"BLOCK_N": 4, "BLOCK_K": 4096, "num_warps": 8, "STRIDED": True,
                   "UNROLL": True}
# From QKV_GEMV_MAX_M + 1 rows up to QKV_SPLITK[0], the Triton split-K GEMM
# (kernels/gemm_splitk.py, 4 splits of 64 rows x 1792 K, the last arriver sums them): H200,
# bench/splitk_gemm.py (RESULTS session 24), 11.4 / 11.5 / 12.3 vs cuBLAS 12.9 / 13.7 / 13.3 us
# at M = 4 / 16 / 32 (ties at 64). 0 = cuBLAS.
QKV_SPLITK = (envs.integer("ATOM_STREAM_QKV_SPLITK_MAX_M"),
              {"BLOCK_N": 64, "BLOCK_K": 128, "SPLIT": 4, "W_AS_M": True, "num_warps": 4,
               "num_stages": 6})
# o_proj (8 x 128 -> 7168, row-parallel) likewise: 16 rows x 512 K, 8 warps, unrolled: 5.85 vs
# 6.45 us at M=1 (loses at M=2: 8.0 vs 6.5). 0 = cuBLAS.
O_PROJ_GEMV_MAX_M = envs.integer("ATOM_STREAM_O_PROJ_GEMV_MAX_M")
O_PROJ_GEMV_CONFIG = {"BLOCK_N": 16, "BLOCK_K": 512, "num_warps": 8, "UNROLL": True}
LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm: HF builds them without eps (pitfall 1)


_PREFILL_KERNEL_FAILED = False  # set once the Triton prefill failed to fit this GPU


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def _prefill_kernel_ok(q: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether kernels/mla_prefill.py's Triton kernel takes this chunk: CUDA/HIP, 16-bit
    (float32 keeps the reference: the kernel's dots would run in TF32), v's head dim a power of
    two >= 16 and q/k's a power of two or the sum of two (192 = 128 + 64), each >= 16."""
    if _PREFILL_KERNEL_FAILED or not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return False
    d, dv = q.shape[-1], v.shape[-1]
    hi = 1 << (d.bit_length() - 1)
    return _pow2(dv) and _pow2(hi) and (d == hi or _pow2(d - hi))


def _prefill_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              scale: float, cu: torch.Tensor | None = None) -> torch.Tensor:
    """mla_prefill_ref's contract (q [Lq, H, d], the last Lq of k/v's Lk positions, causal),
    by the Triton flash kernel: one sequence, bottom-right causal over a cached prefix.
    cu: [0, Lq, 0, Lk] int32 on q's device (AttentionMetadata.prefill_cu_seqlens), or None
    (made here)."""
    from triton.runtime.errors import OutOfResources

    from atom_stream.kernels.mla_prefill import mla_prefill

    lq, lk = q.shape[0], k.shape[0]
    if cu is None:
        cu = torch.tensor([0, lq, 0, lk], dtype=torch.int32).to(q.device, non_blocking=True)
    try:
        return mla_prefill(q, k, v, cu[:2], cu[2:], lq, scale)
    except OutOfResources as e:  # a GPU whose shared memory the kernel's tiles exceed
        prefill_kernel_failed(e)
        return mla_prefill_ref(q, k, v, scale)


def prefill_kernel_failed(e: Exception) -> None:
    """The Triton prefill did not fit this GPU: every later chunk takes the torch reference
    (_prefill_kernel_ok turns False); warned once."""
    global _PREFILL_KERNEL_FAILED
    if not _PREFILL_KERNEL_FAILED:
        logger.warning("MLA prefill kernel does not fit this GPU (%s): torch reference", e)
    _PREFILL_KERNEL_FAILED = True


def fuse_linear_weights(*layers: Linear) -> torch.Tensor | None:
    """Concatenate unquantized Linears' weights along the output dim into one [sum out, in]
    tensor and re-point each layer's weight at its rows (a view: no extra memory at rest, the
    layers' own forward is unchanged). None when any layer is quantized (its weight is a
    packed format) or the weights differ in dtype/device."""
    if any(lyr.quant_method is not None for lyr in layers):
        return None
    ws = [lyr.weight for lyr in layers]
    if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
        return None
    fused = torch.cat([w.detach() for w in ws], 0)
    start = 0
    for lyr, w in zip(layers, ws):
        n = w.shape[0]
        p = nn.Parameter(fused[start:start + n], requires_grad=False)
        p.__dict__.update(w.__dict__)  # tp_dim and other loader attributes
        lyr.weight = p
        start += n
    return fused


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dtype, device=None):
        super().__init__()
        self.cfg = cfg
        self.num_heads = tp().shard(cfg.num_attention_heads, "num_attention_heads")
        self.nope, self.rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
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
        self.o_proj.gemv_max_m, self.o_proj.gemv_config = O_PROJ_GEMV_MAX_M, O_PROJ_GEMV_CONFIG
        self.rotary = rotary
        self.k_scale = 1.0  # fp8 KV cache scale (checkpoint k_scale when present)
        # Triton KV store / MLA decode need power-of-two latent/rope widths >= 16 (512/64 in
        # the real models); on the kernel path with other widths their torch versions run
        self.use_kernels = all(d >= 16 and d & (d - 1) == 0 for d in (self.r, self.rope))
        half = self.rope // 2  # the RoPE kernel takes a power-of-two number of pairs
        self.rope_kernel_ok = half > 0 and half & (half - 1) == 0
        self.w_uk: torch.Tensor | None = None  # [H, nope, r]
        self.w_uv: torch.Tensor | None = None  # [H, v, r]
        self.w_qkv_a: torch.Tensor | None = None  # [q_lora + r + rope, hidden] (kernel path)
        self.w_q_abs: torch.Tensor | None = None  # [H * (r + rope), q_lora] (ABSORB_QB)

    @property
    def fused_prologue(self) -> bool:
        """The kernel path takes the fused prologue (FUSED_PROLOGUE, the fused q_a / kv_a weight,
        the attention kernels' widths): _prologue_fused."""
        return FUSED_PROLOGUE and self.use_kernels and self.w_qkv_a is not None

    def qkv_a(self, x):
        """The fused q_a / kv_a GEMM [T, q_lora + r + rope]; x a tensor or a kernel_path.PreNorm
        (its norm then rides in the GEMV)."""
        return kernel_path.prenorm_linear(x, self.w_qkv_a, QKV_GEMV_MAX_M, QKV_GEMV_CONFIG,
                                          QKV_SPLITK)

    def qb_prologue_weight(self, q_c: torch.Tensor, absorbed: bool) -> torch.Tensor | None:
        """The weight qb_prologue multiplies q_c [T, q_lora] by (the folded q_b when absorbed),
        or None where the step keeps mla_prologue + q_b: QB_PROLOGUE off, T != 1, a quantized
        q_b, or the GEMV not taking the row."""
        qb = self.q_b_proj
        w = self.w_q_abs if absorbed else (qb.weight if qb.quant_method is None else None)
        ok = QB_PROLOGUE and q_c.shape[0] == 1 and w is not None
        return w if ok and gemv_ok(q_c, w, QB_GEMV_MAX_M) else None

    def process_weights_after_loading(self) -> None:
        """Split kv_b_proj into the absorbed W_UK / W_UV (kept in the model dtype) and fuse the
        q_a / kv_a weights for the kernel path's single GEMM."""
        w = dense_weight(self.kv_b_proj).view(self.num_heads, self.nope + self.v_dim, self.r)
        self.w_uk = w[:, : self.nope].contiguous()
        self.w_uv = w[:, self.nope:].contiguous()
        if self.cfg.q_lora_rank:
            self.w_qkv_a = fuse_linear_weights(self.q_a_proj, self.kv_a_proj_with_mqa)
            self.w_q_abs = self._absorbed_q_weight() if ABSORB_QB else None

    def _absorbed_q_weight(self) -> torch.Tensor | None:
        """[H * (r + rope), q_lora] in the model dtype: per head, W_UK^T @ q_b's nope rows
        (q_lat = W_UK^T q_nope, so q_lat = that @ q_c), then q_b's rope rows unchanged. None
        when it would exceed ABSORB_QB_MAX_BYTES, and when q_b is quantized (its method may
        quantize its activations, which a folded bf16 GEMM would skip: a decode batch's
        numerics would then depend on its size; ATOM never folds q_b either)."""
        if self.q_b_proj.quant_method is not None:
            return None
        H, n, r, pe = self.num_heads, self.nope, self.r, self.rope
        wq = dense_weight(self.q_b_proj)
        ql, dt = wq.shape[1], self.w_uk.dtype
        if H * (r + pe) * ql * dt.itemsize > ABSORB_QB_MAX_BYTES:
            return None
        wq = wq.view(H, n + pe, ql)
        w_lat = torch.einsum("hnr,hnj->hrj", self.w_uk.float(), wq[:, :n].float())
        return torch.cat([w_lat.to(dt), wq[:, n:].to(dt)], 1).reshape(H * (r + pe), ql)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        """x [T, hidden] -> [T, hidden]; writes the T new latent entries into kv_cache. On the
        kernel path x may be a kernel_path.PreNorm (one-row steps: DecoderLayer)."""
        if kernel_path.active(x):
            return self._forward_kernels(x, positions, kv_cache, md)
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
        store_kv(kv_cache, md.slot_mapping, torch.cat([c, k_pe], dim=-1), self.k_scale)

        out = torch.empty(T, H, self.v_dim, dtype=x.dtype, device=x.device)
        nd = md.num_decodes
        if nd:
            q_lat = torch.einsum("thn,hnr->thr", q_nope[:nd], self.w_uk)
            o_lat = mla_decode_ref(q_lat, q_pe[:nd], kv_cache, md.block_tables[:nd],
                                   self._decode_lens(md, x.device), self.r, self.scale,
                                   self.k_scale, static_len=q_lat.is_cuda)
            out[:nd] = torch.einsum("thr,hvr->thv", o_lat.to(x.dtype), self.w_uv)
        self._prefill(out, q_nope, q_pe, c, k_pe, kv_cache, md)
        return self.o_proj(out.reshape(T, H * self.v_dim))

    def _forward_kernels(self, x, positions, kv_cache, md):
        """The kernel path (module docstring); same math as forward."""
        T = x.shape[0]
        H = self.num_heads
        nd = md.num_decodes
        # decode-only batch with the folded weight: q comes out as [T, H, r + rope] (q_lat | q_pe)
        absorbed = self.w_q_abs is not None and nd == T and T >= ABSORB_QB_MIN_B
        fuse = self.use_kernels and 0 < nd <= MERGE_UV_MAX_B  # W_UV in the merge
        fused_pro = self.fused_prologue
        q_absorb = (fused_pro and 0 < nd == T <= Q_ABSORB_MAX_B
                    and not absorbed)  # W_UK + q_pe RoPE
        # absorbed, decode-only: q_pe is only the attention's, which rotates it (mla_decode rope=)
        rope_in_decode = fused_pro and absorbed
        if fused_pro:  # x may be a PreNorm: its norm then rides in the q_a + kv_a GEMV
            q, c, k_pe = self._prologue_fused(x, positions, kv_cache, md, absorbed,
                                              rope_q=not (q_absorb or rope_in_decode))
        else:
            if isinstance(x, kernel_path.PreNorm):
                x = x.resolve()
            q, c, k_pe = self._prologue(x, positions, kv_cache, md, absorbed)
        q_nope, q_pe = q[..., : -self.rope], q[..., -self.rope:]
        out = torch.empty(T, H, self.v_dim, dtype=x.dtype, device=x.device)
        if nd:
            if absorbed:
                q_lat = q_nope
            elif q_absorb:  # q_pe rotated by the same launch
                from atom_stream.kernels.mla_q_absorb import mla_q_absorb
                q_lat = mla_q_absorb(q, self.w_uk, self.rotary.cos, self.rotary.sin, positions)
            else:  # [H, nd, nope] @ [H, nope, r]: strided views, no permute copies
                q_lat = torch.bmm(q_nope[:nd].transpose(0, 1), self.w_uk).transpose(0, 1)
            lens = self._decode_lens(md, x.device)
            rope = (self.rotary.cos, self.rotary.sin, positions) if rope_in_decode else None
            if fuse:  # out[:nd] = o_lat @ W_UV^T from the merge launch
                self._decode(q_lat, q_pe[:nd], kv_cache, md.block_tables[:nd], lens,
                             uv=(self.w_uv, out[:nd]), rope=rope)
            else:
                o_lat = self._decode(q_lat, q_pe[:nd], kv_cache, md.block_tables[:nd], lens,
                                     rope=rope)
                # [H, nd, r] @ [H, r, v] written straight into out[:nd] viewed as [H, nd, v]
                # (o_lat is already in q's = x's dtype: the .to is a no-op, no launch)
                torch.bmm(o_lat.to(x.dtype).transpose(0, 1), self.w_uv.transpose(1, 2),
                          out=out[:nd].transpose(0, 1))
        self._prefill(out, q_nope, q_pe, c, k_pe, kv_cache, md, kernels=True)
        return self.o_proj(out.view(T, H * self.v_dim))

    def _q_b(self, q_n, absorbed: bool):
        """q [T, H, nope + rope] from the normed q latent, or with `absorbed` (the folded
        weight) [T, H, r + rope] = (q_lat | q_pe)."""
        T = q_n.shape[0]
        if absorbed:
            q = dense_linear(q_n, self.w_q_abs, gemv_max_m=QB_GEMV_MAX_M,
                             gemv_config=QB_GEMV_CONFIG)
            return q.view(T, self.num_heads, self.r + self.rope)
        if self.q_b_proj.quant_method is None:  # column-parallel: no reduction to add
            q = dense_linear(q_n, self.q_b_proj.weight, gemv_max_m=QB_GEMV_MAX_M,
                             gemv_config=QB_GEMV_CONFIG)
            return q.view(T, self.num_heads, self.nope + self.rope)
        return self.q_b_proj(q_n).view(T, self.num_heads, self.nope + self.rope)

    def _prologue(self, x, positions, kv_cache, md, absorbed=False):
        """Kernel path up to the attention: q [T, H, nope + rope] (absorbed: [T, H, r + rope],
        see _q_b; q_pe = the last rope dims, rotated), c [T, r] and k_pe [T, rope] (normed /
        rotated), the new entries stored in kv_cache. Launches: the q_a/kv_a GEMM, 2 latent
        norms, q_b (or the folded GEMM), one RoPE (q_pe and k_pe), the KV store."""
        T, r = x.shape[0], self.r
        if self.cfg.q_lora_rank:
            ql = self.cfg.q_lora_rank
            if self.w_qkv_a is not None:  # one GEMM; q_c / kv are views of its output
                qkv = dense_linear(x, self.w_qkv_a, gemv_max_m=QKV_GEMV_MAX_M,
                                   gemv_config=QKV_GEMV_CONFIG, splitk=QKV_SPLITK)
                q_c, kv = qkv[:, :ql], qkv[:, ql:]
            else:
                q_c, kv = self.q_a_proj(x), self.kv_a_proj_with_mqa(x)
            q = self._q_b(self.q_a_layernorm.fused(q_c, None)[0], absorbed)
        else:
            q, kv = self.q_proj(x), self.kv_a_proj_with_mqa(x)
            q = q.view(T, self.num_heads, self.nope + self.rope)
        q_pe = q[..., -self.rope:]
        c = self.kv_a_layernorm.fused(kv[:, :r], None)[0]
        k_pe = kv[:, r:]
        if self.rope_kernel_ok:
            self.rotary.rotate_(positions, q_pe, k_pe)  # in place on the q / kv_a outputs
        else:
            q_pe.copy_(self.rotary(positions, q_pe))
            k_pe.copy_(self.rotary(positions, k_pe[:, None]).squeeze(1))
        if self.use_kernels:
            from atom_stream.kernels.kv_store import kv_store
            kv_store(kv_cache, md.slot_mapping, c, k_pe, self.k_scale, rope_dim=self.rope)
        else:
            store_kv(kv_cache, md.slot_mapping, torch.cat([c, k_pe], dim=-1), self.k_scale)
        return q, c, k_pe

    def _prologue_fused(self, x, positions, kv_cache, md, absorbed=False, rope_q=True):
        """_prologue with the fused MLA prologue kernel (FUSED_PROLOGUE; needs the fused q_a/kv_a
        weight and the attention kernels' widths): the q_a/kv_a GEMM, ONE launch for both
        latent norms + k_pe's RoPE + the KV store (c / k_pe normed and rotated in place in
        the GEMM output), q_b, then q_pe's RoPE in place (unless not rope_q: the caller's
        mla_q_absorb rotates it). One token with q_b on the GEMV (QB_PROLOGUE): the prologue
        and q_b are one launch (kernels/mla_prologue.qb_prologue)."""
        r, ql = self.r, self.cfg.q_lora_rank
        from atom_stream.kernels.mla_prologue import mla_prologue, qb_prologue
        qkv = self.qkv_a(x)
        kv = qkv[:, ql:]
        w = self.qb_prologue_weight(qkv[:, :ql], absorbed)
        if w is not None:
            q = qb_prologue(qkv[:, :ql], kv, w, self.q_a_layernorm.weight,
                            self.kv_a_layernorm.weight, self.q_a_layernorm.eps,
                            self.kv_a_layernorm.eps, self.rotary.cos, self.rotary.sin,
                            positions, kv_cache, md.slot_mapping, self.k_scale,
                            config=QB_GEMV_CONFIG)
            q = q.view(1, self.num_heads, (self.r if absorbed else self.nope) + self.rope)
            if rope_q:
                self.rotary.rotate_(positions, q[..., -self.rope:])
            return q, kv[:, :r], kv[:, r:]
        q_n = mla_prologue(qkv[:, :ql], kv, self.q_a_layernorm.weight,
                           self.kv_a_layernorm.weight, self.q_a_layernorm.eps,
                           self.kv_a_layernorm.eps, self.rotary.cos, self.rotary.sin,
                           positions, kv_cache, md.slot_mapping, self.k_scale)
        q = self._q_b(q_n, absorbed)
        if rope_q:
            self.rotary.rotate_(positions, q[..., -self.rope:])  # use_kernels: rope_kernel_ok
        return q, kv[:, :r], kv[:, r:]

    @staticmethod
    def _decode_lens(md: AttentionMetadata, device) -> torch.Tensor:
        """Context lengths [num_decodes] int32 of the decode rows (device tensor)."""
        nd = md.num_decodes
        seq_lens = md.decode_seq_lens
        if seq_lens is None:  # eager callers without a device copy (never inside a graph)
            return torch.tensor(md.seq_lens[:nd], dtype=torch.int32, device=device)
        return seq_lens[:nd].to(torch.int32)  # no-op for the runner's int32 buffer

    def _decode(self, q_lat, q_pe, kv_cache, block_tables, seq_lens, uv=None, rope=None):
        """Kernel-path absorbed decode over the paged cache: the Triton kernel (split-KV,
        graph-capturable; q_lat/q_pe may be strided), or the torch reference at widths the kernel
        does not take (static length on GPUs so graphs capture). uv=(w_uv, y): the kernel only;
        y = o_lat @ W_UV^T per head, written by the merge launch (mla_decode's uv).
        rope=(cos, sin, positions): q_pe is unrotated; the kernel rotates it (mla_decode's
        rope; q_pe may be rotated in place)."""
        if self.use_kernels:
            from atom_stream.kernels.mla_decode import mla_decode
            return mla_decode(q_lat, q_pe, kv_cache, block_tables, seq_lens.to(torch.int32),
                              self.scale, self.k_scale, rope_dim=self.rope, uv=uv, rope=rope)
        assert uv is None and rope is None
        return mla_decode_ref(q_lat, q_pe, kv_cache, block_tables, seq_lens, self.r, self.scale,
                              self.k_scale, static_len=q_lat.is_cuda)

    def _prefill(self, out, q_nope, q_pe, c, k_pe, kv_cache, md, kernels: bool = False):
        """Naive path for every prefill chunk (rows after the decodes), written into out.
        kernels: the attention itself by the Triton flash kernel where it applies
        (`_prefill_kernel_ok`), else the float32 reference."""
        for i in range(md.num_decodes, md.num_seqs):
            s, e = md.query_start_loc[i], md.query_start_loc[i + 1]
            cu = md.prefill_cu_seqlens(i, q_nope.device) if kernels and q_nope.is_cuda else None
            out[s:e] = self._prefill_one(q_nope[s:e], q_pe[s:e], c[s:e], k_pe[s:e],
                                         kv_cache, md.block_tables[i], md.seq_lens[i], kernels,
                                         cu)

    def _prefill_one(self, q_nope, q_pe, c_new, k_pe_new, kv_cache, block_table, seq_len,
                     kernels: bool = False, cu: torch.Tensor | None = None):
        """Naive path for one chunk: queries are the last q_len of seq_len positions. cu: the
        chunk's cu_seqlens for the Triton kernel (AttentionMetadata.prefill_cu_seqlens)."""
        q_len = q_nope.shape[0]
        prefix = seq_len - q_len
        q = torch.cat([q_nope, q_pe], dim=-1)
        chunk = mla_prefix.prefix_chunk_tokens(self, c_new.dtype)
        if prefix > chunk:  # bounded memory whatever the prefix (models/mla_prefix.py)
            return mla_prefix.prefill_over_long_prefix(
                self, q, c_new, k_pe_new, kv_cache, block_table, prefix, chunk,
                lambda q, v: kernels and _prefill_kernel_ok(q, v))
        if prefix:
            cached = gather_kv(kv_cache, block_table, prefix, c_new.dtype, self.k_scale)
            c_all = torch.cat([cached[:, : self.r], c_new])
            k_pe_all = torch.cat([cached[:, self.r:], k_pe_new])
        else:
            c_all, k_pe_all = c_new, k_pe_new
        k, v = mla_prefix.expand_kv(self, dense_weight(self.kv_b_proj), c_all, k_pe_all)
        if kernels and _prefill_kernel_ok(q, v):
            return _prefill_attention_kernel(q, k, v, self.scale, cu)
        return mla_prefill_ref(q, k, v, self.scale)
