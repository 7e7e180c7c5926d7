"""Wire format of the TP step broadcast: StepInputs with block-table deltas (issue 9).

Rank 0 encodes each step once (`StepEncoder.encode`) and every other rank decodes every message
in order (`StepDecoder.decode`), whether it arrives through the node's shared-memory ring or
relayed from another node. In steady decode the block tables ([S, max_blocks] int32, 512 KiB at
256 requests x 8K context) barely change between steps: a row gains a block every block_size
steps and the batch loses or gains a row now and then. So the encoder remembers the table it sent
last and sends, instead of the table:

    ref   int32 [S]: the row of the previous table each new row starts from (-1: none);
                     empty bytes = "row i from row i" (identity; rows past the old end: none)
    fill  int32:     the value of cells with no source (new rows, columns past the old width)
    unit  4 | 8:     patch granularity in bytes (8: the table is patched as int64 pairs)
    idx   int32 [n]: flat indices (in units) of the base [S, max_blocks] that differ from it
    vals  [n]:       their new values (int32 or int64 as `unit`)

The base is `prev[ref]` cut or padded to the new width with `fill`; base + patch is the table,
byte for byte. A full table is sent instead when that is not larger (first step, after
`reset()`, tiny tables, heavy churn). Rows are matched by identity of the objects passed as
`rows` (the batch's Sequence objects; the encoder holds the previous list so ids are not reused
while it matters) and by position otherwise. Matching only affects the size of the patch, never
the result.

Contract: for every message m_k, `StepDecoder.decode(m_k)` returns a StepInputs equal (msgspec
equality: every field, `tables` byte-identical) to the one passed to `encode` for m_k, provided the
decoder saw m_1..m_{k-1} of the same encoder. Each message names the epoch of the table it
patches; a decoder in another state raises `CodecError` instead of building a wrong table.

Cost: vectorized numpy; Python loops only over runs of consecutive rows (at most MAX_RUNS). The
encoder compares the whole table with the last one in place (reads both, copies neither); the
decoder patches its own copy in place and hands out one bytes copy. So on one node the delta
saves the copies of the table (msgpack, ring, reader) but not a pass over it; its main gain is
the bytes: ~10 KB instead of ~560 KB per step at 256 x 8K, which is what crosses the network in
the multi-node relay (engine/multinode.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import msgspec
import numpy as np

from atom_stream.engine.model_runner import StepInputs

MIN_DELTA_CELLS = 1024  # smaller tables are sent whole: a delta would not pay for itself
MAX_RUNS = 32  # more row runs than this (a reshuffled batch): compare against a built base


class CodecError(RuntimeError):
    """A delta does not apply to the decoder's state (a message was lost or reordered)."""


class TableDelta(msgspec.Struct, array_like=True):
    base: int  # epoch of the table this delta applies to
    ref: bytes
    fill: int
    unit: int
    idx: bytes
    vals: bytes


class WireStep(msgspec.Struct, array_like=True, tag=True):
    """One step. `inputs.tables` is b"" when `delta` is set."""

    epoch: int
    inputs: StepInputs
    delta: TableDelta | None = None


class WireShutdown(msgspec.Struct, array_like=True, tag=True):
    pass


_DECODER = msgspec.msgpack.Decoder(WireStep | WireShutdown)


def _base(prev: np.ndarray, ref: np.ndarray | None, out: np.ndarray, fill: int) -> None:
    """Fill `out` [rows, cols]: row i = prev[ref[i]] (ref None: prev[i]), cut or padded with
    `fill` to cols; rows with no source (ref < 0, or past prev's end) = fill."""
    rows, cols = out.shape
    w = min(cols, prev.shape[1])
    out[:, w:] = fill
    if ref is None:
        n = min(rows, prev.shape[0])
        out[:n, :w] = prev[:n, :w]
        out[n:, :w] = fill
    else:
        ok = ref >= 0
        out[ok, :w] = prev[ref[ok], :w]
        out[~ok, :w] = fill


def _units(a: np.ndarray, unit: int) -> np.ndarray:
    """The flat view of a contiguous int32 array in patch units (int32, or int64 pairs)."""
    return a.reshape(-1).view(np.int64 if unit == 8 else np.int32)


class StepEncoder:
    """Rank 0's side. Not thread-safe: one step thread calls encode/encode_shutdown/reset."""

    def __init__(self, min_delta_cells: int = MIN_DELTA_CELLS) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self.min_delta_cells = min_delta_cells
        self.epoch = 0
        self.num_delta = 0  # messages sent with a table delta / with the full table
        self.num_full = 0
        self._prev: np.ndarray | None = None  # [S, M] view of the last tables sent
        self._prev_rows: list | None = None
        self._prev_ids: tuple[np.ndarray, np.ndarray] | None = None  # sorted ids, their order
        self._cur_ids: tuple[np.ndarray, np.ndarray] | None = None

    def reset(self) -> None:
        """Forget the last table (the next message carries a full table). Call it when a
        message may not have reached every decoder."""
        self._prev = None
        self._prev_rows = None
        self._prev_ids = None

    def encode(self, inputs: StepInputs, rows: Sequence | None = None) -> bytes:
        """msgpack bytes of `inputs` for `StepDecoder.decode`. `rows` (optional): one object per
        table row naming its sequence (the batch's Sequence objects), compared with `==`; used
        only to find the previous row of each sequence."""
        S, M = len(inputs.seq_lens), inputs.max_blocks
        table = np.frombuffer(inputs.tables, dtype=np.int32).reshape(S, M)
        rows = list(rows) if rows is not None and len(rows) == S else None
        same_rows = rows is not None and rows == self._prev_rows
        self._cur_ids = None
        delta = None
        if self._prev is not None and S * M >= self.min_delta_cells:
            delta = self._delta(table, rows, same_rows)
        self.epoch += 1
        if delta is not None:
            inputs = msgspec.structs.replace(inputs, tables=b"")
            self.num_delta += 1
        else:
            self.num_full += 1
        data = self._enc.encode(WireStep(self.epoch, inputs, delta))
        self._prev = table  # a view on the caller's immutable bytes: no copy
        if not same_rows:
            self._prev_ids = self._cur_ids  # None: computed on demand
        self._prev_rows = rows
        return data

    def encode_shutdown(self) -> bytes:
        return self._enc.encode(WireShutdown())

    # ------------------------------------------------------------------ internals
    def _match(self, rows: list) -> np.ndarray:
        """ref for `rows`: the index of the same object among the previous rows, else -1."""
        if self._prev_ids is None:
            self._prev_ids = _sorted_ids(self._prev_rows)
        ids, order = self._prev_ids
        self._cur_ids = _sorted_ids(rows)  # the next step's previous rows
        if not len(ids):
            return np.full(len(rows), -1, dtype=np.int32)
        keys = np.fromiter(map(id, rows), np.int64, len(rows))
        pos = np.minimum(np.searchsorted(ids, keys), len(ids) - 1)
        return np.where(ids[pos] == keys, order[pos], -1).astype(np.int32)

    def _delta(self, table: np.ndarray, rows: list | None,
               same_rows: bool) -> TableDelta | None:
        prev = self._prev
        S, M = table.shape
        S0, M0 = prev.shape
        # int64 pairs halve the compare and the patch; they need rows of even, unchanged width
        unit = 8 if M % 2 == 0 and M == M0 else 4
        new_u = _units(table, unit)
        fill = 0
        if (S, M) == (S0, M0) and (rows is None or same_rows):
            # steady decode: the same rows, each maybe one block longer. One vectorized compare.
            positional = True
            idx = np.flatnonzero(np.not_equal(new_u, _units(prev, unit)))
        else:
            if rows is None or self._prev_rows is None:
                ref = np.arange(S, dtype=np.int32)
                ref[S0:] = -1
            else:
                ref = self._match(rows)
            positional = S <= S0 and np.array_equal(ref, np.arange(S))
            # scratch (the pad value) is the largest id in a padded table's last column
            fill = int(table[:, -1].max())
            idx = self._changed_rows(table, ref, fill, unit)
            if idx is None:  # rows reshuffled: compare against a built base
                base = np.empty((S, M), dtype=np.int32)
                _base(prev, None if positional else ref, base, fill)
                idx = np.flatnonzero(np.not_equal(new_u, _units(base, unit)))
        if idx.size * (4 + unit) + (0 if positional else 4 * S) >= table.nbytes:
            return None  # dense change: the full table is smaller
        return TableDelta(base=self.epoch, ref=b"" if positional else ref.tobytes(),
                          fill=fill, unit=unit, idx=idx.astype(np.int32).tobytes(),
                          vals=new_u[idx].tobytes())

    def _changed_rows(self, table: np.ndarray, ref: np.ndarray, fill: int,
                      unit: int) -> np.ndarray | None:
        """Changed unit indices of `table` against the base that `ref`/`fill` describe,
        compared run by run in place (no base copy); None beyond MAX_RUNS runs of rows."""
        S, M = table.shape
        prev = self._prev
        neg = ref < 0
        same_run = (ref[1:] == ref[:-1] + 1) & ~neg[:-1] | (neg[1:] & neg[:-1])
        bounds = [0, *(np.flatnonzero(~same_run) + 1).tolist(), S]
        if len(bounds) > MAX_RUNS + 1:
            return None
        parts = []
        if M == prev.shape[1]:  # flat runs of whole rows, in patch units
            new_u, prev_u = _units(table, unit), _units(prev, unit)
            fill_u = np.array([fill, fill], np.int32).view(np.int64)[0] if unit == 8 else fill
            row = M * 4 // unit
            for a, b in itertools.pairwise(bounds):
                c = int(ref[a])
                old = fill_u if c < 0 else prev_u[c * row:(c + b - a) * row]
                parts.append(np.flatnonzero(np.not_equal(new_u[a * row:b * row], old)) + a * row)
            return np.concatenate(parts)
        w = min(M, prev.shape[1])  # width changed (unit 4): the common columns, then the rest
        for a, b in itertools.pairwise(bounds):
            c = int(ref[a])
            old = fill if c < 0 else prev[c:c + b - a, :w]
            r, col = np.nonzero(np.not_equal(table[a:b, :w], old))
            parts.append((r + a) * M + col)
        if M > w:
            r, col = np.nonzero(np.not_equal(table[:, w:], fill))
            parts.append(r * M + col + w)
        return np.concatenate(parts)


def _sorted_ids(rows: list) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter(map(id, rows), np.int64, len(rows))
    order = np.argsort(ids, kind="stable")
    return ids[order], order


class StepDecoder:
    """A receiving rank's side: decodes every message of one StepEncoder, in order. Keeps the
    last table in a bytearray, patched in place in steady decode (one copy per step: the bytes
    handed out)."""

    def __init__(self) -> None:
        self.epoch = 0
        self._buf: bytearray | None = None
        self._table: np.ndarray | None = None  # [S, M] view of _buf

    def decode(self, data: bytes | memoryview) -> StepInputs | None:
        """The StepInputs of a step message, or None for a shutdown message."""
        msg = _DECODER.decode(data)
        if isinstance(msg, WireShutdown):
            return None
        inp, d = msg.inputs, msg.delta
        S, M = len(inp.seq_lens), inp.max_blocks
        if d is None:
            self._buf = bytearray(inp.tables)
            self._table = np.frombuffer(self._buf, dtype=np.int32).reshape(S, M)
        else:
            if self._table is None or d.base != self.epoch:
                raise CodecError(f"step delta for table epoch {d.base}, decoder holds "
                                 f"{self.epoch if self._table is not None else 'none'}")
            if d.ref or self._table.shape != (S, M):
                buf = bytearray(4 * S * M)
                table = np.frombuffer(buf, dtype=np.int32).reshape(S, M)
                ref = np.frombuffer(d.ref, dtype=np.int32) if d.ref else None
                _base(self._table, ref, table, d.fill)
                self._buf, self._table = buf, table
            dt = np.int64 if d.unit == 8 else np.int32
            _units(self._table, d.unit)[np.frombuffer(d.idx, dtype=np.int32)] = np.frombuffer(
                d.vals, dtype=dt)
            inp.tables = bytes(self._buf)
        self.epoch = msg.epoch
        return inp
