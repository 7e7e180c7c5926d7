"""bench/moe_best_config.py: the config picked for a decode-step A/B from a kernel sweep."""

from __future__ import annotations

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

import moe_best_config as B

K = "moe_int4"


def rec(m, cfg, t, kernel=K):
    return {"kernel": kernel, "m": m, "config": cfg, "time_us": t}


LOG = [
    rec(64, {}, 300.0), rec(256, {}, 500.0), rec(64, {}, 290.0),  # the default, twice at 64
    rec(64, {"AP": True}, 270.0), rec(256, {"AP": True}, 470.0),  # 0.931 / 0.94
    rec(64, {"AP": True, "BN2": 128}, 250.0), rec(256, {"AP": True, "BN2": 128}, 500.0),  # 256: tie
    rec(64, {"AP": True, "stop_after": "gate_up"}, 100.0),  # a part: never picked
    rec(256, {"AP": True, "stop_after": "gate_up"}, 150.0),
    rec(64, {"BN2": 32}, 200.0),  # not measured at 256
    rec(64, {"W2": 8}, 100.0, kernel="moe_mxfp4"), rec(256, {"W2": 8}, 100.0, kernel="moe_mxfp4"),
    {"kernel": K, "m": 64, "config": {"BN2": 999}, "error": "ValueError: tiles"},
]


def test_pick_needs_a_gain_at_every_m_and_ignores_parts():
    assert B.pick(LOG, K, (64, 256)) == {"AP": True}
    # only M=64: the BN2=32 row (200 / 290) wins; other kernels' rows never count
    assert B.pick(LOG, K, (64,)) == {"BN2": 32}
    assert B.pick(LOG, K, (64, 256), min_gain=0.2) == {}
    assert B.pick(LOG, "moe_mxfp4", (64, 256)) == {}  # no default timing there


def test_cli_prints_one_json_line(tmp_path):
    p = tmp_path / "sweep.json"
    p.write_text(json.dumps(LOG))
    script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench",
                          "moe_best_config.py")
    out = subprocess.run([sys.executable, script, str(p), "--ms", "64,256"], check=True,
                         capture_output=True, text=True).stdout
    assert json.loads(out) == {"AP": True}
