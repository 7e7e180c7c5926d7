"""What the bench scripts share at their end: writing the rows as JSON and printing them as a
right-aligned table.

    save_rows(path, rows)                    # the JSON file (its folder made)
    print_table(rows, [("B", "batch", 4, "d"), ("step_ms", "step_ms", 9, ".3f"),
                       ("idle", lambda r: f"{100 * r['idle']:.1f}%", 7, "")])

A column is (header, key or row -> value, width, format spec applied to the value).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

Column = tuple[str, "str | Callable[[dict], Any]", int, str]


def save_rows(path: str, rows: list) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(rows, f, indent=1)


def format_table(rows: Sequence[dict], columns: Sequence[Column], sep: str = " ") -> list[str]:
    lines = [sep.join(f"{head:>{width}}" for head, _, width, _ in columns)]
    for r in rows:
        cells = []
        for _, key, width, spec in columns:
            value = key(r) if callable(key) else r[key]
            cells.append(f"{format(value, spec):>{width}}")
        lines.append(sep.join(cells))
    return lines


def print_table(rows: Sequence[dict], columns: Sequence[Column], sep: str = " ") -> None:
    print("\n".join(format_table(rows, columns, sep)))
