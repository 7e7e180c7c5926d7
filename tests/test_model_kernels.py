"""The model's kernel path (models/kernel_path.py) against its torch reference path.

One tiny DeepseekV3 (dims the Triton kernels take: kv_lora 32, rope 16; 8 experts in 4 groups,
dense first layer, shared expert; q_lora 32 and q_lora None), the same random weights in two
models: the reference runs the torch path on the CPU, the other runs the kernel path (forced on
the CPU under TRITON_INTERPRET=1, set before the kernel modules are imported; natively on CUDA
with `-m gpu`). Two steps over scattered paged caches (block 4): a prefill of three sequences,
then a mixed batch (two decodes + a chunk with a cached prefix + a new prompt). Checked each step:
hidden states, logits and every written cache slot (norm-relative), unwritten slots bit-equal,
the routing seen by the `record` hook, and (spy) that every kernel really ran.

fp32 (CPU): the paths agree to 2e-5 and the routing is token-dependent and identical. fp32 on
GPUs: 2e-3 (mla_decode's tl.dot runs fp32 operands in TF32, Triton's default) with the decisive
routing described next.
bf16: one bf16 ulp is 4e-3 and a random 2-layer model amplifies rounding: the bf16 reference is
itself ~1e-2 from an fp32 run of the same weights, and a near-tied expert choice flips on a
1-ulp difference (a whole row then differs). So in bf16 (a) the selection is made decisive by a
correction bias of distinct powers of two (gaps > any sigmoid difference; the weights stay token-
dependent; fp32 covers token-dependent selection), (b) the two paths must agree to 4e-2, and
(c) the kernel path must be as accurate as the reference against the fp32 run (error <= 1.5x the
reference's + 2e-3 on GPUs; the decode kernel rounds its softmax tile to bf16 for the PV dot).
Interpreter caveats (CPU, bf16): Triton 3.x's interpreter casts fp32 -> bf16 by truncation, not
round-to-nearest-even (measured: every kernel-side bf16 store equals the truncated fp32 value),
so there the kernel path's error against fp32 is ~1.5x the reference's and (c) allows 2x; and it
mis-computes bf16 tl.dot (kernels/mla_decode gives garbage in bf16), so the CPU bf16 run calls
mla_decode on fp32 copies of q and the cache (same values) and casts back. `-m gpu` runs
everything natively.

Op count: the kernel path's decode step launches at most OP_BUDGET torch compute ops per layer
(measured with the dispatcher; the reference's count is printed beside). Fresh random inputs.
"""

from __future__ import annotations

import collections
import os

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("kv_store", "norm_rope", "moe_routing", "mla_decode", "silu_mul",
                            "mla_q_absorb")

from atom_stream.kernels import kv_store as kvs_mod
from atom_stream.kernels import mla_decode as mla_mod
from atom_stream.kernels import mla_prefill as prefill_mod
from atom_stream.kernels import mla_prologue as prologue_mod
from atom_stream.kernels import mla_q_absorb as absorb_mod
from atom_stream.kernels import moe_routing as routing_mod
from atom_stream.kernels import norm_rope as nr_mod
from atom_stream.kernels import silu_mul as silu_mod

from atom_stream.config import ModelConfig
from atom_stream.layers.attention import AttentionMetadata
from atom_stream.loader import init_dummy_weights
from atom_stream.models import deepseek_v3 as dsv3
from atom_stream.models import kernel_path
from atom_stream.models import mla as mla_model
from atom_stream.models.deepseek_v3 import DecoderLayer, DeepseekV3ForCausalLM, MoE
from atom_stream.models.mla import MLA

cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")
BLOCK, NUM_BLOCKS, MAX_POS = 4, 48, 128
# fp32 on GPUs: Triton's tl.dot takes fp32 operands in TF32 by default (mla_decode), ~1e-3
TOL = {torch.float32: 2e-3 if GPU else 2e-5, torch.bfloat16: 4e-2}


def tiny_config(q_lora: int | None, **over) -> ModelConfig:
    raw = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96,
        "moe_intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
        "q_lora_rank": q_lora, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 16, "v_head_dim": 16, "n_routed_experts": 8, "n_shared_experts": 1,
        "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
        "norm_topk_prob": True, "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": MAX_POS, "hidden_act": "silu",
        "rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    }
    raw.update(over)
    return ModelConfig.from_dict(raw)


def build_models(cfg: ModelConfig, dtype, device, seed: int, decisive_routing: bool = False,
                 with_fp32: bool = False):
    """(reference model on the CPU, kernel-path model on `device`[, fp32 reference]) with equal
    weights. Norm weights and correction biases are randomized; router weights are bf16 values,
    as in real checkpoints (so the kernel path's model-dtype router copy is exact).
    decisive_routing: bias = 2.5 * 2^perm(E), so every selection is decided by the bias."""
    ref = DeepseekV3ForCausalLM(cfg, MAX_POS, dtype)
    init_dummy_weights(ref, seed)
    g = torch.Generator().manual_seed(seed + 100)
    E = cfg.n_routed_experts
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(2.5 * 2.0 ** torch.randperm(E, generator=g).float() if decisive_routing
                        else 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(p.to(torch.bfloat16).float())
    models = [ref, DeepseekV3ForCausalLM(cfg, MAX_POS, dtype, device)]
    if with_fp32:
        models.append(DeepseekV3ForCausalLM(cfg, MAX_POS, torch.float32))
    for m in models:
        if m is not ref:
            m.load_state_dict(ref.state_dict())
        m.process_weights_after_loading()
        m.eval()
    return models


class Pool:
    """Scattered paged caches, one set per model, initialized with the same garbage."""

    def __init__(self, cfg: ModelConfig, dtype, device, seed: int, kv_dtype=None):
        g = torch.Generator().manual_seed(seed)
        dtype = kv_dtype or dtype
        self.free = torch.randperm(NUM_BLOCKS, generator=g).tolist()
        shape = (NUM_BLOCKS, BLOCK, cfg.kv_cache_dim)
        init = [torch.randn(shape, generator=g).to(dtype) for _ in range(cfg.num_hidden_layers)]
        self.ref = [c.clone() for c in init]
        self.fast = [c.clone().to(device) for c in init]
        self.fp32 = [c.float() for c in init]
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}
        self.device = device

    def step(self, parts: list[tuple[int, int]], num_decodes: int):
        """parts: (seq id, new tokens), decodes (1 token each) first. Returns positions and
        metadata for the reference (CPU) and the kernel-path device."""
        qsl, seq_lens, slots, pos = [0], [], [], []
        for sid, n in parts:
            start = self.lens.get(sid, 0)
            table = self.tables.setdefault(sid, [])
            while len(table) * BLOCK < start + n:
                table.append(self.free.pop())
            for p in range(start, start + n):
                slots.append(table[p // BLOCK] * BLOCK + p % BLOCK)
                pos.append(p)
            self.lens[sid] = start + n
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
        width = max(len(self.tables[sid]) for sid, _ in parts)
        bt = torch.tensor([self.tables[sid] + [0] * (width - len(self.tables[sid]))
                           for sid, _ in parts], dtype=torch.int32)
        out = []
        for dev in ("cpu", self.device):
            md = AttentionMetadata(qsl, seq_lens, bt.to(dev), torch.tensor(slots).to(dev),
                                   num_decodes, BLOCK,
                                   decode_seq_lens=torch.tensor(seq_lens[:num_decodes],
                                                                dtype=torch.int32).to(dev))
            out.append((torch.tensor(pos).to(dev), md))
        return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def spy(monkeypatch):
    """Counts the kernel entry points the model calls (it imports them per call)."""
    calls = collections.Counter()
    for mod, name in ((nr_mod, "fused_add_rmsnorm"), (nr_mod, "rope_interleaved_"),
                      (routing_mod, "moe_routing"), (kvs_mod, "kv_store"),
                      (mla_mod, "mla_decode"), (prefill_mod, "mla_prefill"),
                      (prologue_mod, "mla_prologue"), (absorb_mod, "mla_q_absorb")):
        fn = getattr(mod, name)

        def wrapped(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)
        monkeypatch.setattr(mod, name, wrapped)
    return calls


def upcast_mla_decode(monkeypatch):
    """CPU bf16 only: the interpreter mis-computes bf16 tl.dot; run mla_decode and mla_q_absorb
    on fp32 copies (q's rotated rope half copied back)."""
    fn, fn_abs = mla_mod.mla_decode, absorb_mod.mla_q_absorb

    def run(q_nope, q_pe, kv_cache, *a, **k):
        return fn(q_nope.float(), q_pe.float(), kv_cache.float(), *a, **k).to(q_nope.dtype)

    def run_abs(q, w_uk, *a, **k):
        qf = q.float()
        q_lat = fn_abs(qf, w_uk.float(), *a, **k)
        q.copy_(qf)
        return q_lat.to(q.dtype)
    monkeypatch.setattr(mla_mod, "mla_decode", run)
    monkeypatch.setattr(absorb_mod, "mla_q_absorb", run_abs)


def run_parity(q_lora, dtype, device, seed, spy, kv_dtype=None, **dims):
    """kv_dtype: the caches' dtype (default: the model's), e.g. fp8 (value = code * k_scale 1)."""
    cfg = tiny_config(q_lora, **dims)
    bf16 = dtype != torch.float32
    decisive = bf16 or GPU  # GPU fp32: TF32 attention noise could flip a near-tied expert
    ref, fast, *r32 = build_models(cfg, dtype, device, seed, decisive_routing=decisive,
                                   with_fp32=bf16)
    pool = Pool(cfg, dtype, device, seed + 1, kv_dtype)
    g = torch.Generator().manual_seed(seed + 2)
    moes = [(a.mlp, b.mlp) for a, b in zip(ref.model.layers, fast.model.layers)
            if isinstance(a.mlp, MoE)]
    # prefill only; decodes beside prefill chunks; decode only (the q_absorb launch)
    steps = [([(0, 5), (1, 9), (2, 6)], 0), ([(0, 1), (1, 1), (2, 7), (3, 4)], 2),
             ([(0, 1), (1, 1), (2, 1), (3, 1)], 4)]
    written = torch.zeros(NUM_BLOCKS * BLOCK, dtype=torch.bool)  # slots of all steps so far
    tol = TOL[dtype]
    fp8 = kv_dtype is not None and kv_dtype.itemsize == 1
    if fp8:  # the fp8 decode's dots take q and p in fp16 (as on the GPU)
        tol = max(tol, 3e-3)
    for parts, nd in steps:
        (pos_r, md_r), (pos_f, md_f) = pool.step(parts, nd)
        ids = torch.randint(0, cfg.vocab_size, (len(pos_r),), generator=g)
        for a, b in moes:
            a.record, b.record = [], []
        h_ref = ref(ids, pos_r, pool.ref, md_r)
        with kernel_path.force_kernels(not GPU):
            h_fast = fast(ids.to(device), pos_f, pool.fast, md_f)
        lg_ref, lg_fast = ref.compute_logits(h_ref), fast.compute_logits(h_fast)
        assert torch.isfinite(h_fast).all() and h_fast.dtype == dtype
        assert rel(h_fast, h_ref) < tol, f"hidden: {rel(h_fast, h_ref):.2e}"
        assert rel(lg_fast, lg_ref) < tol, f"logits: {rel(lg_fast, lg_ref):.2e}"
        if r32:
            h32 = r32[0](ids, pos_r, pool.fp32, md_r)
            e_fast, e_ref = rel(h_fast, h32), rel(h_ref, h32)
            bound = (1.5 if GPU else 2.0) * e_ref + 2e-3
            assert e_fast <= bound, f"vs fp32: {e_fast:.2e} (reference {e_ref:.2e})"
        for a, b in moes:  # the routing actually taken, in the record hook
            ra, rb = a.record[0].sort(-1).values, b.record[0].long().cpu().sort(-1).values
            assert torch.equal(ra, rb)
            assert decisive or ra.unique(dim=0).shape[0] > 1  # token-dependent selection
        written[md_r.slot_mapping] = True
        for layer, (cr, cf) in enumerate(zip(pool.ref, pool.fast)):
            cr, cf = cr.view(-1, cfg.kv_cache_dim), cf.view(-1, cfg.kv_cache_dim).cpu()
            if fp8:  # bit patterns (float8 has no equality kernel everywhere)
                cr, cf = cr.view(torch.uint8), cf.view(torch.uint8)
            assert torch.equal(cr[~written], cf[~written]), f"layer {layer}: stray writes"
            if fp8:  # the same values rounded to fp8 may land one code apart
                cr, cf = cr.view(kv_dtype), cf.view(kv_dtype)
            assert rel(cf[written], cr[written]) < (2e-2 if fp8 else tol), f"layer {layer} cache"
    n = cfg.num_hidden_layers
    attn = fast.model.layers[0].self_attn
    # the fused MLA prologue (default on; needs the fused q_a / kv_a weight, i.e. q_lora, and the
    # attention kernels' widths): both latent norms, k_pe's RoPE and the KV store in one launch
    fused = mla_model.FUSED_PROLOGUE and attn.use_kernels and attn.w_qkv_a is not None
    assert spy["mla_prologue"] == 3 * n * fused
    # per step: 2 norms per layer + final, and the latent norms (q_a only with q_lora)
    latent = 0 if fused else n * (2 if q_lora else 1)
    assert spy["fused_add_rmsnorm"] == 3 * (2 * n + 1) + 3 * latent
    # the decode-only step (4 rows) rotates q_pe inside mla_q_absorb when that runs
    q_abs = fused and mla_model.Q_ABSORB_MAX_B >= 4
    assert spy["mla_q_absorb"] == n * q_abs
    assert spy["rope_interleaved_"] == (3 - q_abs) * n * attn.rope_kernel_ok
    assert spy["kv_store"] == 3 * n * attn.use_kernels * (not fused)
    assert spy["mla_decode"] == 2 * n * attn.use_kernels  # steps 2 and 3
    assert spy["moe_routing"] == 3 * len(moes)
    # the Triton prefill attention: 16-bit on GPUs only (3 prompts, then 2 chunks, per layer)
    assert spy["mla_prefill"] == (5 * n if GPU and bf16 else 0)
    if q_lora:
        assert all(lyr.self_attn.w_qkv_a is not None for lyr in fast.model.layers)


@cpu_only
@pytest.mark.parametrize("q_lora", [32, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_matches_reference_interpreter(q_lora, dtype, spy, monkeypatch):
    if dtype == torch.bfloat16:
        upcast_mla_decode(monkeypatch)
    run_parity(q_lora, dtype, "cpu", seed=3 if q_lora else 4, spy=spy)


@cpu_only
def test_kernel_path_unfused_absorb_matches_reference_interpreter(spy, monkeypatch):
    """mla.Q_ABSORB_MAX_B = MERGE_UV_MAX_B = 0 (the batch sizes above them): W_UK / W_UV as
    bmm's and q_pe's RoPE in its own launch, still the reference's outputs; the fused launch
    is never called."""
    monkeypatch.setattr(mla_model, "Q_ABSORB_MAX_B", 0)
    monkeypatch.setattr(mla_model, "MERGE_UV_MAX_B", 0)
    run_parity(32, torch.float32, "cpu", seed=13, spy=spy)
    assert spy["mla_q_absorb"] == 0 and spy["rope_interleaved_"] > 0


@cpu_only
@pytest.mark.parametrize("q_lora", [32, None])
def test_kernel_path_fp8_cache_matches_reference_interpreter(q_lora, spy):
    """An e4m3fn cache at widths the fp8 decode v5 takes (latent 32, rope 32): the model's
    decode goes through mla_decode's default ("auto" -> v5) and matches the reference path
    reading the same fp8 cache."""
    run_parity(q_lora, torch.float32, "cpu", seed=11, spy=spy, kv_dtype=torch.float8_e4m3fn,
               qk_rope_head_dim=32)


@pytest.mark.parametrize("dims", [{"kv_lora_rank": 16, "qk_rope_head_dim": 8},
                                  {"kv_lora_rank": 24, "qk_rope_head_dim": 12}],
                         ids=["demo-widths", "odd-rope"])
def test_kernel_path_torch_fallbacks(dims, spy):
    """Widths the attention kernels do not take (the demo model's kv_lora 32 / rope 8 on GPUs):
    the kernel path keeps its fused norms/routing and runs the torch KV store / decode
    (and, for rope 12 = 6 pairs, the torch rotation copied back in place)."""
    run_parity(32, torch.float32, "cuda" if GPU else "cpu", seed=7, spy=spy, **dims)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("q_lora", [32, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_matches_reference_gpu(q_lora, dtype, spy):
    run_parity(q_lora, dtype, "cuda", seed=5 if q_lora else 6, spy=spy)


@pytest.fixture
def gemv_calls(monkeypatch):
    """Counter of kernels/gemv.gemv calls by weight shape (the callers import it lazily)."""
    from atom_stream.kernels import gemv as gemv_mod
    calls = collections.Counter()
    fn = gemv_mod.gemv

    def counted(x, w, **k):
        calls[tuple(w.shape)] += 1
        return fn(x, w, **k)
    monkeypatch.setattr(gemv_mod, "gemv", counted)
    return calls


@pytest.mark.gpu
@needs_gpu
def test_kernel_path_with_q_b_gemv_matches_reference_gpu(spy, monkeypatch, gemv_calls):
    """mla.QB_GEMV_MAX_M = 4 (default 2; the test's decode step has 4 rows): q_b through
    kernels/gemv.py on that step only; still the reference's outputs."""
    monkeypatch.setattr(mla_model, "QB_GEMV_MAX_M", 4)
    calls = gemv_calls
    run_parity(32, torch.bfloat16, "cuda", seed=23, spy=spy)
    cfg = tiny_config(32)
    qb = (cfg.num_attention_heads * cfg.qk_head_dim, 32)
    assert calls == {qb: cfg.num_hidden_layers}, calls


@pytest.mark.gpu
@needs_gpu
def test_kernel_path_with_router_shared_gemv_matches_reference_gpu(spy, monkeypatch, gemv_calls):
    """deepseek_v3's ROUTER / SHARED_DOWN_GEMV_MAX_M = 4 (default 1): the fused router + shared
    gate/up (fp32 out) and the shared down (adding into the routed output in place) through
    kernels/gemv.py on the 4-row decode step only; still the reference's outputs and routing;
    the runner's warm-up compiles each at rows 1..4."""
    import types

    from atom_stream.engine import kernel_warmup
    from atom_stream.models import deepseek_v3 as dv3
    for name in ("ROUTER_GEMV_MAX_M", "SHARED_DOWN_GEMV_MAX_M"):
        monkeypatch.setattr(dv3, name, 4)
    calls = gemv_calls
    run_parity(32, torch.bfloat16, "cuda", seed=29, spy=spy)
    cfg = tiny_config(32)
    moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
    shared_i = cfg.moe_intermediate_size * cfg.n_shared_experts
    want = {(cfg.n_routed_experts + 2 * shared_i, cfg.hidden_size): moe_layers,
            (cfg.hidden_size, shared_i): moe_layers}
    assert calls == want, calls
    calls.clear()
    _, fast = build_models(cfg, torch.bfloat16, "cuda", seed=31)
    fake = types.SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16, model=fast)
    assert kernel_warmup.gemv_warmup(fake) == 8
    assert sum(calls.values()) == 8


@cpu_only
@pytest.mark.parametrize("qkv_max_m,absorb_min_b", [(0, 8), (2, 8), (2, 1)])
def test_runner_absorb_warmup_runs_at_the_model_widths(monkeypatch, qkv_max_m, absorb_min_b):
    """engine/kernel_warmup.absorb_warmup (GPU start-up: compiles mla_q_absorb, the q_b GEMV's
    and the q_a + kv_a GEMV's row counts before serving) runs on the model's own weights and
    shapes; here on the CPU (interpreter; the GEMV is GPU-only, so F.linear stands in)."""
    import types

    from atom_stream.engine import kernel_warmup
    monkeypatch.setattr(mla_model, "QKV_GEMV_MAX_M", qkv_max_m)
    monkeypatch.setattr(mla_model, "ABSORB_QB", True)
    monkeypatch.setattr(mla_model, "ABSORB_QB_MIN_B", absorb_min_b)
    cfg = tiny_config(32)
    ref, _ = build_models(cfg, torch.float32, "cpu", seed=30)
    attn = ref.model.layers[0].self_attn
    fake = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32)
    n = kernel_warmup.absorb_warmup(fake, attn)
    qkv = qkv_max_m if attn.w_qkv_a is not None else 0
    qb = min(mla_model.QB_GEMV_MAX_M, 4)
    # the folded q_b (ABSORB_QB) only at the GEMV's row counts a decode step may take it
    absorbed = max(0, qb - absorb_min_b + 1) if attn.w_q_abs is not None else 0
    assert n == 1 + qb + absorbed + qkv + attn.o_proj.gemv_max_m


@cpu_only
def test_runner_gemv_warmup_counts_the_switched_gemms(monkeypatch):
    """engine/kernel_warmup.gemv_warmup: nothing at the defaults (cuBLAS), one launch per row
    count and switched GEMM otherwise (on the CPU the torch paths stand in for the GEMV)."""
    import types

    from atom_stream.engine import kernel_warmup
    from atom_stream.models import deepseek_v3 as dv3
    cfg = tiny_config(32)
    ref, _ = build_models(cfg, torch.float32, "cpu", seed=33)
    fake = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, model=ref)
    for name in ("ROUTER_GEMV_MAX_M", "SHARED_DOWN_GEMV_MAX_M"):
        monkeypatch.setattr(dv3, name, 0)
    assert kernel_warmup.gemv_warmup(fake) == 0
    monkeypatch.setattr(dv3, "ROUTER_GEMV_MAX_M", 1)
    monkeypatch.setattr(dv3, "SHARED_DOWN_GEMV_MAX_M", 4)
    assert any(getattr(m.mlp, "w_router_shared", None) is not None for m in ref.model.layers)
    assert kernel_warmup.gemv_warmup(fake) == 1 + 4


def test_reference_path_untouched_on_cpu(spy):
    """Unforced, a CPU forward never calls a kernel (the CPU engine's reference path)."""
    cfg = tiny_config(32)
    ref, _ = build_models(cfg, torch.float32, "cpu", seed=8)
    pool = Pool(cfg, torch.float32, "cpu", 9)
    (pos, md), _ = pool.step([(0, 6)], 0)
    ref(torch.arange(6), pos, pool.ref, md)
    assert sum(spy.values()) == 0


def test_fused_weights_are_views():
    """q_a/kv_a and gate/up fusion keeps one copy: the Linears' weights alias the fused one."""
    cfg = tiny_config(32)
    ref, _ = build_models(cfg, torch.float32, "cpu", seed=10)
    attn = ref.model.layers[0].self_attn
    assert attn.w_qkv_a.shape == (32 + 32 + 16, 64)
    assert attn.q_a_proj.weight.data_ptr() == attn.w_qkv_a.data_ptr()
    assert torch.equal(attn.w_qkv_a[32:], attn.kv_a_proj_with_mqa.weight)
    mlp = ref.model.layers[0].mlp
    assert mlp.gate_proj.weight.data_ptr() == mlp.w_gate_up.data_ptr()
    assert torch.equal(mlp.w_gate_up[96:], mlp.up_proj.weight)


# --------------------------------------------------------------------------- op counts
# torch compute ops per decoder layer of a pure decode step (kernel path), measured with the
# dispatcher (views and allocations excluded; each Triton launch and the routed experts count
# one). Update these when a change removes ops; a change that adds ops fails here.
# silu_mul: one launch for the SwiGLU activation; the fused MLA prologue (default since
# session 14): one launch for both latent norms, k_pe's RoPE and the KV store (was 15 / 19);
# session 16: W_UK + q_pe's RoPE in one launch, W_UV inside mla_decode's merge (was 13 / 17)
OP_BUDGET = {"dense": 11, "moe": 15}


def count_decode_ops(model, pool, cfg, force: bool):
    """Per decoder layer: Counter of op names on one decode step of 4 sequences."""
    from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

    current = {"layer": None}
    counts: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if (current["layer"] is not None and not func.is_view
                    and name not in ("empty", "empty_strided", "empty_like", "lift_fresh",
                                     "detach", "alias")):
                counts[current["layer"]][name] += 1
            return func(*args, **(kwargs or {}))

    def opaque(fn, label):
        def run(*a, **k):
            if current["layer"] is not None:
                counts[current["layer"]][label] += 1
            with _disable_current_modes():
                return fn(*a, **k)
        return run

    patches = [(nr_mod, "fused_add_rmsnorm"), (nr_mod, "rope_interleaved_"),
               (routing_mod, "moe_routing"), (kvs_mod, "kv_store"), (mla_mod, "mla_decode"),
               (silu_mod, "silu_mul"), (prologue_mod, "mla_prologue"),
               (absorb_mod, "mla_q_absorb")]
    saved = [(m, n, getattr(m, n)) for m, n in patches]
    hooks = []
    try:
        for m, n, fn in saved:
            setattr(m, n, opaque(fn, "triton:" + n))
        for i, layer in enumerate(model.model.layers):
            hooks.append(layer.register_forward_pre_hook(
                lambda mod, a, i=i: current.update(layer=i)))
            hooks.append(layer.register_forward_hook(lambda *a: current.update(layer=None)))
            if isinstance(layer.mlp, MoE):
                layer.mlp.experts.forward = opaque(layer.mlp.experts.forward, "experts")
        (pos, md), _ = pool.step([(s, 1) for s in range(4)], 4)
        # no_grad, not inference_mode: under inference_mode composite ops (linear, einsum, to)
        # reach the mode undecomposed; here they show as the ops that launch kernels
        with torch.no_grad(), kernel_path.force_kernels(force), Count():
            model.model(torch.arange(4), pos, pool.ref, md)
    finally:
        for m, n, fn in saved:
            setattr(m, n, fn)
        for h in hooks:
            h.remove()
    return counts


@cpu_only
def test_decode_op_count_per_layer(capsys):
    cfg = tiny_config(32)
    ref, _ = build_models(cfg, torch.bfloat16, "cpu", seed=12)
    pool = Pool(cfg, torch.bfloat16, "cpu", 13)
    (pos, md), _ = pool.step([(s, 5 + s) for s in range(4)], 0)
    ref(torch.arange(pos.shape[0]) % 256, pos, pool.ref, md)
    (pos, md), _ = pool.step([(s, 1) for s in range(4)], 4)
    with kernel_path.force_kernels():  # warm-up: one-time probes (router mm) stay uncounted
        ref(torch.arange(4), pos, pool.ref, md)
    totals = {}
    for force in (False, True):
        counts = count_decode_ops(ref, pool, cfg, force)
        for kind, i in (("dense", 0), ("moe", 1)):
            totals[(force, kind)] = sum(counts[i].values())
            with capsys.disabled():
                print(f"\n{'kernel' if force else 'reference'} {kind} layer: "
                      f"{totals[(force, kind)]} ops {dict(counts[i])}")
        if force:
            assert counts[1]["triton:moe_routing"] == 1 and counts[1]["triton:mla_decode"] == 1
    for kind, budget in OP_BUDGET.items():
        assert totals[(True, kind)] <= budget, f"{kind}: {totals[(True, kind)]} > {budget}"
        assert totals[(True, kind)] < totals[(False, kind)] / 2
    assert isinstance(ref.model.layers[1], DecoderLayer)


# --------------------------------------------------------------------------- ABSORB_QB
def compare_steps(ref, fast, cfg, dtype, device, seed, steps):
    """Run `steps` ((seq id, new tokens) parts, num_decodes) on both models over fresh pools:
    hidden states and logits of the kernel path within TOL of the reference at every step."""
    pool = Pool(cfg, dtype, device, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    for parts, nd in steps:
        (pos_r, md_r), (pos_f, md_f) = pool.step(parts, nd)
        ids = torch.randint(0, cfg.vocab_size, (len(pos_r),), generator=g)
        h_ref = ref(ids, pos_r, pool.ref, md_r)
        with kernel_path.force_kernels(not GPU):
            h_fast = fast(ids.to(device), pos_f, pool.fast, md_f)
        assert torch.isfinite(h_fast).all()
        assert rel(h_fast, h_ref) < TOL[dtype], f"hidden: {rel(h_fast, h_ref):.2e}"
        assert rel(fast.compute_logits(h_fast), ref.compute_logits(h_ref)) < TOL[dtype]


def run_absorbed(dtype, device, seed, fused_prologue, monkeypatch):
    """W_UK folded into q_b (mla.ABSORB_QB, set before loading): decode-only steps of at least
    ABSORB_QB_MIN_B rows (3 here) take q_lat | q_pe from the folded GEMM (no W_UK bmm; with the
    fused prologue q_pe's RoPE in the decode launch), mixed / prefill steps and a 2-row decode
    keep q_b; hidden states and logits match the reference path at every step."""
    monkeypatch.setattr(mla_model, "ABSORB_QB", True)
    monkeypatch.setattr(mla_model, "ABSORB_QB_MIN_B", 3)
    monkeypatch.setattr(mla_model, "FUSED_PROLOGUE", fused_prologue)
    if dtype == torch.bfloat16 and not GPU:
        upcast_mla_decode(monkeypatch)
    cfg = tiny_config(32)
    ref, fast = build_models(cfg, dtype, device, seed, decisive_routing=True)
    assert all(lyr.self_attn.w_q_abs is not None for lyr in fast.model.layers)
    assert fast.model.layers[0].self_attn.w_q_abs.shape == (4 * (32 + 16), 32)
    seen = []
    real = MLA._q_b
    monkeypatch.setattr(MLA, "_q_b", lambda self, q_n, absorbed:
                        seen.append(absorbed) or real(self, q_n, absorbed))
    decode = [(s, 1) for s in range(3)]
    steps = [([(0, 5), (1, 9), (2, 6)], 0), (decode, 3), ([(0, 1), (3, 4)], 1), (decode, 3),
             ([(0, 1), (1, 1)], 2)]
    compare_steps(ref, fast, cfg, dtype, device, seed, steps)
    n = cfg.num_hidden_layers
    assert seen == [False] * n + [True] * n + [False] * n + [True] * n + [False] * n


@cpu_only
@pytest.mark.parametrize("dtype,fused_prologue", [(torch.float32, False),
                                                  (torch.float32, True),
                                                  (torch.bfloat16, False)])
def test_absorbed_q_matches_reference_interpreter(dtype, fused_prologue, monkeypatch):
    run_absorbed(dtype, "cpu", 21, fused_prologue, monkeypatch)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype,fused_prologue", [(torch.float32, False),
                                                  (torch.bfloat16, False),
                                                  (torch.bfloat16, True)])
def test_absorbed_q_matches_reference_gpu(dtype, fused_prologue, monkeypatch):
    run_absorbed(dtype, "cuda", 22, fused_prologue, monkeypatch)


def test_absorbed_q_weight_math_and_size_guard(monkeypatch):
    """The folded weight is W_UK^T @ q_b's nope rows per head + q_b's rope rows; over
    ABSORB_QB_MAX_BYTES it is not built (the q_b + bmm path stays)."""
    monkeypatch.setattr(mla_model, "ABSORB_QB", True)
    cfg = tiny_config(32)
    ref, _ = build_models(cfg, torch.float32, "cpu", seed=23)
    attn = ref.model.layers[0].self_attn
    H, n, r, pe = attn.num_heads, attn.nope, attn.r, attn.rope
    wq = attn.q_b_proj.weight.view(H, n + pe, 32).double()
    w = attn.w_q_abs.view(H, r + pe, 32).double()
    want = torch.einsum("hnr,hnj->hrj", attn.w_uk.double(), wq[:, :n])
    assert rel(w[:, :r], want) < 1e-6 and torch.equal(w[:, r:], wq[:, n:])
    monkeypatch.setattr(mla_model, "ABSORB_QB_MAX_BYTES", H * (r + pe) * 32 * 4 - 1)
    attn.process_weights_after_loading()
    assert attn.w_q_abs is None


def test_absorb_switch_defaults():
    """On unless ATOM_STREAM_ABSORB_QB=0, from 8 decode rows (H200 A/B, bench/RESULTS.md
    session 20) unless ATOM_STREAM_ABSORB_QB_MIN_B says otherwise."""
    assert mla_model.ABSORB_QB == (os.environ.get("ATOM_STREAM_ABSORB_QB", "1") == "1")
    assert mla_model.ABSORB_QB_MIN_B == int(os.environ.get("ATOM_STREAM_ABSORB_QB_MIN_B", "8"))


# --------------------------------------------------------------------------- FUSE_ROUTER_SHARED
def run_router_shared(dtype, device, seed, monkeypatch):
    """Router + shared gate/up as one fp32-output GEMM (FUSE_ROUTER_SHARED, set before
    loading): the parity run of run_parity (prefill, then a mixed step), plus: the fused weight
    is what the router copy and the shared gate/up Linears view, and the fused path ran."""
    monkeypatch.setattr(dsv3, "FUSE_ROUTER_SHARED", True)
    calls = collections.Counter()
    real = MoE._router_and_shared

    def spy_fused(self, x):
        res = real(self, x)
        calls["fused" if res is not None else "fallback"] += 1
        return res
    monkeypatch.setattr(MoE, "_router_and_shared", spy_fused)
    cfg = tiny_config(32)
    ref, fast = build_models(cfg, dtype, device, seed, decisive_routing=True)
    moe = fast.model.layers[1].mlp
    W = moe.w_router_shared
    assert W is not None and W.shape == (8 + 2 * 24, 64)
    assert moe.gate.weight_lp.data_ptr() == W.data_ptr()
    assert moe.shared_experts.gate_proj.weight.data_ptr() == W[8:].data_ptr()
    assert torch.equal(moe.shared_experts.up_proj.weight, W[8 + 24:])
    compare_steps(ref, fast, cfg, dtype, device, seed,
                  [([(0, 5), (1, 9), (2, 6)], 0), ([(0, 1), (1, 1), (2, 7), (3, 4)], 2)])
    assert calls == {"fused": 2}  # one MoE layer, two steps


@cpu_only
def test_router_shared_fused_matches_reference_interpreter(monkeypatch):
    run_router_shared(torch.float32, "cpu", 25, monkeypatch)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_shared_fused_matches_reference_gpu(dtype, monkeypatch):
    run_router_shared(dtype, "cuda", 26, monkeypatch)


def test_router_shared_switch_default_on():
    env = os.environ.get("ATOM_STREAM_FUSE_ROUTER_SHARED", "1")
    assert dsv3.FUSE_ROUTER_SHARED == (env == "1")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("lq,lk", [(300, 300), (77, 1100), (1, 64)])
def test_prefill_attention_kernel_matches_reference_gpu(lq, lk):
    """The model's prefill attention on GPUs (Triton flash kernel, Kimi dims: 8 heads, qk 192
    = 128 + 64, v 128 as a strided view of the kv_b output) against the float32 reference, with
    and without a cached prefix; fresh random bf16 inputs."""
    from atom_stream.layers.attention import mla_prefill_ref

    g = torch.Generator(device="cuda").manual_seed(lq + lk)
    q = torch.randn(lq, 8, 192, generator=g, device="cuda").bfloat16()
    k = torch.randn(lk, 8, 192, generator=g, device="cuda").bfloat16()
    kv = torch.randn(lk, 8, 256, generator=g, device="cuda").bfloat16()
    v = kv[..., 128:]
    assert mla_model._prefill_kernel_ok(q, v)
    assert not mla_model._prefill_kernel_ok(q.float(), v.float())
    got = mla_model._prefill_attention_kernel(q, k, v, 192 ** -0.5)
    want = mla_prefill_ref(q, k, v, 192 ** -0.5)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    assert rel(got, want) < 1e-2


def test_prefill_kernel_dims():
    """Which head dims the Triton prefill takes (CPU tensors never: the check is CUDA-only)."""
    ok = mla_model._prefill_kernel_ok
    assert not ok(torch.zeros(1, 1, 192, dtype=torch.bfloat16),
                  torch.zeros(1, 1, 128, dtype=torch.bfloat16))

    class Fake:  # shape/dtype/is_cuda only
        def __init__(self, d, dtype=torch.bfloat16):
            self.shape, self.dtype, self.is_cuda = (1, 1, d), dtype, True

    assert ok(Fake(192), Fake(128)) and ok(Fake(32), Fake(16)) and ok(Fake(256), Fake(128))
    assert not ok(Fake(24), Fake(16))  # 16 + 8: the 8 part is below a dot's K of 16
    assert not ok(Fake(192), Fake(96)) and not ok(Fake(200), Fake(128))
    assert not ok(Fake(192, torch.float32), Fake(128, torch.float32))


def test_prefill_kernel_that_does_not_fit_falls_back(monkeypatch, caplog):
    """A GPU whose shared memory the prefill kernel's tiles exceed (Triton OutOfResources):
    this chunk and every later one take the float32 reference, with one warning."""
    from triton.runtime.errors import OutOfResources

    from atom_stream.layers.attention import mla_prefill_ref

    def too_big(*a, **k):
        raise OutOfResources(172032, 163840, "shared memory")

    monkeypatch.setattr(prefill_mod, "mla_prefill", too_big)
    monkeypatch.setattr(mla_model, "_PREFILL_KERNEL_FAILED", False)
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(6, 2, 32, generator=g), torch.randn(9, 2, 32, generator=g)
    v = torch.randn(9, 2, 16, generator=g)
    with caplog.at_level("WARNING"):
        got = mla_model._prefill_attention_kernel(q, k, v, 0.2)
    assert torch.equal(got, mla_prefill_ref(q, k, v, 0.2))
    assert "does not fit" in caplog.text and mla_model._PREFILL_KERNEL_FAILED

    class Fake:
        def __init__(self, d):
            self.shape, self.dtype, self.is_cuda = (1, 1, d), torch.bfloat16, True

    assert not mla_model._prefill_kernel_ok(Fake(192), Fake(128))
    monkeypatch.setattr(mla_model, "_PREFILL_KERNEL_FAILED", False)
    assert mla_model._prefill_kernel_ok(Fake(192), Fake(128))


def test_prefill_cu_seqlens_made_once_per_step_and_sequence():
    """AttentionMetadata.prefill_cu_seqlens: [0, q_len, 0, seq_len] of a prefill chunk, built by
    the first layer that asks and the same tensor for every later layer of the step."""
    from atom_stream.layers.attention import AttentionMetadata

    md = AttentionMetadata([0, 1, 6, 13], [40, 5, 30], torch.zeros(3, 4, dtype=torch.int32),
                           torch.zeros(13, dtype=torch.int64), 1, 16)
    cpu = torch.device("cpu")
    a, b = md.prefill_cu_seqlens(1, cpu), md.prefill_cu_seqlens(2, cpu)
    assert a.tolist() == [0, 5, 0, 5] and b.tolist() == [0, 7, 0, 30]
    assert a.dtype == torch.int32
    assert md.prefill_cu_seqlens(1, cpu) is a and md.prefill_cu_seqlens(2, cpu) is b
