"""bench/ladder_common.py: the MoE ladders' shared row / failure handling (CPU-checkable parts)."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

import ladder_common as LC


def test_rung_row_ratio_and_fields(capsys):
    row = LC.rung_row("  64 D1     128  4  3", 100.0, 2_000_000, 4000.0, 50.0, "ok", m=64,
                      rung="D1")
    assert row == {"m": 64, "rung": "D1", "time_us": 100.0, "bytes": 2_000_000,
                   "ratio": 0.005, "copy_GBps": 4000, "check": "ok"}
    line = capsys.readouterr().out
    assert line.startswith("  64 D1") and "0.50" in line and line.rstrip().endswith("ok")


def test_failing_rung_is_reported_not_raised(capsys):
    def check():
        raise RuntimeError("out of shared memory")

    assert LC.time_rung([], check, tag="  64 D3") is None
    assert "  64 D3: RuntimeError: out of shared memory" in capsys.readouterr().out


def test_write_rows(tmp_path):
    path = tmp_path / "sub" / "rows.json"
    LC.write_rows(str(path), [{"m": 1}], 0.0)
    assert json.loads(path.read_text()) == [{"m": 1}]
