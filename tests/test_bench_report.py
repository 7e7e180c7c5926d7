"""bench/report.py: the rows' JSON file and the right-aligned table the bench scripts print."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))

from report import format_table, save_rows


def test_table_matches_hand_formatting_and_rows_round_trip(tmp_path):
    rows = [{"batch": 1, "ctx": 1024, "async": True, "step_ms": 6.24381, "idle": 0.0312},
            {"batch": 64, "ctx": 8192, "async": False, "step_ms": 42.7839, "idle": 0.5}]
    lines = format_table(rows, [("B", "batch", 4, ""), ("ctx", "ctx", 6, ""),
                                ("async", lambda r: str(r["async"]), 6, ""),
                                ("step_ms", "step_ms", 9, ".3f"),
                                ("idle", lambda r: f"{100 * r['idle']:.1f}%", 7, "")])
    want = [f"{'B':>4} {'ctx':>6} {'async':>6} {'step_ms':>9} {'idle':>7}"]
    want += [f"{r['batch']:>4} {r['ctx']:>6} {r['async']!s:>6} {r['step_ms']:>9.3f} "
             f"{100 * r['idle']:>6.1f}%" for r in rows]
    assert lines == want
    path = tmp_path / "deep" / "rows.json"
    save_rows(str(path), rows)
    assert json.loads(path.read_text()) == rows
