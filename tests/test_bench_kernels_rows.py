"""bench/kernels.py's row format (issue 6): attention rows carry batch/ctx, MoE rows m only."""

from __future__ import annotations

import importlib.util
import os

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    spec = importlib.util.spec_from_file_location("bench_kernels",
                                                  os.path.join(HERE, "bench", "kernels.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_with_and_without_batch(capsys):
    k = load()
    attn = k.make_row("mla_decode_fp8", 64, 8192, 1, 300.0, 600_000_000, 4000.0)
    moe = k.make_row("moe_int4", None, None, 64, 307.12, 872_747_008, 4205.6)
    assert attn["batch"] == 64 and attn["ctx"] == 8192
    assert moe["batch"] is None and moe["ctx"] is None and moe["m"] == 64
    assert abs(moe["ratio"] - 872_747_008 / 307.12e-6 / 4205.6e9) < 1e-4
    assert set(moe) == {"kernel", "batch", "ctx", "m", "time_us", "bytes", "copy_GBps", "ratio"}
    k.print_table([attn, moe])
    out = capsys.readouterr().out
    assert "moe_int4" in out and "None" in out
