"""Summarize ncu's raw CSV (bench/ncu_probe.py under `--csv --page raw`): one line per kernel.

    python3 bench/ncu_summary.py ncu-raw.csv [--json out.json]

Per kernel: duration, DRAM throughput (% of peak) and bytes read, SM throughput, issue slots
busy, achieved occupancy, registers, shared-memory bank conflicts, and the largest warp-stall
reasons (warps stalled per issued instruction, WarpStateStats). Metric names are matched by
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
    "dram%": "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram_MB": "dram__bytes_read.sum",
    "sm%": "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "issue%": "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "occ%": "sm__warps_active.avg.pct_of_peak_sustained_active",
    "regs": "launch__registers_per_thread",
    "smem_conflicts": "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
    "grid": "launch__grid_size",
}
_STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio$")
_UNIT_SCALE = {"usecond": 1.0, "nsecond": 1e-3, "msecond": 1e3, "byte": 1e-6, "Kbyte": 1e-3,
               "Mbyte": 1.0, "Gbyte": 1e3}


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
            if v is not None and label in ("us", "dram_MB"):
                v *= _UNIT_SCALE.get(unit.get(name, ""), 1.0)
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
    print(f"{'kernel':<48}" + "".join(f"{c:>15}" for c in cols))
    for d in rows:
        print(f"{d['kernel']:<48}" + "".join(
            f"{'' if d[c] is None else format(d[c], '.1f'):>15}" for c in cols))
        print("    stalls/issue: " + ", ".join(f"{k} {v:.2f}" for k, v in d["stalls"].items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if not rows:
        sys.exit("no kernel rows in " + args.csv)


if __name__ == "__main__":
    main()
