"""One-row steps with each layer's add + RMSNorm folded into the GEMV that reads it
(models/kernel_path.PreNorm, kernels/gemv.py `norm=`; ATOM_STREAM_NORM_GEMV) and the MLA prologue
inside the q_b GEMV's launch (kernels/mla_prologue.qb_prologue; ATOM_STREAM_QB_PROLOGUE)
against the torch reference path.

The tiny DeepseekV3 of test_model_kernels (dense layer 0, MoE layer 1), a sequence of steps of
one row (a one-token prefill, decodes) between multi-row steps (which keep the add_rmsnorm
launches). Checked at every step: hidden states and logits against the reference; which
launches ran (the fused GEMVs, the add_rmsnorm calls left). CPU: the interpreter, with the GEMV
allowed on CPU rows (it is GPU-only in the model: layers.linear.gemv_ok); `-m gpu`: bf16,
natively, the model's own gates. Fresh random weights and ids per run.
"""

from __future__ import annotations

import collections

import pytest
import torch
from kernel_interp import interpret_without_gpu

GPU = interpret_without_gpu("gemv", "kv_store", "norm_rope", "moe_routing", "mla_decode",
                            "silu_mul", "mla_q_absorb", "mla_prologue")

from atom_stream.kernels import gemv as gemv_mod
from atom_stream.kernels import mla_prologue as mp_mod
from atom_stream.kernels import norm_rope as nr_mod
from test_model_kernels import TOL, Pool, build_models, rel, tiny_config, upcast_mla_decode

from atom_stream.models import kernel_path
from atom_stream.models import mla as mla_model

DEV = "cuda" if GPU else "cpu"
cpu_only = pytest.mark.skipif(GPU, reason="interpreter tests run where there is no GPU")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a GPU")
# (seq id, new tokens) parts and decodes first: one-row steps among multi-row ones
STEPS = [([(0, 1)], 0), ([(1, 5)], 0), ([(0, 1)], 1), ([(0, 1), (1, 1)], 2), ([(1, 1)], 1),
         ([(0, 1)], 1)]


@pytest.fixture
def calls(monkeypatch):
    """Counts add_rmsnorm launches and GEMV launches with / without a folded norm."""
    seen = collections.Counter()
    fn_norm, fn_gemv = nr_mod.fused_add_rmsnorm, gemv_mod.gemv

    def norm(*a, **k):
        seen["add_rmsnorm"] += 1
        return fn_norm(*a, **k)

    def gemv(*a, **k):
        seen["gemv_norm" if k.get("norm") is not None else "gemv"] += 1
        return fn_gemv(*a, **k)
    def spied(fn, name):
        def run(*a, **k):
            seen[name] += 1
            return fn(*a, **k)
        return run
    monkeypatch.setattr(nr_mod, "fused_add_rmsnorm", norm)
    monkeypatch.setattr(gemv_mod, "gemv", gemv)
    for name in ("mla_prologue", "qb_prologue"):
        monkeypatch.setattr(mp_mod, name, spied(getattr(mp_mod, name), name))
    if not GPU:  # let the GEMV take CPU rows of any float dtype (the interpreter runs it)
        def cpu_ok(x, w, max_m):
            return 1 <= x.shape[0] <= min(max_m, gemv_mod.MAX_M) and x.dtype == w.dtype
        monkeypatch.setattr(kernel_path, "gemv_ok", cpu_ok)
        monkeypatch.setattr(mla_model, "gemv_ok", cpu_ok)
    return seen


def run(q_lora, dtype, seed, calls, monkeypatch, norm_gemv=True):
    monkeypatch.setattr(kernel_path, "NORM_GEMV", norm_gemv)
    if dtype == torch.bfloat16 and not GPU:
        upcast_mla_decode(monkeypatch)
    cfg = tiny_config(q_lora)
    ref, fast = build_models(cfg, dtype, DEV, seed, decisive_routing=dtype != torch.float32)
    pool = Pool(cfg, dtype, DEV, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    per_step = []
    for parts, nd in STEPS:
        (pos_r, md_r), (pos_f, md_f) = pool.step(parts, nd)
        ids = torch.randint(0, cfg.vocab_size, (len(pos_r),), generator=g)
        before = dict(calls)
        h_ref = ref(ids, pos_r, pool.ref, md_r)
        with kernel_path.force_kernels(not GPU):
            h_fast = fast(ids.to(DEV), pos_f, pool.fast, md_f)
        assert torch.isfinite(h_fast).all()
        assert rel(h_fast, h_ref) < TOL[dtype], f"hidden: {rel(h_fast, h_ref):.2e}"
        assert rel(fast.compute_logits(h_fast), ref.compute_logits(h_ref)) < TOL[dtype]
        per_step.append({k: calls[k] - before.get(k, 0) for k in calls})
    return per_step


@cpu_only
@pytest.mark.parametrize("q_lora", [32, None])
def test_one_row_steps_fold_the_norms(q_lora, calls, monkeypatch):
    per_step = run(q_lora, torch.float32, 21 + (q_lora or 0), calls, monkeypatch)
    for (parts, _), n in zip(STEPS, per_step):
        rows = sum(t for _, t in parts)
        if rows == 1:
            # q_a + kv_a takes layer 0's and layer 1's input norms (with q_lora: the fused
            # weight); the MoE router GEMV layer 1's post-attention norm; the dense MLP of
            # layer 0 and the final norm stay add_rmsnorm launches (no latent norms: the fused
            # MLA prologue has them)
            folded = 3 if q_lora else 1
            assert n.get("gemv_norm", 0) == folded, n
            assert n.get("add_rmsnorm", 0) == 5 - folded + (0 if q_lora else 2), n
        else:
            assert n.get("gemv_norm", 0) == 0, n


@cpu_only
@pytest.mark.parametrize("on,absorb_min_b", [(True, 8), (False, 8), (True, 1)])
def test_one_row_steps_run_the_prologue_in_the_q_b_launch(on, absorb_min_b, calls,
                                                          monkeypatch):
    """absorb_min_b 1: one-row decode steps read the q_b weight with W_UK folded in (q_lat |
    q_pe out of the same launch); the one-token prefill keeps q_b."""
    monkeypatch.setattr(mla_model, "QB_PROLOGUE", on)
    monkeypatch.setattr(mla_model, "ABSORB_QB_MIN_B", absorb_min_b)
    per_step = run(32, torch.float32, 31, calls, monkeypatch)
    for (parts, _), n in zip(STEPS, per_step):
        one = sum(t for _, t in parts) == 1 and on
        assert n.get("qb_prologue", 0) == 2 * one and n.get("mla_prologue", 0) == 2 * (not one)


@cpu_only
def test_switch_off_keeps_the_launches(calls, monkeypatch):
    per_step = run(32, torch.float32, 5, calls, monkeypatch, norm_gemv=False)
    assert all(n.get("gemv_norm", 0) == 0 for n in per_step)
    assert per_step[0]["add_rmsnorm"] == 5  # 2 per layer + the final norm


@pytest.mark.gpu
@needs_gpu
def test_one_row_steps_fold_the_norms_gpu(calls, monkeypatch):
    per_step = run(32, torch.bfloat16, 7, calls, monkeypatch)
    assert per_step[0].get("gemv_norm", 0) == 3 and per_step[0]["add_rmsnorm"] == 2


@cpu_only
def test_runner_warmup_compiles_the_norm_variants(calls, monkeypatch):
    """engine/kernel_warmup.norm_gemv_warmup: the q_a + kv_a GEMV with and without a residual,
    the router's with h out (3 launches, all with the norm folded); none with the switch off."""
    import types

    from atom_stream.engine import kernel_warmup
    cfg = tiny_config(32)
    ref, _ = build_models(cfg, torch.float32, "cpu", seed=41)
    fake = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32, model=ref)
    monkeypatch.setattr(kernel_path, "NORM_GEMV", False)
    assert kernel_warmup.norm_gemv_warmup(fake) == 0
    monkeypatch.setattr(kernel_path, "NORM_GEMV", True)
    assert kernel_warmup.norm_gemv_warmup(fake) == 3
    assert calls["gemv_norm"] == 3 and calls["add_rmsnorm"] == 0


@cpu_only
def test_runner_warmup_compiles_the_qb_prologue(calls, monkeypatch):
    """engine/kernel_warmup.qb_prologue_warmup: one launch (a padding slot: the cache it is
    given stays zero) where the model would take it, none with the switch off."""
    import types

    from atom_stream.engine import kernel_warmup
    cfg = tiny_config(32)
    ref, _ = build_models(cfg, torch.float32, "cpu", seed=45)
    fake = types.SimpleNamespace(device=torch.device("cpu"), dtype=torch.float32,
                                 kv_dtype=torch.float32, model=ref)
    attn = ref.model.layers[0].self_attn
    assert kernel_warmup.qb_prologue_warmup(fake, attn) == 1 and calls["qb_prologue"] == 1
    monkeypatch.setattr(mla_model, "QB_PROLOGUE", False)
    assert kernel_warmup.qb_prologue_warmup(fake, attn) == 0
