"""Persistent block-table rows for ModelRunner.build_inputs and the TP step broadcast.

`BlockTableRows.gather(seqs)` returns the [S, max_blocks] int32 block tables of a batch from an
incremental copy (one row per live Sequence) instead of flattening every list each step; the
step codec (engine/step_codec.py) mirrors that copy on the other TP ranks from the writes this
class records (`dirty`), so neither side compares or resends whole tables.
"""

from __future__ import annotations

import numpy as np

from atom_stream import envs


class _Row:
    """One sequence's row: `synced` leading entries of list `table` copied; epoch; last gather."""

    __slots__ = ("epoch", "row", "seen", "synced", "table")

    def __init__(self, row: int, table: list[int], epoch: int):
        self.row, self.table, self.synced, self.epoch, self.seen = row, table, 0, epoch, 0


class BlockTableRows:
    """Persistent int32 copy of live sequences' block tables, one row per Sequence (identity),
    padded with `pad`. `gather(seqs)` -> ([S, max_blocks] int32, max_blocks), equal to
    flattening every table from scratch, in O(blocks appended since the last gather + S *
    max_blocks memcpy). Contract: a table changes only by `append`, by `clear()` in
    BlockManager.free (bumps `seq.table_epoch`) or by assigning a new list; the last two (or a
    table shorter than the copy) resync the row. Invariant: row[synced:] == pad. Every SWEEP
    gathers, rows of finished sequences or not gathered in SWEEP steps are freed.

    For the TP step broadcast (engine/step_codec.py, which mirrors `table` on the other ranks):
    `last_idx` int64 [S] are the rows the last gather returned, in order; once the encoder sets
    `dirty` to a dict, every write to `table` since the encoder last took the dict is recorded
    there as row -> (row, lo, hi, clear): [lo, hi) is the hull of the columns set to block ids,
    [0, clear) the columns set back to pad (before them); None: nobody listens, no cost.
    `check` (env ATOM_STREAM_CHECK_TABLES=1): every gather verifies each gathered row against
    its sequence's list and raises AssertionError when a table changed outside the contract."""

    SWEEP = 32
    check = envs.flag("ATOM_STREAM_CHECK_TABLES")

    def __init__(self, pad: int, rows: int = 16, width: int = 16):
        self.pad, self.step, self.entries = pad, 0, {}  # entries: Sequence -> _Row
        self.table = np.full((rows, width), pad, dtype=np.int32)
        self.free_rows = list(range(rows - 1, -1, -1))
        self.dirty: dict[int, tuple[int, int, int, int]] | None = None
        self.last_idx = np.zeros(0, dtype=np.int64)

    def _mark(self, row: int, lo: int, hi: int, clear: int = 0) -> None:
        # (lo, hi) = (0, 0) of a clear-only entry widens a later set range to start at 0: the
        # extra cells are sent with their current values, which is harmless
        d = self.dirty.get(row)
        self.dirty[row] = (row, lo, hi, clear) if d is None else (
            row, min(d[1], lo), max(d[2], hi), max(d[3], clear))

    def gather(self, seqs) -> tuple[np.ndarray, int]:
        self.step = step = self.step + 1
        if step % self.SWEEP == 0:
            self._sweep()
        entries, idx, max_blocks, dirty = self.entries, [], 1, self.dirty
        for s in seqs:
            bt = s.block_table
            n = len(bt)
            e = entries.get(s)
            if e is None:
                if not self.free_rows:
                    self._grow(2 * self.table.shape[0], self.table.shape[1])
                e = entries[s] = _Row(self.free_rows.pop(), bt, s.table_epoch)
            elif e.epoch != s.table_epoch or e.table is not bt or n < e.synced:  # reset
                self.table[e.row, :e.synced] = self.pad
                if dirty is not None and e.synced:
                    self._mark(e.row, 0, 0, e.synced)
                e.synced, e.epoch, e.table = 0, s.table_epoch, bt
            if n != e.synced:
                if n > self.table.shape[1]:  # at least double, so widening stays rare
                    self._grow(self.table.shape[0], max(n, 2 * self.table.shape[1]))
                self.table[e.row, e.synced:n] = bt[e.synced:n]
                if dirty is not None:
                    self._mark(e.row, e.synced, n)
                e.synced = n
            e.seen = step
            idx.append(e.row)
            max_blocks = max(max_blocks, n)
        self.last_idx = idx = np.array(idx, dtype=np.int64)
        if self.check:
            self._check(seqs, idx)
        return self.table[idx, :max_blocks], max_blocks

    def _check(self, seqs, idx: np.ndarray) -> None:
        for s, r in zip(seqs, idx.tolist()):
            n = len(s.block_table)
            if self.table[r, :n].tolist() != s.block_table or (self.table[r, n:] != self.pad).any():
                raise AssertionError(f"block table of {s!r} changed other than by append, "
                                     "BlockManager.free (table_epoch) or a new list")

    def _grow(self, rows: int, width: int) -> None:
        old = self.table
        r, w = old.shape
        self.table = np.full((rows, width), self.pad, dtype=np.int32)
        self.table[:r, :w] = old
        self.free_rows += range(rows - 1, r - 1, -1)

    def _sweep(self) -> None:
        horizon = self.step - self.SWEEP
        for seq, e in list(self.entries.items()):
            if e.seen <= horizon or seq.is_finished:
                self.table[e.row, :e.synced] = self.pad
                if self.dirty is not None and e.synced:
                    self._mark(e.row, 0, 0, e.synced)
                self.free_rows.append(e.row)
                del self.entries[seq]
