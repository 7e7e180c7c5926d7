"""GPU start-up: compile every batch-shaped decode kernel launch before serving.

An eager decode step (decodes beside a prefill chunk; every step with --enforce-eager) would
otherwise compile a Triton variant on a request's path (~1 s each). Each function takes the
ModelRunner (`runner`: its model, device, dtype, block_size, kv_dtype, config) and returns the
number of launches it ran; `warm_decode_kernels(runner)` runs them all.
"""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger(__name__)


def warm_decode_kernels(runner) -> None:
    """Eager steps (decodes beside a prefill chunk; every step with --enforce-eager) run the
    MLA decode kernel at any batch size up to max_num_seqs, and its compiled variant
    depends on the batch size: compile them all now (kernels/mla_decode.warmup_decode;
    session 9's serving run met four such compiles, ~1 s each, on requests' paths)."""
    from atom_stream.models import mla
    attn = next((m for m in runner.model.modules() if isinstance(m, mla.MLA)), None)
    if attn is None or not attn.use_kernels:
        return
    from atom_stream.kernels.mla_decode import warmup_decode
    t0 = time.perf_counter()
    n = warmup_decode(attn.num_heads, attn.r, attn.rope, runner.block_size, runner.kv_dtype,
                      runner.dtype, runner.device, runner.config.max_num_seqs,
                      v_dim=attn.v_dim, uv_max_batch=mla.MERGE_UV_MAX_B)
    n += absorb_warmup(runner, attn)
    n += gemv_warmup(runner)
    n += norm_gemv_warmup(runner)
    n += splitk_warmup(runner, attn)
    logger.info("decode attention warm-up: %d launch variants in %.1fs", n,
                time.perf_counter() - t0)


def absorb_warmup(runner, attn) -> int:
    """Compile the decode path's other batch-shaped launches that an eager decode step
    would otherwise compile on a request's path (--enforce-eager has no graph capture to
    do it): mla_q_absorb (one variant), the q_b, q_a + kv_a and o_proj GEMVs at each row
    count they take."""
    from atom_stream.models import mla
    n = 0
    dev, dt = runner.device, runner.dtype
    if mla.Q_ABSORB_MAX_B > 0 and attn.w_uk is not None and attn.rope_kernel_ok:
        from atom_stream.kernels.mla_q_absorb import mla_q_absorb
        q = torch.zeros(1, attn.num_heads, attn.nope + attn.rope, dtype=dt, device=dev)
        mla_q_absorb(q, attn.w_uk, attn.rotary.cos, attn.rotary.sin,
                     torch.zeros(1, dtype=torch.long, device=dev))
        n += 1
    from atom_stream.kernels.gemv import MAX_M
    from atom_stream.layers.linear import dense_linear
    gemvs = []  # (weight [out, in], fewest and most GEMV rows, its config)
    qb, o = getattr(attn, "q_b_proj", None), attn.o_proj
    if qb is not None and qb.quant_method is None:
        gemvs.append((qb.weight, 1, mla.QB_GEMV_MAX_M, mla.QB_GEMV_CONFIG))
    if attn.w_q_abs is not None:  # decode-only steps of >= ABSORB_QB_MIN_B rows read it
        gemvs.append((attn.w_q_abs, max(1, mla.ABSORB_QB_MIN_B), mla.QB_GEMV_MAX_M,
                      mla.QB_GEMV_CONFIG))
    if attn.w_qkv_a is not None:
        gemvs.append((attn.w_qkv_a, 1, mla.QKV_GEMV_MAX_M, mla.QKV_GEMV_CONFIG))
    if o.quant_method is None:
        gemvs.append((o.weight, 1, o.gemv_max_m, o.gemv_config))
    for w, min_m, max_m, cfg in gemvs:
        for m in range(min_m, min(max_m, MAX_M) + 1):
            dense_linear(torch.zeros(m, w.shape[1], dtype=dt, device=dev), w, max_m, cfg)
            n += 1
    return n + qb_prologue_warmup(runner, attn)


def qb_prologue_warmup(runner, attn) -> int:
    """Compile kernels/mla_prologue.qb_prologue (one-token steps, models/mla QB_PROLOGUE) for
    the runner's cache dtype; a padding slot, so no cache entry is written. Returns 0 or 1."""
    from atom_stream.models import mla
    if not attn.fused_prologue:
        return 0
    dev, dt = runner.device, runner.dtype
    ql, width = attn.cfg.q_lora_rank, attn.r + attn.rope
    q_c = torch.zeros(1, ql, dtype=dt, device=dev)
    w = attn.qb_prologue_weight(q_c, absorbed=False)  # the model's own condition
    if w is None:
        return 0
    from atom_stream.kernels.mla_prologue import qb_prologue
    cache = torch.zeros(1, 1, width, dtype=runner.kv_dtype, device=dev)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    qb_prologue(q_c, torch.zeros(1, width, dtype=dt, device=dev), w,
                attn.q_a_layernorm.weight, attn.kv_a_layernorm.weight, attn.q_a_layernorm.eps,
                attn.kv_a_layernorm.eps, attn.rotary.cos, attn.rotary.sin, zero, cache,
                zero - 1, attn.k_scale, config=mla.QB_GEMV_CONFIG)
    return 1


def gemv_warmup(runner) -> int:
    """Compile kernels/gemv.py at each row count the MoE layers' router + shared gate/up
    and shared down take it (models/deepseek_v3 *_GEMV_MAX_M; 0 = cuBLAS: nothing to
    compile). Returns the number of launches."""
    from atom_stream.kernels.gemv import MAX_M
    from atom_stream.models import deepseek_v3 as dv3
    n, dev, dt = 0, runner.device, runner.dtype
    moe = next((m for m in runner.model.modules()
                if isinstance(m, dv3.MoE) and m.w_router_shared is not None), None)
    if moe is None:
        return 0
    shared = moe.shared_experts
    for m in range(1, MAX_M + 1):
        x = torch.zeros(m, runner.model.config.hidden_size, dtype=dt, device=dev)
        if m <= dv3.ROUTER_GEMV_MAX_M:
            moe._router_and_shared(x)
            n += 1
        if shared is not None and m <= dv3.SHARED_DOWN_GEMV_MAX_M:
            w = shared.down_proj.weight
            shared.down_add(torch.zeros(m, w.shape[1], dtype=dt, device=dev), x)
            n += 1
    return n


def norm_gemv_warmup(runner) -> int:
    """Compile kernels/gemv.py's `norm=` variants that one-row steps take (models/kernel_path
    NORM_GEMV): the q_a + kv_a GEMV with a residual and without (layer 0's input norm), the
    MoE router + shared gate/up GEMV with the normed row written out. Returns the launches."""
    from atom_stream.models import deepseek_v3 as dv3
    from atom_stream.models import kernel_path
    layer = next((m for m in runner.model.modules() if isinstance(m, dv3.DecoderLayer)), None)
    if not kernel_path.NORM_GEMV or layer is None:
        return 0
    x = torch.zeros(1, runner.model.config.hidden_size, dtype=runner.dtype, device=runner.device)
    n, attn = 0, layer.self_attn
    if attn.fused_prologue:
        for res in (None, x):
            attn.qkv_a(kernel_path.PreNorm(x, res, layer.input_layernorm))
            n += 1
    moe = next((m for m in runner.model.modules()
                if isinstance(m, dv3.MoE) and m.w_router_shared is not None), None)
    if moe is not None:
        moe._router_and_shared(kernel_path.PreNorm(x, x, layer.post_attention_layernorm))
        n += 1
    return n


def splitk_warmup(runner, attn) -> int:
    """Compile kernels/gemm_splitk.py at each launch variant (`splitk_warmup_rows`) of the
    row counts that the projections taking it reach (models/mla QKV_SPLITK,
    models/deepseek_v3 ROUTER_SPLITK) and allocate its workspaces. Returns the number of
    launches."""
    from atom_stream.layers.linear import dense_linear
    from atom_stream.models import deepseek_v3 as dv3
    from atom_stream.models import mla
    sites = []  # (fewest rows that take split-K, most, the call on x [m, hidden])
    if attn.w_qkv_a is not None:
        sites.append((mla.QKV_GEMV_MAX_M + 1, mla.QKV_SPLITK[0], lambda x: dense_linear(
            x, attn.w_qkv_a, mla.QKV_GEMV_MAX_M, mla.QKV_GEMV_CONFIG, mla.QKV_SPLITK)))
    moe = next((m for m in runner.model.modules()
                if isinstance(m, dv3.MoE) and m.w_router_shared is not None), None)
    if moe is not None:
        sites.append((dv3.ROUTER_GEMV_MAX_M + 1, dv3.ROUTER_SPLITK[0],
                      moe._router_and_shared))
    n, hidden = 0, runner.model.config.hidden_size
    for lo, hi, call in sites:
        for m in splitk_warmup_rows(lo, hi):
            call(torch.zeros(m, hidden, dtype=runner.dtype, device=runner.device))
            n += 1
    return n


def splitk_warmup_rows(lo: int, hi: int) -> list[int]:
    """One row count per compiled variant of kernels/gemm_splitk.py over lo..hi rows (capped
    at its MAX_M; past it the callers take cuBLAS): the variant is set by the padded row count
    (block_m) and by Triton's specialization of the integer M (M == 1 and M a multiple of 16
    are compiles of their own), so e.g. 2..32 rows need 2, 16, 17 and 32."""
    from atom_stream.kernels.gemm_splitk import MAX_M, block_m
    rows, seen = [], set()
    for m in range(max(lo, 1), min(hi, MAX_M) + 1):
        key = (block_m(m), m == 1, m % 16 == 0)
        if key not in seen:
            seen.add(key)
            rows.append(m)
    return rows
