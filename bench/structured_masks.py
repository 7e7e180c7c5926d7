"""Host cost of structured outputs per decode step: the token mask of a guided row.

Builds a byte-level vocabulary of `--vocab` tokens (the 256 bytes, then random words of 1-12
bytes drawn from JSON-ish text, a fixed seed: Kimi-K2.5's vocabulary is 163,840 ids), compiles
each spec (json_object, a JSON schema, a regex, a choice list), then walks `--texts` valid texts
token by token (each text greedily tokenized by longest match), timing `GuideState.bits` per
token: "cold" the first walk (every DFA state's mask computed once), "warm" a second walk of
the same texts (masks cached per state). CPU only.

    python bench/structured_masks.py [--vocab 163840] [--texts 8] [--json bench/results/x.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from atom_stream.structured.dfa import JsonDFA, RegexDFA
from atom_stream.structured.guide import Grammar, GuideState, TokenIndex
from atom_stream.structured.json_schema import choice_regex, schema_to_regex

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
    "required": ["name", "age", "tags"]}


def vocab(n: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    words = [b'{"name":', b'"age":', b"[1,", b"2.5],", b'"tags":', b"true", b"false", b"null",
             b"alpha", b"beta", b"gamma", b"delta", b"the", b"of", b"and", b"to", b"in", b"is"]
    chars = list(b' abcdefghijklmnopqrstuvwxyz{}[]":,0123456789.-\n')
    out = [bytes([i]) for i in range(256)]
    seen = set(out)
    while len(out) < n:
        w = rng.choice(words) if rng.random() < 0.05 else bytes(
            rng.choice(chars) for _ in range(rng.randint(1, 12)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def tokenize(text: bytes, table: dict[bytes, int], max_len: int) -> list[int]:
    ids, i = [], 0
    while i < len(text):
        for k in range(min(max_len, len(text) - i), 0, -1):
            t = table.get(text[i:i + k])
            if t is not None:
                ids.append(t)
                i += k
                break
    return ids


def texts_for(kind: str, rng: random.Random, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        name = "".join(rng.choice("abc xyz") for _ in range(rng.randint(1, 20)))
        person = {"name": name, "age": rng.randint(0, 150),
                  "tags": [rng.choice(["alpha", "beta"]) for _ in range(rng.randint(0, 4))]}
        if kind in ("json_object", "schema"):
            out.append(json.dumps(person, indent=rng.choice([None, 2])).encode())
        elif kind == "regex":
            out.append(f"{rng.randint(1, 9999)}.{rng.randint(0, 99):02d}".encode())
        else:
            out.append(rng.choice([b"positive", b"negative", b"neutral"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=163840)
    ap.add_argument("--texts", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    table = vocab(args.vocab)
    index = TokenIndex(table, args.vocab)
    build_s = time.perf_counter() - t0
    lookup = {b: i for i, b in enumerate(table)}
    specs = {"json_object": lambda: JsonDFA(),
             "schema": lambda: RegexDFA(schema_to_regex(PERSON)),
             "regex": lambda: RegexDFA(r"-?[1-9][0-9]{0,3}\.[0-9]{2}"),
             "choice": lambda: RegexDFA(choice_regex(["positive", "negative", "neutral"]))}
    rows = []
    print(f"vocab {args.vocab}: TokenIndex built in {build_s * 1e3:.0f} ms")
    print(f"{'spec':<12} {'compile ms':>10} {'tokens':>7} {'states':>7} {'cold ms/tok':>12} "
          f"{'warm us/tok':>12} {'warm p99 us':>12}")
    for kind, make in specs.items():
        t0 = time.perf_counter()
        grammar = Grammar(make(), index)
        compile_ms = (time.perf_counter() - t0) * 1e3
        texts = texts_for(kind, random.Random(1), args.texts)
        ids = [tokenize(t, lookup, index.max_len) for t in texts]
        timings = {}
        for phase in ("cold", "warm"):
            per = []
            for seq in ids:
                guide = GuideState(grammar, (args.vocab - 1,))
                for k in range(len(seq) + 1):
                    t0 = time.perf_counter()
                    bits = guide.bits(seq[:k])
                    per.append(time.perf_counter() - t0)
                    assert k == len(seq) or bits[seq[k] >> 3] >> (seq[k] & 7) & 1, (kind, k)
            timings[phase] = per
        cold, warm = timings["cold"], timings["warm"]
        row = {"spec": kind, "vocab": args.vocab, "compile_ms": compile_ms,
               "tokens": len(cold), "dfa_states": grammar.dfa.num_states,
               "cold_ms_per_token": 1e3 * statistics.mean(cold),
               "warm_us_per_token": 1e6 * statistics.mean(warm),
               "warm_p99_us": 1e6 * sorted(warm)[int(0.99 * (len(warm) - 1))]}
        rows.append(row)
        print(f"{kind:<12} {compile_ms:>10.1f} {row['tokens']:>7} {row['dfa_states']:>7} "
              f"{row['cold_ms_per_token']:>12.2f} {row['warm_us_per_token']:>12.1f} "
              f"{row['warm_p99_us']:>12.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"index_build_ms": build_s * 1e3, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
