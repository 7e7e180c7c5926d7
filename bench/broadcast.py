"""Cost of broadcasting one decode step's inputs to the TP workers (issue 9 target: < 50 µs per
step at 256 running requests).

Measures, per step: msgspec encode of StepInputs + shared-memory ring write on rank 0 (what
the engine loop pays), and the reader side (ring read + decode) in a separate process, for 256
decode sequences at context 1K and 8K (block size 16). Prints a table; writes
bench/results/broadcast.json.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

import msgspec
import numpy as np

from atom_stream.engine.distributed import ShutdownMessage, StepMessage, _DECODER
from atom_stream.engine.model_runner import StepInputs
from atom_stream.engine.shm_ring import ShmRing


def make_inputs(batch: int, ctx: int, block_size: int) -> StepInputs:
    rng = np.random.default_rng(0)
    nb = -(-ctx // block_size)
    tables = rng.integers(0, 1 << 20, size=(batch, nb), dtype=np.int32)
    return StepInputs(
        ids=rng.integers(0, 163840, batch, dtype=np.int64).tobytes(),
        positions=np.full(batch, ctx - 1, dtype=np.int64).tobytes(),
        slots=rng.integers(0, 1 << 24, batch, dtype=np.int64).tobytes(),
        qsl=list(range(batch + 1)), seq_lens=[ctx] * batch, num_decodes=batch,
        tables=tables.tobytes(), max_blocks=nb, logit_rows=list(range(batch)),
        prompt_ranges=[], use_graph=True)


def reader(spec, n: int, out) -> None:
    ring = ShmRing.attach(spec)
    t = 0.0
    for _ in range(n + 1):
        data = ring.read(0)
        t0 = time.perf_counter()
        msg = _DECODER.decode(data)
        t += time.perf_counter() - t0
        if isinstance(msg, ShutdownMessage):
            break
    out.put(t)
    ring.unlink()


def measure(batch: int, ctx: int, steps: int = 2000) -> dict:
    enc = msgspec.msgpack.Encoder()
    inp = make_inputs(batch, ctx, 16)
    ring = ShmRing(None, num_readers=1, num_slots=8, slot_bytes=8 << 20)
    q = mp.get_context("spawn").Queue()
    p = mp.get_context("spawn").Process(target=reader, args=(ring.spec(), steps, q))
    p.start()
    t_enc = t_write = t_rtt = 0.0
    size = 0
    for i in range(steps):
        t0 = time.perf_counter()
        data = enc.encode(StepMessage(inp))
        t1 = time.perf_counter()
        ring.write(data, alive=p.is_alive)
        t2 = time.perf_counter()
        # untimed for the sender: wait until the reader has taken it (engine steps are ms apart)
        while ring._get(8) < i + 1:
            pass
        t_rtt += time.perf_counter() - t1
        t_enc += t1 - t0
        t_write += t2 - t1
        size = len(data)
    ring.write(enc.encode(ShutdownMessage()))
    t_read_decode = q.get()
    p.join()
    ring.unlink()
    return {"batch": batch, "ctx": ctx, "bytes": size,
            "encode_us": 1e6 * t_enc / steps, "write_us": 1e6 * t_write / steps,
            "sender_us": 1e6 * (t_enc + t_write) / steps,
            "delivered_us": 1e6 * t_rtt / steps,
            "reader_decode_us": 1e6 * t_read_decode / steps}


def main() -> None:
    rows = [measure(256, 1024), measure(256, 8192), measure(64, 8192), measure(1, 8192)]
    print(f"{'batch':>6} {'ctx':>6} {'bytes':>9} {'encode_us':>10} {'write_us':>9} "
          f"{'sender_us':>10} {'delivered_us':>12} {'reader_decode_us':>17}")
    for r in rows:
        print(f"{r['batch']:>6} {r['ctx']:>6} {r['bytes']:>9} {r['encode_us']:>10.1f} "
              f"{r['write_us']:>9.1f} {r['sender_us']:>10.1f} {r['delivered_us']:>12.1f} "
              f"{r['reader_decode_us']:>17.1f}")
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/broadcast.json", "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
