"""Structured outputs (vLLM's guided decoding): regex / JSON schema / choice / any JSON ->
lazy byte-level DFAs -> per-step token masks (see params.py for the entry points)."""
