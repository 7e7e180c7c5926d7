"""add + RMSNorm folded into the one-row GEMV (kernels/gemv.py `norm=`, models/kernel_path.PreNorm)
against the two launches the model runs otherwise (kernels/norm_rope.fused_add_rmsnorm, then
the GEMV at the model's tiles), in the same run, at one Kimi-K2.5 TP8 rank's shapes (hidden
7168, bf16): q_a + kv_a 2112x7168 (bf16 out, the new residual written) and the router + shared
gate/up 896x7168 (fp32 out, the new residual and the normed row written for the experts).

Time: median of CUDA-graph replays over 4 weight copies (no L2 reuse of the weights); each
variant first checked against the torch reference (gemv.gemv_norm_ref: y, r, h).

    python3 bench/norm_gemv.py --out $OUT/norm-gemv-h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from atom_stream.kernels import gemv as gv
from atom_stream.kernels.norm_rope import fused_add_rmsnorm

from atom_stream.models import deepseek_v3 as dv3
from atom_stream.models import mla
from kernels import copy_bandwidth, time_calls

SHAPES = {"qa_kva": (2112, mla.QKV_GEMV_CONFIG, None, False),
          "router_shared": (896, dv3.ROUTER_GEMV_CONFIG, torch.float32, True)}
K, EPS = 7168, 1e-6


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def make_calls(x, res, nw, res_out, h_out, out_dtype, cfg):
    """(the model's two launches, the fused one), each a call on a weight copy w."""
    def two(w):
        h, _ = fused_add_rmsnorm(x, res, nw, EPS)
        return gv.gemv(h, w, out_dtype=out_dtype, config=cfg)

    def one(w):
        return gv.gemv(x, w, out_dtype=out_dtype, config=cfg,
                       norm=(res, nw, EPS, res_out, h_out))
    return two, one


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/norm-gemv.json")
    args = ap.parse_args(argv)
    copy = copy_bandwidth(warm_s=1.0)
    dt, rows = torch.bfloat16, []
    print(f"copy {copy:.0f} GB/s")
    print(f"{'shape':<14}{'norm+gemv':>11}{'fused':>9}{'gain':>8}{'y err':>10}{'h err':>10}")
    for name, (N, cfg, out_dtype, need_h) in SHAPES.items():
        ws = [torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5 for _ in range(4)]
        x = torch.randn(1, K, device="cuda", dtype=dt) * 3
        res = torch.randn(1, K, device="cuda", dtype=dt)
        nw = 1 + 0.3 * torch.randn(K, device="cuda", dtype=dt)
        res_out = torch.empty_like(x)
        h_out = torch.empty_like(x) if need_h else None

        two, one = make_calls(x, res, nw, res_out, h_out, out_dtype, cfg)
        y_ref, r_ref, h_ref = gv.gemv_norm_ref(x, ws[0], res, nw, EPS, out_dtype=out_dtype)
        y_err = rel(one(ws[0]), y_ref)
        assert torch.equal(res_out, r_ref), "residual out differs from the reference"
        h_err = rel(h_out, h_ref) if need_h else 0.0
        assert y_err < 1e-2 and h_err < 1e-2, (y_err, h_err)
        t_two = time_calls([lambda w=w, f=two: f(w) for w in ws])
        t_one = time_calls([lambda w=w, f=one: f(w) for w in ws])
        nbytes = N * K * 2
        rows.append({"shape": name, "N": N, "K": K, "m": 1, "norm_gemv_us": round(t_two, 3),
                     "fused_us": round(t_one, 3), "y_rel_err": y_err, "h_rel_err": h_err,
                     "bytes": nbytes, "copy_GBps": round(copy, 1), "config": cfg,
                     "ratio_fused": round(nbytes / (t_one * 1e-6) / (copy * 1e9), 4)})
        print(f"{name:<14}{t_two:>11.2f}{t_one:>9.2f}{t_two - t_one:>8.2f}{y_err:>10.1e}"
              f"{h_err:>10.1e}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "copy_GBps": copy, "rows": rows}, f,
                  indent=1)


if __name__ == "__main__":
    main()
