"""Cost of broadcasting one decode step's inputs to the TP workers (issue 9 target: < 50 µs per
step at 256 running requests).

A simulated steady decode stream: B sequences around context C (block size 16); every step each
sequence gains a token (a new block every 16 steps, staggered), and every 4th step one sequence
finishes and a new one of the same context joins at the end. Each step's tables come from a
BlockTableRows gather, as in ModelRunner.build_inputs (untimed: rank 0 does it for its own
forward anyway; `gather_us` reports it). The same stream is broadcast twice in the same run:

- `full`:  the old wire format, the whole StepInputs (block tables included) every step;
- `delta`: engine/step_codec.py: the cells BlockTableRows wrote since the last step.

Per step it measures on rank 0 (what the engine loop pays): encode (`sync_us`: the table part of
it) and the shared-memory ring write; in a separate reader process: decode (for `delta`: +
rebuilding the tables from its mirror). Figures are per-step medians (`sender_mean`: the mean,
which includes the steps with a new row, sweeps and preemption spikes on a shared machine);
`delivered_us` (write -> the reader has it) is dominated by scheduling noise on a small shared
machine. A second table: rank 0's cost of the cross-node relay (gloo broadcast to one remote node
leader, over localhost). Prints; writes bench/results/broadcast.json.

    python bench/broadcast.py [--steps 2000]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

import msgspec
import numpy as np

from atom_stream.engine.block_rows import BlockTableRows
from atom_stream.engine.model_runner import StepInputs
from atom_stream.engine.shm_ring import ShmRing
from atom_stream.engine.step_codec import StepDecoder, StepEncoder

BLOCK = 16
SCRATCH = 1 << 20


class FullStep(msgspec.Struct, array_like=True, tag=True):
    """The pre-delta message (StepMessage of engine/distributed.py before issue 9)."""

    inputs: StepInputs


class FullShutdown(msgspec.Struct, array_like=True, tag=True):
    pass


class Seq:
    """A running sequence: what BlockTableRows reads of the engine's Sequence (by identity)."""

    __slots__ = ("block_table", "is_finished", "len", "table_epoch")

    def __init__(self, length: int, blocks: list[int]):
        self.len = length
        self.block_table = blocks
        self.table_epoch = 0
        self.is_finished = False


class DecodeStream:
    """Steady decode with churn; `next()` -> (StepInputs, the BlockTableRows that made its
    tables, seconds the gather took)."""

    def __init__(self, batch: int, ctx: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.ctx = ctx
        self.seqs = [self._new(ctx - int(self.rng.integers(0, 512))) for _ in range(batch)]
        self.rows = BlockTableRows(SCRATCH)
        self.step = 0

    def _new(self, length: int) -> Seq:
        return Seq(length, self.rng.integers(0, SCRATCH, -(-length // BLOCK)).tolist())

    def next(self) -> tuple[StepInputs, BlockTableRows, float]:
        self.step += 1
        for s in self.seqs:
            s.len += 1
            if s.len > len(s.block_table) * BLOCK:
                s.block_table.append(int(self.rng.integers(0, SCRATCH)))
        if self.step % 4 == 0 and len(self.seqs) > 1:
            self.seqs.pop(int(self.rng.integers(0, len(self.seqs)))).is_finished = True
            self.seqs.append(self._new(self.ctx - int(self.rng.integers(0, 512))))
        S = len(self.seqs)
        t0 = time.perf_counter()
        tables, M = self.rows.gather(self.seqs)
        t_gather = time.perf_counter() - t0
        lens = [s.len for s in self.seqs]
        pos = np.asarray(lens, dtype=np.int64) - 1
        slots = tables[np.arange(S), pos // BLOCK].astype(np.int64) * BLOCK + pos % BLOCK
        inp = StepInputs(
            ids=self.rng.integers(0, 163840, S, dtype=np.int64).tobytes(),
            positions=pos.tobytes(), slots=slots.tobytes(), qsl=list(range(S + 1)),
            seq_lens=lens, num_decodes=S, tables=tables.tobytes(), max_blocks=M,
            logit_rows=list(range(S)), prompt_ranges=[], use_graph=True)
        return inp, self.rows, t_gather


def reader(spec, mode: str, out) -> None:
    ring = ShmRing.attach(spec)
    full_dec = msgspec.msgpack.Decoder(FullStep | FullShutdown)
    dec = StepDecoder()
    times = []
    while True:
        data = ring.read(0)
        t0 = time.perf_counter()
        if mode == "full":
            msg = full_dec.decode(data)
            done = isinstance(msg, FullShutdown)
        else:
            done = dec.decode(data) is None
        if done:
            break
        times.append(time.perf_counter() - t0)
    times = times[20:] or times
    out.put((float(np.median(times)), float(np.mean(times))))
    ring.unlink()


def measure(batch: int, ctx: int, mode: str, steps: int) -> dict:
    stream = DecodeStream(batch, ctx)
    enc = StepEncoder()
    t_sync = []
    sync = enc._sync

    def timed_sync(src):  # the table part of encode (instrumentation only)
        t0 = time.perf_counter()
        out = sync(src)
        t_sync.append(time.perf_counter() - t0)
        return out

    enc._sync = timed_sync
    full_enc = msgspec.msgpack.Encoder()
    ring = ShmRing(None, num_readers=1, num_slots=8, slot_bytes=8 << 20)
    ctx_mp = mp.get_context("spawn")
    q = ctx_mp.Queue()
    p = ctx_mp.Process(target=reader, args=(ring.spec(), mode, q))
    p.start()
    t_enc, t_write, t_rtt, t_gather = [], [], [], []
    total = 0
    warm = 20
    for i in range(steps + warm):
        inp, rows, tg = stream.next()  # untimed: the scheduler's and build_inputs' work
        t0 = time.perf_counter()
        if mode == "full":
            data = full_enc.encode(FullStep(inp))
        else:
            data = enc.encode(inp, rows)
        t1 = time.perf_counter()
        ring.write(data, alive=p.is_alive)
        t2 = time.perf_counter()
        while ring._get(8) < i + 1:  # untimed for the sender: steps are ms apart
            pass
        if i >= warm:
            t_rtt.append(time.perf_counter() - t1)
            t_enc.append(t1 - t0)
            t_write.append(t2 - t1)
            t_gather.append(tg)
            total += len(data)
    ring.write(full_enc.encode(FullShutdown()) if mode == "full" else enc.encode_shutdown())
    t_read = q.get()
    p.join()
    ring.unlink()
    enc_a, write_a = np.asarray(t_enc), np.asarray(t_write)
    return {"mode": mode, "batch": batch, "ctx": ctx, "bytes": total // steps,
            "encode_us": 1e6 * np.median(enc_a),
            "sync_us": 1e6 * float(np.median(t_sync[warm:])) if t_sync else 0.0,
            "write_us": 1e6 * np.median(write_a),
            "sender_us": 1e6 * np.median(enc_a + write_a),
            "sender_mean_us": 1e6 * np.mean(enc_a + write_a),
            "delivered_us": 1e6 * np.median(t_rtt), "reader_decode_us": 1e6 * t_read[0],
            "reader_decode_mean_us": 1e6 * t_read[1],
            "gather_us": 1e6 * float(np.median(t_gather))}


def relay_reader(port: int, mode: str) -> None:
    import torch

    from atom_stream.engine.multinode import NodeLayout, RelayLink, new_relay_group

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1,
                                         world_size=2)
    link = RelayLink(new_relay_group(NodeLayout(2, 2)))
    full_dec = msgspec.msgpack.Decoder(FullStep | FullShutdown)
    dec = StepDecoder()
    while True:
        data = link.recv()
        if (isinstance(full_dec.decode(data), FullShutdown) if mode == "full"
                else dec.decode(data) is None):
            break
    torch.distributed.destroy_process_group()


def measure_relay(batch: int, ctx: int, mode: str, steps: int) -> dict:
    """Rank 0's cost of the cross-node relay (engine/multinode.RelayLink: gloo broadcast to a
    remote node leader), here over localhost TCP: encode + send per step."""
    import socket

    import torch

    from atom_stream.engine.multinode import NodeLayout, RelayLink, new_relay_group

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    p = mp.get_context("spawn").Process(target=relay_reader, args=(port, mode))
    p.start()
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                         world_size=2)
    link = RelayLink(new_relay_group(NodeLayout(2, 2)))
    stream, enc, full_enc = DecodeStream(batch, ctx), StepEncoder(), msgspec.msgpack.Encoder()
    times, total = [], 0
    for i in range(steps + 20):
        inp, rows, _ = stream.next()
        t0 = time.perf_counter()
        data = full_enc.encode(FullStep(inp)) if mode == "full" else enc.encode(inp, rows)
        link.send(data)
        if i >= 20:
            times.append(time.perf_counter() - t0)
            total += len(data)
        time.sleep(2e-4)  # steps are apart; let the receiver drain
    link.send(full_enc.encode(FullShutdown()) if mode == "full" else enc.encode_shutdown())
    p.join()
    torch.distributed.destroy_process_group()
    return {"mode": mode, "batch": batch, "ctx": ctx, "bytes": total // steps,
            "relay_send_us": 1e6 * float(np.median(times)),
            "relay_send_mean_us": 1e6 * float(np.mean(times))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    args = ap.parse_args()
    rows = [measure(b, c, mode, args.steps)
            for b, c in ((256, 1024), (256, 8192), (64, 8192), (1, 8192))
            for mode in ("full", "delta")]
    print(f"{'mode':>6} {'batch':>6} {'ctx':>6} {'bytes':>9} {'encode_us':>10} {'sync_us':>8} "
          f"{'write_us':>9} {'sender_us':>10} {'sender_mean':>11} {'delivered_us':>12} "
          f"{'decode_us':>10} {'decode_mean':>11} {'gather_us':>10}")
    for r in rows:
        print(f"{r['mode']:>6} {r['batch']:>6} {r['ctx']:>6} {r['bytes']:>9} "
              f"{r['encode_us']:>10.1f} {r['sync_us']:>8.1f} {r['write_us']:>9.1f} "
              f"{r['sender_us']:>10.1f} {r['sender_mean_us']:>11.1f} "
              f"{r['delivered_us']:>12.1f} {r['reader_decode_us']:>10.1f} "
              f"{r['reader_decode_mean_us']:>11.1f} {r['gather_us']:>10.1f}")
    relay = [measure_relay(256, 8192, mode, args.steps // 4) for mode in ("full", "delta")]
    print("\ncross-node relay (gloo broadcast, localhost): rank 0's encode + send per step")
    print(f"{'mode':>6} {'batch':>6} {'ctx':>6} {'bytes':>9} {'send_us':>9} {'send_mean':>10}")
    for r in relay:
        print(f"{r['mode']:>6} {r['batch']:>6} {r['ctx']:>6} {r['bytes']:>9} "
              f"{r['relay_send_us']:>9.1f} {r['relay_send_mean_us']:>10.1f}")
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/broadcast.json", "w") as f:
        json.dump({"steps": args.steps, "cpus": os.cpu_count(), "rows": rows, "relay": relay},
                  f, indent=1)


if __name__ == "__main__":
    main()
