"""Quantized formats on a GPU (`pytest -m gpu` on the device machine).

- Tiny checkpoints of every format give the same logits on CUDA as on the CPU (float32, the
  torch reference paths, or the Triton fused MoE when kernels/fused_moe.py provides it).
- The full-depth `k25-tp8-rank` presets build with dummy weights without ever allocating dense
  experts (quant_init), keep the experts at the format's size, and run prefill + decode steps
  with finite logits.
"""

from __future__ import annotations

import gc

import pytest
import torch

from atom_stream.config import EngineConfig
from atom_stream.engine.model_runner import ModelRunner
from atom_stream.layers.quant import weight_bytes_report
import quant_writers as qw

pytestmark = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@needs_gpu
@pytest.mark.parametrize("fmt", ["int4", "mxfp4", "w4a8", "fp8_block"])
def test_tiny_formats_cuda_matches_cpu(fmt, tmp_path):
    from test_quant_formats import run
    qw.make_tiny_hf(str(tmp_path / "src"), "kimi", seed=1)
    qw.write_quantized(str(tmp_path / "src"), str(tmp_path / fmt), fmt)
    out = []
    for device in ("cpu", "cuda"):
        r = ModelRunner(EngineConfig(model=str(tmp_path / fmt), device=device, dtype="float32",
                                     num_kv_blocks=64, block_size=4, enforce_eager=True))
        logits, toks = run(r, n_decode=6)
        out.append((logits.cpu(), toks))
    (lc, tc), (lg, tg) = out
    if fmt == "w4a8":
        # the GPU kernel multiplies fp8 x fp8 on the tensor cores and re-quantizes the
        # intermediate from its own fp32 sums: an fp8 code may land one step away from the
        # CPU emulation's, so the stated tolerance is 2e-2 (tokens may then differ)
        assert ((lg - lc).norm() / lc.norm()).item() < 2e-2
        return
    assert ((lg - lc).norm() / lc.norm()).item() < 1e-4
    assert tg == tc


# experts of one K2.5 TP8 rank: 60 MoE layers x 384 x 3 x 256 x 7168 weights
_W = 60 * 384 * 3 * 256 * 7168
EXPECTED = {"k25-tp8-rank": ("int4_pack", _W // 2 + _W // 32 * 2),
            "k25-tp8-rank-mxfp4": ("mxfp4", _W // 2 + _W // 32),
            "k25-tp8-rank-w4a8": ("w4a8_fp8", _W + 60 * 2 * 384 * 4)}


@needs_gpu
@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_k25_rank_presets_build_packed_and_run(preset):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()  # what earlier tests in this process still hold
    r = ModelRunner(EngineConfig(model=preset, device="cuda", enforce_eager=True,
                                 num_kv_blocks=64, kv_cache_dtype="fp8", max_model_len=4096,
                                 max_num_seqs=4))
    fmt, nbytes = EXPECTED[preset]
    report = weight_bytes_report(r.model)
    assert report[fmt] == nbytes
    peak = torch.cuda.max_memory_allocated()
    print(f"\n{preset}: {report}, peak {peak / 2**30:.1f} GiB")
    # never the dense bf16 experts (254 GB)
    assert peak - base < sum(report.values()) + 12 * 2**30
    from test_quant_formats import run
    logits, toks = run(r, prompt=list(range(100, 120)), n_decode=3)
    assert torch.isfinite(logits).all()
    del r, logits
    gc.collect()
    torch.cuda.empty_cache()
