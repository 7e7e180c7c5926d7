"""Per-token cost of incremental detokenization and stop-string checking (target: < 5 µs/token
on the byte path), called the way the engine calls them: `det.push([tok])` then
`stop.feed(text)` once per sampled token.

Texts: English, CJK + emoji (multi-byte characters split over byte tokens), mixed. Tokenizers:
the demo byte-level tokenizer (one token per byte, the worst case for held partial characters)
and a small Kimi-format tiktoken tokenizer written to a temp dir (tests/tokenizer_fixtures.py).
Also the text path (prefix/read offsets), for comparison. Prints µs/token.

    python bench/detokenize.py [--tokens 200000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from atom_stream.detokenizer import IncrementalDetokenizer, StopStringChecker
from atom_stream.tokenizer import DemoTokenizer, load_tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from tokenizer_fixtures import write_kimi_tokenizer

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog; hello world! " * 4,
    "cjk+emoji": "你好世界，今天天气很好。😀👩‍👩‍👧 日本語のテキスト🇫🇷 " * 4,
    "mixed": "Step 1: 计算 x² + y² = 25 → x=3, y=4 ✅\n```python\nprint('héllo')\n```\n" * 4,
}


class TextOnly:
    """Hides the byte table so the detokenizer takes the text path."""

    def __init__(self, tok):
        self._tok, self.vocab_size = tok, tok.vocab_size

    def decode(self, ids, skip_special_tokens=True):
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def per_token_us(tok, ids: list[int], n_tokens: int, stops: list[str] | None) -> float:
    reps = max(1, n_tokens // len(ids))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            det = IncrementalDetokenizer(tok)
            chk = StopStringChecker(stops) if stops else None
            push = det.push
            if chk is None:
                for t in ids:
                    push([t])
            else:
                feed = chk.feed
                for t in ids:
                    feed(push([t]))
            det.flush()
        best = min(best, (time.perf_counter() - t0) / (reps * len(ids)) * 1e6)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        kimi = load_tokenizer(write_kimi_tokenizer(d))
    toks = {"demo(byte)": DemoTokenizer(), "kimi(byte)": kimi,
            "kimi(text path)": TextOnly(kimi)}
    stops = ["</answer>", "\n\nUser:"]
    print(f"{'tokenizer':18} {'text':10} {'tokens':>6} {'detok µs/tok':>13} "
          f"{'+stop µs/tok':>13}")
    for tname, tok in toks.items():
        enc = kimi if "kimi" in tname else tok
        for xname, text in TEXTS.items():
            ids = enc.encode(text)
            n = args.tokens // (10 if "text path" in tname else 1)
            a = per_token_us(tok, ids, n, None)
            b = per_token_us(tok, ids, n, stops)
            print(f"{tname:18} {xname:10} {len(ids):6d} {a:13.3f} {b:13.3f}")


if __name__ == "__main__":
    main()
