"""`bench/kernels_attention.py --set variants`: MLA decode v1 vs v3 and the alternatives (fp8: v5) at
Kimi TP8 shapes (8 heads), one table + JSON rows with "variant" (split out of
kernels_attention.py; run through it, which loads bench/kernels.py first)."""

from __future__ import annotations

import contextlib
import time

import torch
from kernels_attention import FP8, DecodeSetup, _dt_name, check_variant, dec, make_row

VARIANT_SHAPES = [(1, 1024), (1, 8192), (16, 8192), (64, 1024), (64, 8192), (256, 1024),
                  (256, 8192)]


@contextlib.contextmanager
def _bit_moves(on: bool):
    """v5 unpacks with the portable bit moves (kernels/mla_decode_v5.FORCE_BIT_MOVES, read at
    each launch) inside the block when `on`."""
    v5 = dec._v5
    old = v5.FORCE_BIT_MOVES
    v5.FORCE_BIT_MOVES = old or on
    try:
        yield
    finally:
        v5.FORCE_BIT_MOVES = old


def set_variants(name, B, merge_kernel=False):
    """`--set variants`: [(label, kwargs for DecodeSetup.time)], most important first (the
    budget guard keeps only the first two). v3 = kernels/mla_decode_v3.py. merge_kernel: every
    v3 alternative with the separate merge kernel (the fused last-CTA merge measured 25-120 µs
    slower, hiding the fp8 tile path's own speed)."""
    mk = {"merge": "kernel"} if merge_kernel else {}
    sfx = " mk" if merge_kernel else ""
    v = [("v1", {"variant": "v1"}), ("v3" + sfx, dict(variant="v3", **mk))]
    if name == "fp8":  # v5 (kernels/mla_decode_v5.py: 16-bit pairs): splits, merge, registers
        v += [("v5" + sfx, dict(variant="v5", **mk)),
              ("v5 v3-splits" + sfx, dict(variant="v5", v3_splits=True, **mk)),
              # the portable unpack MI355 takes (not timed on any GPU yet)
              ("v5 bits" + sfx, dict(variant="v5", bit_moves=True, **mk))]
        # measured and dropped (bench/RESULTS.md session 12): merge="fused" (1.1-36x slower),
        # a 168-register cap with splits for 3 CTAs per SM (1.4-1.7x slower)
    if not merge_kernel:
        v.append(("v3 merge=kernel", {"variant": "v3", "merge": "kernel"}))
    return v


def variants_set(copy_gbps, budget_s=170.0, dtypes=("bf16", "fp8"), merge_kernel=False):
    """v1 vs v3 (and v3's alternatives) at Kimi TP8 shapes, bf16 and fp8; each variant is
    first checked against the reference on a mixed batch at 3 split counts (fused S <= 4,
    fused S <= 16, merge kernel), failures are not timed. Rows past `budget_s` time only v1
    and v3. Returns every timing (JSON rows with "variant")."""
    t0 = time.time()
    rows, table, labels = [], [], []
    bad = set()
    dts = [dt for dt in (torch.bfloat16, FP8) if _dt_name(dt) in dtypes]
    for dt in dts:
        name = _dt_name(dt)
        setup = DecodeSetup(dt, [1000, 2047, 77, 0, 5000, 1, 333], 8)
        for label, kw in set_variants(name, 7, merge_kernel):
            ckw = {k: a for k, a in kw.items() if k not in ("v3_splits", "bit_moves")}
            with _bit_moves(kw.get("bit_moves", False)):
                for S in (3, 16, 40):
                    if not check_variant(setup, S, ckw, f"{name} {label} S={S}"):
                        bad.add((name, label))
        del setup
    print(f"  checks done ({time.time() - t0:.0f} s)", flush=True)
    for dt in dts:
        name = _dt_name(dt)
        for B, ctx in VARIANT_SHAPES:
            setup = DecodeSetup(dt, [ctx] * B, 8)
            variants = set_variants(name, B, merge_kernel)
            if time.time() - t0 > budget_s:
                variants = variants[:2]
                print(f"  budget: {name} B={B} ctx={ctx} times v1 and v3 only", flush=True)
            res = {}
            for label, kw in variants:
                if (name, label) in bad:
                    continue
                kw = dict(kw)
                v = kw["variant"]
                S = dec.decode_num_splits(B, 8, ctx, "cuda", variant=v)
                if kw.pop("v3_splits", False):  # the ceil heuristic v5 had before session 12
                    S = dec.decode_num_splits(B, 8, ctx, "cuda", variant="v3")
                try:
                    with _bit_moves(kw.pop("bit_moves", False)):
                        t, S = setup.time(S, **kw)
                except Exception as e:  # noqa: BLE001
                    print(f"  {name} B={B} ctx={ctx} {label}: {type(e).__name__}: {e}",
                          flush=True)
                    continue
                row = {**make_row(f"mla_decode_{name}", B, ctx, 8, t, setup.bytes, copy_gbps),
                       "variant": label, "splits": S}
                rows.append(row)
                res[label] = row
                if label not in labels:
                    labels.append(label)
            line = " | ".join(f"{k}: {r['time_us']:.1f} us ({r['ratio']:.2f})"
                              for k, r in res.items())
            print(f"  {name} B={B} ctx={ctx}: {line}  [{time.time() - t0:.0f} s]", flush=True)
            table.append((name, B, ctx, res))
            del setup
    print("\nus (ratio vs copy bandwidth); S = splits of v1 / v3")
    print(f"{'cache':<6}{'B':>5}{'ctx':>6}{'S':>8}" + "".join(f"{lb:>22}" for lb in labels)
          + f"{'v1/v3':>7}")
    for name, B, ctx, res in table:
        v3 = labels[1] if len(labels) > 1 else "v3"
        ss = "/".join(str(res[k]["splits"]) for k in ("v1", v3) if k in res)
        cells = "".join(f"{res[lb]['time_us']:>13.1f} ({res[lb]['ratio']:.2f})" if lb in res
                        else f"{'-':>22}" for lb in labels)
        sp = (f"{res['v1']['time_us'] / res[v3]['time_us']:>7.2f}"
              if "v1" in res and v3 in res else f"{'-':>7}")
        print(f"{name:<6}{B:>5}{ctx:>6}{ss:>8}{cells}{sp}")
    print(f"  variants set: {time.time() - t0:.0f} s", flush=True)
    return rows
