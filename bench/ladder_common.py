"""What the MoE ladders (bench/moe_tc_ladder.py, bench/moe_down_ladder.py) share: timing one
rung with its optional check, its table line and JSON row, and writing the rows."""

from __future__ import annotations

import time

from report import save_rows


def time_rung(calls, check=None, *, tag: str = "") -> tuple[float, str] | None:
    """(median µs per call of `calls` by kernels_moe.time_calls, check result): `check()`, if
    given, runs first (it launches and verifies one call: "ok" or "FAIL ..."); "-" without one.
    None, with the error printed under `tag`, when the rung fails (the others still run)."""
    from kernels_moe import time_calls
    try:
        chk = check() if check is not None else "-"
        return time_calls(calls), chk
    except Exception as e:  # noqa: BLE001 -- one failing rung must not stop the rest
        print(f"{tag}: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return None


def rung_row(label: str, t: float, nbytes: int, copy: float, prod_t: float | None, chk: str,
             **fields) -> dict:
    """Print one table line (`label`, then µs, ratio of copy, PROD's time / this one, check)
    and return the JSON row: `fields` + time_us, bytes, ratio, copy_GBps, check."""
    ratio = nbytes / (t * 1e-6) / (copy * 1e9)
    vs = f"{prod_t / t:8.2f}" if prod_t else f"{'-':>8}"
    print(f"{label}{t:>9.2f}{ratio:>7.3f}{vs}  {chk}", flush=True)
    return {**fields, "time_us": round(t, 2), "bytes": nbytes, "ratio": round(ratio, 4),
            "copy_GBps": round(copy), "check": chk}


def write_rows(path: str, rows: list, t0: float) -> None:
    save_rows(path, rows)
    print(f"wrote {path} ({len(rows)} rows, {time.time() - t0:.0f} s)")
