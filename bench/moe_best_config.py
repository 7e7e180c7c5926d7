"""Pick the fused-MoE config override that beat the defaults at every given M in a kernel sweep.

    python3 bench/moe_best_config.py SWEEP.json [--kernel moe_int4] [--ms 64,256] [--min-gain 0.02]

SWEEP.json: the list bench/kernels_moe.py writes with --sweep-out (records {"kernel", "m",
"config", "time_us", ...}). Considers whole-MoE configs only (no "stop_after"), measured at
every M of --ms for that kernel; score = geometric mean over those M of time / the default's
({} ; the fastest of its repeats). Prints the winning config as one line of JSON, for
ATOM_STREAM_MOE_CFG (kernels/fused_moe.ENV_CONFIG) in a decode-step A/B; prints {} when none
is faster than the defaults by --min-gain at every M. The reasoning goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys


def pick(log: list, kernel: str, ms: tuple[int, ...], min_gain: float = 0.02) -> dict:
    """The config (dict) with the lowest geometric-mean time relative to {} over ms, if it is
    faster than {} by min_gain at each M; else {}."""
    times: dict[str, dict[int, float]] = {}
    for r in log:
        cfg = r.get("config")
        if r.get("kernel") != kernel or r.get("m") not in ms or "time_us" not in r:
            continue
        if not isinstance(cfg, dict) or cfg.get("stop_after"):
            continue
        key = json.dumps(cfg, sort_keys=True)
        per_m = times.setdefault(key, {})
        per_m[r["m"]] = min(per_m.get(r["m"], math.inf), r["time_us"])
    base = times.get("{}", {})
    if any(m not in base for m in ms):
        print(f"no default ({{}}) timing at every M {ms} for {kernel}", file=sys.stderr)
        return {}
    best, best_score = {}, 1.0
    for key, per_m in times.items():
        if key == "{}" or any(m not in per_m for m in ms):
            continue
        rel = [per_m[m] / base[m] for m in ms]
        score = math.exp(sum(math.log(v) for v in rel) / len(rel))
        print(f"{key}: {' '.join(f'{v:.3f}' for v in rel)} (geo {score:.3f})", file=sys.stderr)
        if max(rel) <= 1.0 - min_gain and score < best_score:
            best, best_score = json.loads(key), score
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep")
    ap.add_argument("--kernel", default="moe_int4")
    ap.add_argument("--ms", default="64,256")
    ap.add_argument("--min-gain", type=float, default=0.02)
    args = ap.parse_args(argv)
    with open(args.sweep) as f:
        log = json.load(f)
    print(json.dumps(pick(log, args.kernel, tuple(int(v) for v in args.ms.split(",")),
                          args.min_gain)))


if __name__ == "__main__":
    main()
