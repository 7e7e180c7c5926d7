"""Torch references for the MoE kernels, and the weight pack/unpack/repack helpers (from the spec).

Everything here is plain torch (any device), written from model_spec.md §3 (routing) and §4
(formats), and is what tests/test_kernels_moe.py compares the Triton kernels against.

Weight layout contract (shared with kernels/fused_moe.py and the model integrator):
- w13 [E, 2*I, H]: rows 0..I-1 are gate_proj, rows I..2I-1 up_proj (vLLM order); w2 [E, H, I].
- A shared expert of intermediate I*S (S = n_shared) may be appended as S extra experts of
  intermediate I each (rows/columns split in order): SwiGLU is separable over intermediate
  channels, so sum_s down_s(silu(gate_s x) * up_s x) = the whole shared expert. Those experts are
  always selected with weight 1.0 (not scaled by routed_scaling_factor).

Formats (per expert, [N, K] = [out, in]):
- "bf16": float weights (bf16/fp16/fp32).
- "fp8_block": float8_e4m3fn [N, K] + weight_scale_inv fp32 [ceil(N/128), ceil(K/128)];
  W = q * s[n//128, k//128]. For w13 the scale rows are gate's ceil(I/128) then up's.
- int4 compressed-tensors (Kimi native): int32 [N, K/8]; element k in word k//8 at bits 4*(k%8)
  as the nibble q+8 (q in [-8, 7]); scale bf16 [N, K/32]; W = q * s[n, k//32].
- MXFP4 (Quark/OCP): uint8 [N, K/2], element 2i in the low nibble, e2m1 code (bit 3 = sign,
  magnitudes {0, .5, 1, 1.5, 2, 3, 4, 6}); e8m0 uint8 [N, K/32], scale 2^(e-127).
- "fp8_channel" / "fp8_tensor": float8_e4m3fn [N, K] + fp32 scale per row [N] or per tensor;
  W = q * s[n]; activations fp8 per token (qdq_fp8_token) or static (qdq_fp8_static).

Kernel layouts (repack at load time, still 4 bits/weight, scales unchanged):
- int4 "kernel" layout: int32 [..., N, K/128, 16]. In chunk c (128 channels of K), word t holds
  8 nibbles (q+8); nibble position p = j + 4h (bits 4p..4p+3), j in 0..3, h in 0..1, holds
  element k = 128c + 32j + 2t + h. So ((w >> 4j) & 0x000F000F) puts one scale group (32
  consecutive k, pairs (2t, 2t+1) in the two 16-bit halves) into 16-bit lanes at once.
- mxfp4 "kernel" layout: int32 [..., N, K/128, 16]; same element order; in 16-bit half h the
  element j stores its 3 magnitude bits at bits 3j..3j+2 and its sign at bit 12+j, so that
  ((w << (9-3j)) & 0x0E000E00) | ((w << (3-j)) & 0x80008000) is two fp16 bit patterns equal to
  e2m1 * 2^-14 (the e2m1 zero-exponent codes land on fp16 subnormals, exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_MAX = 448.0


def exact_div(x: torch.Tensor, c: float) -> torch.Tensor:
    """x / c with IEEE division on every device. (On CUDA, torch turns division by a Python
    scalar into multiplication by its reciprocal, which differs in the last bit for some x; the
    kernels divide with div_rn, so references built this way match them bit for bit.) The
    divisor is filled on x's device, not copied from the host: CUDA/HIP graph capture forbids
    that copy (a tiny FP8-block MoE on the reference loop failed the engine's capture)."""
    return x / torch.full((), c, dtype=x.dtype, device=x.device)
GROUP = 32  # int4 and MXFP4 group size along K
CHUNK = 128  # K channels per repacked chunk


# ------------------------------------------------------------------------ routing (spec §3)
def moe_routing_ref(logits: torch.Tensor, bias: torch.Tensor | None, *, top_k: int,
                    n_group: int = 1, topk_group: int = 1, norm_topk_prob: bool = True,
                    routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [M, E] -> (topk_weights [M, k] fp32, topk_ids [M, k] int64), ids by falling sel."""
    s = logits.float().sigmoid()
    sel = s + bias.float() if bias is not None else s.clone()
    M, E = sel.shape
    if n_group > 1:
        g = sel.view(M, n_group, E // n_group)
        gscore = g.topk(2, dim=-1).values.sum(-1)
        keep = gscore.topk(topk_group, dim=-1).indices
        gmask = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, keep, True)
        sel = sel.masked_fill(~gmask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = sel.topk(top_k, dim=-1).indices
    w = s.gather(1, ids)
    if norm_topk_prob:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * routed_scaling_factor, ids


def with_shared(topk_weights: torch.Tensor, topk_ids: torch.Tensor, n_routed: int,
                n_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the S shared experts (ids n_routed.., weight 1.0) to every token's selection."""
    if n_shared == 0:
        return topk_weights, topk_ids
    M = topk_ids.shape[0]
    sid = torch.arange(n_routed, n_routed + n_shared, device=topk_ids.device)
    ids = torch.cat([topk_ids.long(), sid.expand(M, n_shared)], 1)
    w = torch.cat([topk_weights.float(), topk_weights.new_ones(M, n_shared).float()], 1)
    return w, ids


# ------------------------------------------------------------------------ int4 (spec §4b)
def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [..., K/8] (compressed-tensors) -> int8 [..., K] in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    return (((packed.unsqueeze(-1) >> shifts) & 0xF).to(torch.int8) - 8).flatten(-2)


def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """int64 [..., 8] nibble values (position p = index) -> int32 [...] words."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=nibbles.device)
    w = (nibbles.to(torch.int64) << shifts).sum(-1)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int [..., K] in [-8, 7] -> int32 [..., K/8] (compressed-tensors pack-quantized)."""
    return _words((q.to(torch.int64) + 8).unflatten(-1, (-1, 8)))


def _kernel_order(v: torch.Tensor) -> torch.Tensor:
    """[..., K] -> [..., K/128, 16 (t), 2 (h), 4 (j)]: element 128c + 32j + 2t + h."""
    return v.unflatten(-1, (-1, 4, 16, 2)).permute(*range(v.dim() - 1), -4, -2, -1, -3)


def _natural_order(v: torch.Tensor) -> torch.Tensor:
    """Inverse of _kernel_order: [..., K/128, 16, 2, 4] -> [..., K]."""
    nd = v.dim() - 4
    return v.permute(*range(nd), nd, nd + 3, nd + 1, nd + 2).flatten(-4)


def repack_int4(packed: torch.Tensor) -> torch.Tensor:
    """compressed-tensors int32 [..., N, K/8] -> kernel layout int32 [..., N, K/128, 16]."""
    if (packed.shape[-1] * 8) % CHUNK:
        raise ValueError(f"int4 kernel layout needs K % {CHUNK} == 0, got K={packed.shape[-1] * 8}")
    u = _kernel_order(unpack_int4(packed).to(torch.int64) + 8)  # [..., C, 16, 2(h), 4(j)]
    return _words(u.flatten(-2))  # nibble position p = 4h + j


def unrepack_int4(w: torch.Tensor) -> torch.Tensor:
    """Kernel layout int32 [..., N, K/128, 16] -> int8 q [..., N, K] in [-8, 7]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=w.device)
    nib = ((w.unsqueeze(-1) >> shifts) & 0xF).to(torch.int8) - 8  # [..., C, 16, 8 (p)]
    return _natural_order(nib.unflatten(-1, (2, 4)))


def tile_rows(t: torch.Tensor, T: int) -> torch.Tensor:
    """[..., N, K/128, C] -> [..., N/T, K/128, T, C]: tiles of T consecutive rows, chunk-major
    inside a tile, so one 128-K chunk of a tile is one contiguous T x C block (the row-tiled
    4-bit layout: words C = 16 int32, group scales C = 4; fused_moe.tile_w13)."""
    *lead, N, nch, C = t.shape
    if N % T:
        raise ValueError(f"tile_rows: {N} rows do not split into tiles of {T}")
    return t.reshape(*lead, N // T, T, nch, C).transpose(-3, -2).contiguous()


def untile_rows(t: torch.Tensor) -> torch.Tensor:
    """Inverse of tile_rows: [..., N/T, K/128, T, C] -> [..., N, K/128, C]."""
    *lead, nt, nch, T, C = t.shape
    return t.transpose(-3, -2).reshape(*lead, nt * T, nch, C)


def w13_tile(w13: torch.Tensor, s13: torch.Tensor | None) -> int:
    """Rows per tile of a repacked 4-bit w13 (1: the row-major [E, 2I, H/128, 16] layout; T:
    tile_rows' [E, 2I/T, H/128, T, 16], whose scales must be tiled alike [E, 2I/T, H/128, T, 4];
    ValueError otherwise)."""
    if w13.dim() != 5:
        return 1
    T = w13.shape[3]
    if (s13 is None or s13.dim() != 5 or tuple(s13.shape[:4]) != tuple(w13.shape[:4])
            or s13.shape[4] != 4 or w13.shape[4] != 16):
        raise ValueError(f"row-tiled w13 {tuple(w13.shape)} needs scales tiled alike "
                         f"[E, 2I/T, H/128, T, 4], got {None if s13 is None else tuple(s13.shape)}")
    return T


def dequant_int4(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q [..., N, K] + scale [..., N, K/32] -> float32 [..., N, K]."""
    return (q.float().unflatten(-1, (-1, GROUP)) * scale.float().unsqueeze(-1)).flatten(-2)


# ------------------------------------------------------------------------ MXFP4 (spec §4c)
def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    lut = torch.tensor(E2M1 + tuple(-v for v in E2M1), device=codes.device)
    return lut[codes.long()]


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 codes [..., K] (element 2i = low nibble)."""
    return torch.stack([packed & 0xF, packed >> 4], -1).flatten(-2)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] -> uint8 [..., K/2]."""
    c = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return c[..., 0] | (c[..., 1] << 4)


def dequant_mxfp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """uint8 [..., N, K/2] + e8m0 [..., N, K/32] -> float32 [..., N, K] (exact)."""
    v = e2m1_values(unpack_fp4(packed)).unflatten(-1, (-1, GROUP))
    return (v * torch.exp2(scale.float() - 127).unsqueeze(-1)).flatten(-2)


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """float32 -> e2m1 codes, round to nearest, ties to even (even mantissa), saturate at 6."""
    mag = y.abs()
    code = ((mag > 0.25).int() + (mag >= 0.75).int() + (mag > 1.25).int() + (mag >= 1.75).int()
            + (mag > 2.5).int() + (mag >= 3.5).int() + (mag > 5.0).int())
    return (code | ((y < 0).int() << 3)).to(torch.uint8)


def mxfp4_exponent(amax: torch.Tensor) -> torch.Tensor:
    """Quark 'even' shared exponent (int32, unbiased) of a group's amax >= 0: round amax to a
    power of two (mantissa >= 0.75 rounds up), minus 2 (e2m1 emax), clamped to [-127, 127]."""
    bits = amax.float().contiguous().view(torch.int32)
    biased = ((bits + (1 << 21)) & 0x7F800000) >> 23
    return (biased - 129).clamp(-127, 127)


def quant_mxfp4(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (uint8 packed [..., K/2], e8m0 uint8 [..., K/32]) (dynamic, per 32)."""
    g = x.float().unflatten(-1, (-1, GROUP))
    e = mxfp4_exponent(g.abs().amax(-1))
    codes = round_e2m1(g * torch.exp2(-e.float()).unsqueeze(-1)).flatten(-2)
    return pack_fp4(codes), (e + 127).to(torch.uint8)


def qdq_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """Quant-dequant along the last dim, float32 result (what w4a4 computes with)."""
    q, s = quant_mxfp4(x)
    return dequant_mxfp4(q, s)


def repack_mxfp4(packed: torch.Tensor) -> torch.Tensor:
    """Quark uint8 [..., N, K/2] -> kernel layout int32 [..., N, K/128, 16]."""
    if (packed.shape[-1] * 2) % CHUNK:
        raise ValueError(f"mxfp4 kernel layout needs K % {CHUNK} == 0, got K={packed.shape[-1] * 2}")
    c = _kernel_order(unpack_fp4(packed).to(torch.int64))  # [..., C, 16, 2(h), 4(j)]
    j = torch.arange(4, device=c.device, dtype=torch.int64)
    half = (((c & 7) << (3 * j)) | (((c >> 3) & 1) << (12 + j))).sum(-1)  # disjoint bits
    w = half[..., 0] | (half[..., 1] << 16)
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def unrepack_mxfp4(w: torch.Tensor) -> torch.Tensor:
    """Kernel layout int32 [..., N, K/128, 16] -> Quark uint8 [..., N, K/2]."""
    v = w.to(torch.int64) & 0xFFFFFFFF
    halves = torch.stack([v & 0xFFFF, v >> 16], -1)  # [..., C, 16, 2]
    j = torch.arange(4, device=w.device, dtype=torch.int64)
    h = halves.unsqueeze(-1)
    codes = ((h >> (3 * j)) & 7) | (((h >> (12 + j)) & 1) << 3)  # [..., C, 16, 2, 4]
    return pack_fp4(_natural_order(codes))


# ------------------------------------------------------------------------ FP8 block (spec §4a)
def quant_fp8_block(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """float [..., N, K] -> (float8_e4m3fn [..., N, K], scale_inv fp32 [..., ceil(N/b), ceil(K/b)])."""
    N, K = w.shape[-2:]
    pn, pk = (-N) % block, (-K) % block
    wp = F.pad(w.float(), (0, pk, 0, pn))
    t = wp.unflatten(-1, (-1, block)).unflatten(-3, (-1, block))  # [.., nb, b, kb, b]
    s = exact_div(t.abs().amax(dim=(-3, -1)).clamp(min=1e-8), FP8_MAX)
    q = (t / s.unsqueeze(-1).unsqueeze(-3)).to(torch.float8_e4m3fn)
    return q.flatten(-4, -3).flatten(-2)[..., :N, :K].contiguous(), s


def dequant_fp8_block(q: torch.Tensor, s: torch.Tensor, block: int = 128) -> torch.Tensor:
    N, K = q.shape[-2:]
    full = s.float().repeat_interleave(block, -2)[..., :N, :].repeat_interleave(block, -1)
    return q.float() * full[..., :K]


def fp8_w13_scale(s_gate: torch.Tensor, s_up: torch.Tensor) -> torch.Tensor:
    """Gate's scale rows then up's (each half keeps its own edge block), as the w13 contract."""
    return torch.cat([s_gate, s_up], -2)


def qdq_fp8_act(x: torch.Tensor, group: int = 128) -> torch.Tensor:
    """DeepSeek dynamic activation quant per token and `group` channels: s = max(amax,1e-4)/448."""
    K = x.shape[-1]
    xf = F.pad(x.float(), (0, (-K) % group)).unflatten(-1, (-1, group))
    s = exact_div(xf.abs().amax(-1, keepdim=True).clamp(min=1e-4), FP8_MAX)
    return ((xf / s).to(torch.float8_e4m3fn).float() * s).flatten(-2)[..., :K]


# ------------------------------------------------------------------------ FP8 per channel (§4d)
def quant_fp8_channel(w: torch.Tensor, per_tensor: bool = False):
    """float [..., N, K] -> (float8_e4m3fn [..., N, K], fp32 scale [..., N] or [...] when
    per_tensor): s = amax / 448 over the row (or the whole [N, K]), W = q * s (fused_moe's
    "fp8_channel" / "fp8_tensor"; W4A8 after w4a8.py's load-time conversion)."""
    a = w.float().abs().amax(-1)
    if per_tensor:
        a = a.amax(-1)
    s = exact_div(a, FP8_MAX).clamp(min=1e-12)
    full = s[..., None, None] if per_tensor else s[..., None]
    return (w.float() / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s


def dequant_fp8_channel(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """q [..., N, K] * scale [..., N] (per channel) or [...] (per tensor) -> float32."""
    full = s.float()[..., None, None] if s.dim() == q.dim() - 2 else s.float()[..., None]
    return q.float() * full


def qdq_fp8_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token e4m3 over the whole row, s = max(amax/448, 1e-12) (w4a8.py), float32."""
    xf = x.float()
    s = exact_div(xf.abs().amax(-1, keepdim=True), FP8_MAX).clamp(min=1e-12)
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s


def qdq_fp8_static(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Static per-tensor e4m3 with the scalar scale s, float32."""
    s = s.float()
    return (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * s


# ------------------------------------------------------------------------ the MoE itself
def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """Per-expert pair lists, each padded to block_m: list of (expert, [pair ids]) blocks."""
    flat = topk_ids.reshape(-1).long()
    blocks = []
    for e in range(num_experts):
        pairs = (flat == e).nonzero().flatten().tolist()
        for i in range(0, len(pairs), block_m):
            blocks.append((e, pairs[i:i + block_m]))
    return blocks


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                  topk_weights: torch.Tensor, topk_ids: torch.Tensor, *, act_qdq=None,
                  act_qdq2=None, n_shared: int = 0,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Dequantized-weight reference: y = sum_k w_k down(silu(gate x) * up x), in `dtype`.

    w13 [E, 2I, H] / w2 [E, H, I] are float (already dequantized); act_qdq (optional) is applied
    to the expert inputs and (unless act_qdq2 is given) to the intermediate activation (dynamic
    activation quantization); act_qdq2: the intermediate's own (e.g. a static scale).
    """
    act_qdq2 = act_qdq2 or act_qdq
    E = w13.shape[0]
    tw, ids = with_shared(topk_weights, topk_ids, E - n_shared, n_shared)
    inter = w2.shape[-1]
    xd = x.to(dtype)
    if act_qdq is not None:
        xd = act_qdq(x.float()).to(dtype)
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=dtype, device=x.device)
    for e in ids.unique().tolist():
        tok, kk = (ids == e).nonzero(as_tuple=True)
        h = xd[tok] @ w13[e].to(dtype).T
        a = F.silu(h[:, :inter]) * h[:, inter:]
        if act_qdq2 is not None:
            a = act_qdq2(a.float()).to(dtype)
        out.index_add_(0, tok, (a @ w2[e].to(dtype).T) * tw[tok, kk].to(dtype)[:, None])
    return out
