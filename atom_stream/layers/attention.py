"""Paged latent KV cache and the torch reference MLA attention over it.

Cache contract (shared with kernels/): one tensor per layer, `kv_cache[num_blocks, block_size, D]`
with D = kv_lora_rank + qk_rope_head_dim holding [c | k_pe(roped)] per token, in the model dtype
or float8 (e4m3fn, e4m3fnuz on MI300) with a per-layer `k_scale` (value = fp8 * k_scale).
A token at position p of a sequence lives at slot `block_table[p // block_size] * block_size +
p % block_size`.

`AttentionMetadata` describes one flattened step of T tokens over S sequences: the first
`num_decodes` sequences contribute one token each (absorbed path); the rest are prefill chunks
(naive path) whose queries sit at positions [seq_len - q_len, seq_len).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """Shapes: query_start_loc [S+1] (cumulative q lens, host list), seq_lens [S] (context length
    after this step, host list), block_tables [S, max_blocks] int32, slot_mapping [T] int64."""

    query_start_loc: list[int]
    seq_lens: list[int]
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    num_decodes: int
    block_size: int
    # tensors derived once per step (device), used by the batched decode gather
    decode_seq_lens: torch.Tensor | None = None
    # per-step device tensors built by the first layer that needs them, reused by the others
    # (e.g. a prefill chunk's cu_seqlens: one H2D copy per step, not one per layer)
    step_cache: dict = field(default_factory=dict, repr=False, compare=False)

    def prefill_cu_seqlens(self, i: int, device: torch.device) -> torch.Tensor:
        """Sequence i's (a prefill chunk) [0, q_len, 0, seq_len] int32 on `device`: cu_seqlens_q
        and cu_seqlens_k of a one-sequence varlen attention call."""
        key = ("prefill_cu", i, device)
        cu = self.step_cache.get(key)
        if cu is None:
            q_len = self.query_start_loc[i + 1] - self.query_start_loc[i]
            cu = torch.tensor([0, q_len, 0, self.seq_lens[i]], dtype=torch.int32).to(
                device, non_blocking=True)
            self.step_cache[key] = cu
        return cu

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


def fp8_dtype() -> torch.dtype:
    """The FP8 KV/activation dtype for this platform: e4m3fnuz on MI300 (gfx94x), else e4m3fn."""
    if torch.version.hip and torch.cuda.is_available():
        arch = torch.cuda.get_device_properties(0).gcnArchName
        if "gfx94" in arch:
            return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn


def store_kv(kv_cache: torch.Tensor, slot_mapping: torch.Tensor, entry: torch.Tensor,
             k_scale: float = 1.0) -> None:
    """Write entry [T, D] into the flat slots of kv_cache; quantize when the cache is fp8.
    Padding rows point at the scratch block's slots (no masking: graph-capturable)."""
    flat = kv_cache.view(-1, kv_cache.shape[-1])
    if kv_cache.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        finfo = torch.finfo(kv_cache.dtype)
        q = (entry.float() / k_scale).clamp(finfo.min, finfo.max).to(kv_cache.dtype)
        flat[slot_mapping] = q
    else:
        flat[slot_mapping] = entry.to(kv_cache.dtype)


def gather_kv(kv_cache: torch.Tensor, block_table: torch.Tensor, length: int,
              dtype: torch.dtype, k_scale: float = 1.0, start: int = 0) -> torch.Tensor:
    """One sequence's cached entries at positions [start, length) as [length - start, D] in
    `dtype` (fp8 caches times k_scale)."""
    bs = kv_cache.shape[1]
    pos = torch.arange(start, length, device=kv_cache.device)
    slots = block_table[pos // bs].long() * bs + pos % bs
    out = kv_cache.view(-1, kv_cache.shape[-1])[slots]
    if out.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        return (out.float() * k_scale).to(dtype)
    return out.to(dtype)


def mla_decode_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                   block_tables: torch.Tensor, seq_lens: torch.Tensor, kv_lora_rank: int,
                   scale: float, k_scale: float = 1.0, static_len: bool = False) -> torch.Tensor:
    """Absorbed MLA decode: MQA with one latent KV head.

    q_lat [B, H, r], q_pe [B, H, d_r]; returns o_lat [B, H, r] = softmax(scale * (q_lat.c +
    q_pe.k_pe)) @ c over each sequence's first seq_lens[b] cached tokens (float32 softmax)."""
    bs = kv_cache.shape[1]
    # static_len: attend over the whole block table (no host sync; graph-capturable)
    max_len = block_tables.shape[1] * bs if static_len else int(seq_lens.max())
    pos = torch.arange(max_len, device=kv_cache.device)
    blk = block_tables[:, (pos // bs)].long()  # [B, L]
    slots = blk * bs + (pos % bs)
    entries = kv_cache.view(-1, kv_cache.shape[-1])[slots]  # [B, L, D]
    entries = entries.float() * k_scale if kv_cache.element_size() == 1 else entries.float()
    c, k_pe = entries[..., :kv_lora_rank], entries[..., kv_lora_rank:]
    scores = torch.einsum("bhr,blr->bhl", q_lat.float(), c)
    scores += torch.einsum("bhd,bld->bhl", q_pe.float(), k_pe)
    scores *= scale
    mask = pos[None, :] >= seq_lens[:, None]  # [B, L]
    scores.masked_fill_(mask[:, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("bhl,blr->bhr", p, c)


def mla_prefill_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [Lq, H, dqk] over k [Lk, H, dqk], v [Lk, H, dv] where the queries are
    the last Lq of the Lk positions. Softmax in float32; returns [Lq, H, dv] in q's dtype."""
    lq, lk = q.shape[0], k.shape[0]
    mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(diagonal=lk - lq)
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1), k.float().transpose(0, 1), v.float().transpose(0, 1),
        attn_mask=mask, scale=scale)
    return out.transpose(0, 1).to(q.dtype)
