"""Summarize ncu's raw CSV (bench/ncu_probe.py under `--csv --page raw`): one line per kernel.

    python3 bench/ncu_summary.py ncu-raw.csv [--json out.json]

Per kernel: duration, DRAM (% of peak cycles active, GB/s), SM throughput, issue slots busy,
achieved occupancy, registers, ALU / FMA / tensor pipe activity, warp-instructions, and the largest
warp-stall reasons (warps stalled per issued instruction, WarpStateStats). Metric names are matched by
pattern, so a section ncu did not collect just leaves a blank.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys

COLUMNS = {  # label -> metric name (exact) in the raw page
    "us": "gpu__time_duration.sum",
    "dram%": "dram__cycles_active.avg.pct_of_peak_sustained_elapsed",
    "dram_GBps": "dram__bytes.sum.per_second",
    "sm%": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "issue%": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "occ%": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "regs": "launch__registers_per_thread",
    "alu%": "sm__pipe_alu_cycles_active.avg.pct_of_peak_sustained_active",
    "fma%": "sm__pipe_fma_cycles_active.avg.pct_of_peak_sustained_active",
    "tensor%": "sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active",
    "Minst": "smsp__inst_executed.sum",
    "grid": "launch__grid_size",
}
_STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
_SCALE = {"us": {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3},
          "dram_GBps": {"byte/s": 1e-9, "Kbyte/s": 1e-6, "Mbyte/s": 1e-3, "Gbyte/s": 1.0},
          "Minst": {"inst": 1e-6}}


def _num(v: str) -> float | None:
    try:
        return float(v.replace(",", ""))
    except ValueError:
        return None


def summarize(path: str) -> list[dict]:
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu's own log lines start with ==
    rows = list(csv.reader(lines))
    header, units, data = rows[0], rows[1], rows[2:]
    out = []
    for r in data:
        rec = dict(zip(header, r))
        unit = dict(zip(header, units))
        d: dict = {"kernel": rec.get("Kernel Name", "")[:48]}
        for label, name in COLUMNS.items():
            v = _num(rec.get(name, ""))
            if v is not None and label in _SCALE:
                v *= _SCALE[label].get(unit.get(name, ""), 1.0)
            d[label] = v
        stalls = {m.group(1): _num(v) for k, v in rec.items() if (m := _STALL.search(k))}
        d["stalls"] = dict(sorted(((k, v) for k, v in stalls.items() if v),
                                  key=lambda kv: -kv[1])[:6])
        out.append(d)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    rows = summarize(args.csv)
    cols = list(COLUMNS)
    print(f"{'kernel':<22}" + "".join(f"{c:>10}" for c in cols))
    for d in rows:
        print(f"{d['kernel'][:22]:<22}" + "".join(
            f"{'' if d[c] is None else format(d[c], '.1f'):>10}" for c in cols))
        print("    stalls/issue: " + ", ".join(f"{k} {v:.2f}" for k, v in d["stalls"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not rows:
        sys.exit("no kernel rows in " + args.csv)


if __name__ == "__main__":
    main()
