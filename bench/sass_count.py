"""Offline sm_90 compile of the fused-MoE tensor-core kernels (no GPU): registers, spills and the
SASS instruction mix, per config. The method of docs/TEAM_NOTES.md session 10, as a tool.

    python3 bench/sass_count.py --kernel down --fmt int4 --cfg '{"DQ": 3}'

Prints registers / spills (ptxas -v), the SASS opcode counts of the whole kernel and of its
hottest loop (the instructions between the last backward branch's target and the branch), and
warp-instructions per weight of that loop (rows x K of one iteration). Uses the Triton wheel's
own ptxas / cuobjdump (triton/backends/nvidia/bin). Needs no CUDA device; the Triton on this
machine may be newer than the device's, so counts are a guide, not a measurement.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import tempfile

import triton
from atom_stream.kernels import fused_moe_common as fmc
from atom_stream.kernels import fused_moe_tc as tc
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
H, I, TOPK, KP, E = 7168, 256, 8, 9, 385  # one Kimi-K2.5 TP8 rank, + the shared expert
FMTS = {"int4": fmc.INT4, "mxfp4": fmc.MXFP4}


def _sig(fn, pointers: dict, ints: list[str], cx: dict) -> tuple[dict, dict, dict]:
    sig, attrs = {}, {}
    for i, a in enumerate(fn.arg_names):
        if a in cx:
            sig[a] = "constexpr"
        elif a in pointers:
            sig[a] = pointers[a]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif a in ints:
            sig[a] = "i32"
            if a.startswith("stride"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise KeyError(a)
    return sig, cx, attrs


def down_kernel(fmt: int, cfg: dict):
    cx = {"H": H, "I": I, "TOPK": TOPK, "KP": KP, "KPP": 16, "N_ROUTED": E - 1,
          "W_ROW": I // 128 * 16, "S_ROW": I // 32, "A_ROW": I, "BM": cfg["BM"],
          "BN": cfg["BN2"], "BK": cfg["BK2"], "FMT": fmt, "ACT_Q": 0, "MDT": fmc.BF16,
          "DIRECT": 0, "OFFS": 1, "ASTATIC": 0, "DQ": cfg["DQ"], "UNROLL": cfg["DU"],
          "NT": cfg.get("NT2", 1)}
    ptrs = {"ACT": "*bf16", "ACTS": "*bf16", "W": "*i32",
            "S": "*bf16" if fmt == fmc.INT4 else "*u8", "SORTED": "*i32",
            "BLKEXP": "*i32", "OKM": "*i32", "Y": "*bf16", "AS": "*fp32"}
    ints = ["M", "num_pairs", "stride_we", "stride_se"]
    return tc._down_block_kernel, _sig(tc._down_block_kernel, ptrs, ints, cx), (
        cfg["W2"], cfg["S2"], cfg["BN2"] * cfg["BK2"])


def gate_up_kernel(fmt: int, cfg: dict):
    wt = cfg.get("WT", 1)
    cx = {"I": I, "H": H, "TOPK": TOPK, "KP": KP, "KPP": 16, "N_ROUTED": E - 1,
          "W_ROW": H // 128 * 16, "S_ROW": H // 32, "NBI": I // 128, "BM": cfg["BM"],
          "BN": cfg["BN1"], "BK": cfg["BK1"], "FMT": fmt, "ACT_Q": 0, "MDT": fmc.BF16,
          "DIRECT": 0, "ACT_OUT": 0, "OFFS": 1, "ASTATIC": 0, "DQ": cfg["DQ"], "XM": 0,
          "WT": wt}
    ptrs = {"X": "*bf16", "XS": "*bf16", "W": "*i32",
            "S": "*bf16" if fmt == fmc.INT4 else "*u8", "IDS": "*i32", "SORTED": "*i32",
            "BLKEXP": "*i32", "OKM": "*i32", "SLOT": "*i32", "ACT": "*bf16", "ACTS": "*u8",
            "AS": "*fp32"}
    ints = ["M", "num_pairs", "stride_xm", "stride_xsm", "stride_im", "stride_we", "stride_se"]
    return tc._gate_up_kernel, _sig(tc._gate_up_kernel, ptrs, ints, cx), (
        cfg["W1"], cfg["S1"], 2 * cfg["BN1"] * cfg["BK1"])


def compile_sass(fn, sig_cx_attrs, warps: int, stages: int) -> tuple[str, str]:
    sig, cx, attrs = sig_cx_attrs
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": warps, "num_stages": stages})
    with tempfile.TemporaryDirectory() as d:
        ptx = os.path.join(d, "k.ptx")
        cubin = os.path.join(d, "k.cubin")
        with open(ptx, "w") as f:
            f.write(k.asm["ptx"])
        res = subprocess.run([os.path.join(BIN, "ptxas-blackwell"), "-arch=sm_90a", "-v", ptx,
                              "-o", cubin], capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    return res, sass


_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def parse(sass: str) -> list[tuple[int, str, str]]:
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in _INSTR.finditer(sass)]


def hottest_loop(ins: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """The longest span [target, branch] of a backward BRA (the main K loop)."""
    best: list = []
    for i, (addr, op, args) in enumerate(ins):
        if op.startswith("BRA"):
            m = re.search(r"0x([0-9a-f]+)", args)
            if m and int(m.group(1), 16) < addr:
                tgt = int(m.group(1), 16)
                span = [x for x in ins[:i + 1] if x[0] >= tgt]
                if len(span) > len(best):
                    best = span
    return best


def report(name: str, res: str, sass: str, weights_per_iter: int, warps: int) -> dict:
    regs = re.search(r"Used (\d+) registers", res)
    spill = re.findall(r"(\d+) bytes spill stores", res)
    ins = parse(sass)
    loop = hottest_loop(ins)
    mix = collections.Counter(op.split(".")[0] for _, op, _ in loop)
    out = {"name": name, "regs": int(regs.group(1)) if regs else None,
           "spill_bytes": sum(map(int, spill)), "sass_total": len(ins), "loop_sass": len(loop),
           "warp_instr_per_weight": round(len(loop) * warps / weights_per_iter, 4) if loop else None,
           "loop_mix": dict(mix.most_common(16))}
    print(json.dumps(out))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", choices=["down", "gate_up"], default="down")
    ap.add_argument("--fmt", choices=sorted(FMTS), default="int4")
    ap.add_argument("--M", type=int, default=256, help="tokens (picks default_config's tiles)")
    ap.add_argument("--cfg", default="{}", help="JSON over fused_moe.default_config")
    args = ap.parse_args(argv)
    from atom_stream.kernels.fused_moe import default_config
    fmt = FMTS[args.fmt]
    P = args.M * KP
    cfg = default_config(fmt, args.M, P, E, H, I) | json.loads(args.cfg)
    build = down_kernel if args.kernel == "down" else gate_up_kernel
    fn, sca, (warps, stages, weights) = build(fmt, cfg)
    res, sass = compile_sass(fn, sca, warps, stages)
    report(f"{args.kernel} {args.fmt} M={args.M} {args.cfg}", res, sass, weights, warps)


if __name__ == "__main__":
    main()
