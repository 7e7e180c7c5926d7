"""Bench presets: full-size shapes with dummy weights (`--model k25-tp8-rank`, issue 7)."""

from __future__ import annotations

PRESETS: dict[str, dict] = {}
