"""Wire format of the TP step broadcast: StepInputs whose block tables travel as the writes that
rank 0's BlockTableRows made since the last step (issue 9).

Rank 0 encodes each step once (`StepEncoder.encode`) and every other rank decodes every message
in order (`StepDecoder.decode`), whether it arrives through the node's shared-memory ring or
relayed from another node. The tables of a step ([S, max_blocks] int32, 512 KiB at 256 requests
x 8K context) are `BlockTableRows.table[idx, :max_blocks]` on rank 0 (engine/block_rows.py), and
that persistent [R, W] table changes only where its gather writes: a row gains a block every
block_size steps, a new sequence fills a free row, a reset or a sweep pads a row again. The
table records those writes (`dirty`: per row the hull of the columns set since the encoder last
took them, and the prefix set back to pad), so, like vLLM V1's scheduler output that carries only
new block ids with workers keeping per-request tables, every decoder keeps a mirror of the [R, W]
table and a message carries (`TableSync`):

    shape   (R, W):        the persistent table's shape after this step (it only grows)
    segs    [k] x (row, lo, hi, clear) per dirty row: row[:clear] = pad, then
    vals    int32 [n]:     row[lo:hi] = these, ranges concatenated in order (n = sum(hi - lo))
    idx     int64 [S]:     the persistent row of each batch row
    base    int:           the message epoch the mirror must hold (-1: a snapshot: start from a
                           table of `pad`; segs then cover every live row's synced prefix)

Decoder: the clears and sets into the mirror, then tables = mirror[idx, :max_blocks] (when idx
and max_blocks repeat the last step's, only the changed cells of the last output are patched).
Neither side compares or scans whole tables: the encoder's cost is O(k + n) plus the msgpack of
the rest of StepInputs; in steady decode k ~ S / block_size + a new row now and then. The
decoder's is that plus one copy of the tables (the bytes it hands out), or a gather + a copy
when the batch rows changed.

Contract: for every message m_j, `StepDecoder.decode(m_j)` returns a StepInputs equal (msgspec
equality: every field, `tables` byte-identical bytes) to the one passed to `encode` for m_j,
provided the decoder saw m_1..m_{j-1} of the same encoder and `source` is the BlockTableRows
whose latest gather produced `inputs.tables` (the encoder installs and takes the source's
`dirty` dict; if anything else replaces it, the next message is a snapshot). A delta names the epoch it applies to; a decoder in another state (a lost or
reordered message, no mirror) or a malformed message raises `CodecError`, never returns a wrong
table. Debug check (`check=True`, or env ATOM_STREAM_CHECK_TABLES=1): each message also carries
the CRC-32 of the tables and the decoder verifies it (a pass over the tables on both sides).

qsl and logit_rows equal to range(S + 1) / range(S) (every decode-only step) travel as one
flag: msgpack lists of ints cost more to decode than to rebuild.
"""

from __future__ import annotations

import zlib

import msgspec
import numpy as np

from atom_stream import envs
from atom_stream.engine.block_rows import BlockTableRows
from atom_stream.engine.model_runner import StepInputs

IOTA_QSL, IOTA_LOGITS = 1, 2  # WireStep.iota bits


class CodecError(RuntimeError):
    """A message does not apply to the decoder's state (lost, reordered or malformed)."""


class TableSync(msgspec.Struct, array_like=True):
    """How a decoder rebuilds `inputs.tables` from its mirror (module docstring)."""

    base: int
    pad: int
    shape: tuple[int, int]
    segs: list[tuple[int, int, int, int]]  # a msgpack list: cheaper than bytes at k ~ 16
    vals: bytes
    idx: bytes
    crc: int = -1


class WireStep(msgspec.Struct, array_like=True, tag=True):
    """One step. `inputs.tables` is b"" when `sync` is set; `iota` bits: the lists rebuilt."""

    epoch: int
    inputs: StepInputs
    sync: TableSync | None = None
    iota: int = 0


class WireShutdown(msgspec.Struct, array_like=True, tag=True):
    pass


_DECODER = msgspec.msgpack.Decoder(WireStep | WireShutdown)


def _check_default() -> bool:
    return envs.flag("ATOM_STREAM_CHECK_TABLES")


def _flat(a: np.ndarray) -> memoryview:
    """A 1-D int32 memoryview of C-contiguous int32 array `a` (slices copy with no numpy call:
    per range a memoryview slice costs ~0.1 µs, a numpy call on a tiny array ~1-4 µs)."""
    if not a.flags.c_contiguous:  # reshape would copy: writes through the view would be lost
        raise TypeError("expected a C-contiguous array")
    m = memoryview(a.reshape(-1))
    if m.format != "i" or m.itemsize != 4:
        raise TypeError(f"expected a C int32 buffer, got {m.format!r}")
    return m


class _Iota:
    """Cached list(range(n)) for the recent n: comparing against it is cheap, building is not."""

    def __init__(self) -> None:
        self._lists: dict[int, list[int]] = {}

    def __call__(self, n: int) -> list[int]:
        got = self._lists.get(n)
        if got is None:
            if len(self._lists) > 8:  # batch sizes drift: keep a few
                self._lists.clear()
            got = self._lists[n] = list(range(n))
        return got


class StepEncoder:
    """Rank 0's side. Not thread-safe: the step thread calls encode/encode_shutdown/reset.
    `num_delta` / `num_full` count messages with a table delta / with whole tables or a
    snapshot. `min_delta_cells`: steps whose tables have fewer cells go whole (and the next
    delta starts from a snapshot); 0: never."""

    def __init__(self, min_delta_cells: int = 0, check: bool | None = None) -> None:
        self._enc = msgspec.msgpack.Encoder()
        self.min_delta_cells = min_delta_cells
        self.check = _check_default() if check is None else check
        self.epoch = 0
        self.num_delta = 0
        self.num_full = 0
        self._dirty: dict | None = None  # the dict we installed as source.dirty; None: snapshot
        self._iota = _Iota()
        self._flat_of: np.ndarray | None = None  # the source table _flat views
        self._flat: memoryview | None = None

    def reset(self) -> None:
        """Forget what the decoders hold (the next message with a source is a snapshot). Call it
        when a message may not have reached every decoder."""
        self._dirty = None

    def encode(self, inputs: StepInputs, source: BlockTableRows | None = None) -> bytes:
        """msgpack bytes of `inputs` for `StepDecoder.decode`. `source`: the BlockTableRows whose
        latest gather produced `inputs.tables` (None: the tables travel whole)."""
        S, M = len(inputs.seq_lens), inputs.max_blocks
        ok = False
        try:
            sync = None
            if source is not None and S * M >= self.min_delta_cells:
                if len(source.last_idx) != S:
                    raise CodecError(f"source gathered {len(source.last_idx)} rows, step has {S}")
                sync = self._sync(source)
            else:
                self._dirty = None  # the decoders drop their mirror on a whole table
            iota = 0
            if inputs.qsl == self._iota(S + 1):
                iota |= IOTA_QSL
            if inputs.logit_rows == self._iota(S):
                iota |= IOTA_LOGITS
            if sync is not None or iota:
                if sync is not None and self.check:
                    sync.crc = zlib.crc32(inputs.tables)
                inputs = msgspec.structs.replace(
                    inputs, tables=b"" if sync is not None else inputs.tables,
                    qsl=[] if iota & IOTA_QSL else inputs.qsl,
                    logit_rows=[] if iota & IOTA_LOGITS else inputs.logit_rows)
            self.epoch += 1
            data = self._enc.encode(WireStep(self.epoch, inputs, sync, iota))
            if sync is not None and sync.base >= 0:
                self.num_delta += 1
            else:
                self.num_full += 1
            ok = True
            return data
        finally:
            if not ok:  # the source's dirty ranges may be gone with this message: resync
                self.reset()

    def encode_shutdown(self) -> bytes:
        return self._enc.encode(WireShutdown())

    def _sync(self, src: BlockTableRows) -> TableSync:
        table = src.table
        W = table.shape[1]
        if self._dirty is not None and src.dirty is self._dirty:
            base, dirty = self.epoch, src.dirty
        else:  # snapshot: every live row's synced prefix (all other cells are pad)
            base, dirty = -1, {e.row: (e.row, 0, e.synced, 0)
                               for e in src.entries.values() if e.synced}
        # from here on the source records its writes for the next message
        src.dirty = self._dirty = {}
        if self._flat_of is not table:  # the table is replaced when it grows
            self._flat_of, self._flat = table, _flat(table)
        flat = self._flat
        segs = list(dirty.values())
        return TableSync(
            base=base, pad=src.pad, shape=table.shape, segs=segs,
            vals=b"".join([flat[r * W + lo:r * W + hi] for r, lo, hi, _ in segs]),
            idx=src.last_idx.tobytes())


class StepDecoder:
    """A receiving rank's side: decodes every message of one StepEncoder, in order. Keeps the
    mirror [R, W] int32 of rank 0's BlockTableRows.table and the last tables it handed out
    ([S, M], patched in place while the batch rows repeat: one copy per step, the bytes)."""

    def __init__(self) -> None:
        self.epoch = 0
        self._mirror: np.ndarray | None = None
        self._mflat: memoryview | None = None  # _flat(_mirror)
        self._pad: memoryview | None = None  # W cells of pad
        self._out: np.ndarray | None = None  # the last tables, [S, M]
        self._oflat: memoryview | None = None
        self._out_idx = b""  # the idx bytes _out was gathered with
        self._inv: list[int] | None = None  # [R]: batch position of each mirror row, else -1

    def decode(self, data: bytes | memoryview) -> StepInputs | None:
        """The StepInputs of a step message, or None for a shutdown message."""
        msg = _DECODER.decode(data)
        if isinstance(msg, WireShutdown):
            return None
        inp, sync = msg.inputs, msg.sync
        S = len(inp.seq_lens)
        if msg.iota & IOTA_QSL:
            inp.qsl = list(range(S + 1))
        if msg.iota & IOTA_LOGITS:
            inp.logit_rows = list(range(S))
        if sync is None:
            self._mirror = self._out = None  # the encoder sends a snapshot before a delta
        else:
            try:
                inp.tables = self._apply(sync, S, inp.max_blocks)
            except (ValueError, IndexError, TypeError) as e:  # inconsistent sizes
                self._mirror = self._out = None
                raise CodecError(f"malformed table sync: {e}") from e
            if sync.crc >= 0 and zlib.crc32(inp.tables) != sync.crc:
                self._mirror = self._out = None
                raise CodecError("tables differ from rank 0's (CRC mismatch)")
        self.epoch = msg.epoch
        return inp

    def _apply(self, sync: TableSync, S: int, M: int) -> bytes:
        R, W = sync.shape
        mirror = self._mirror
        if sync.base < 0:
            mirror = None
        elif mirror is None or sync.base != self.epoch:
            raise CodecError(f"step delta for table epoch {sync.base}, decoder holds "
                             f"{self.epoch if mirror is not None else 'none'}")
        if mirror is None or mirror.shape != (R, W):  # a snapshot, or rank 0's table grew
            r, w = (0, 0) if mirror is None else mirror.shape
            if R < r or W < w:
                raise CodecError(f"table shrank from {mirror.shape} to {(R, W)}")
            grown = np.full((R, W), sync.pad, dtype=np.int32)  # rank 0's _grow pads alike
            if mirror is not None:
                grown[:r, :w] = mirror
            mirror = self._mirror = grown
            self._mflat, self._out = _flat(mirror), None
            self._pad = _flat(np.full(W, sync.pad, dtype=np.int32))
        if not 1 <= M <= W:
            raise ValueError(f"max_blocks {M} outside 1..{W}")
        mflat, pad, vals, o = self._mflat, self._pad, memoryview(sync.vals).cast("i"), 0
        segs = sync.segs
        for r, lo, hi, clear in segs:  # k ~ S / block_size in decode: a loop beats numpy
            if not (0 <= r < R and 0 <= lo <= hi <= W and 0 <= clear <= W):
                raise ValueError(f"dirty range {(r, lo, hi, clear)} outside {(R, W)}")
            b = r * W
            if clear:  # before the set range: a reset row is padded, then refilled
                mflat[b:b + clear] = pad[:clear]
            mflat[b + lo:b + hi] = vals[o:o + hi - lo]
            o += hi - lo
        if o != len(vals):
            raise ValueError(f"{len(vals)} values for {o} cells")
        out, inv = self._out, self._inv
        if (out is not None and inv is not None and sync.idx == self._out_idx
                and out.shape == (S, M)):
            # the same batch rows: copy the changed cells that are in the last tables
            oflat = self._oflat
            for r, lo, hi, clear in segs:
                p = inv[r]
                h = min(max(hi, clear), M)
                if clear:
                    lo = 0
                if p >= 0 and h > lo:
                    oflat[p * M + lo:p * M + h] = mflat[r * W + lo:r * W + h]
            return out.tobytes()
        idx = np.frombuffer(sync.idx, dtype=np.int64)
        if len(idx) != S or (S and (idx.min() < 0 or idx.max() >= R)):
            raise ValueError(f"batch rows {len(idx)} (step has {S}) or outside 0..{R - 1}")
        self._out = out = mirror[idx, :M]
        self._oflat, self._out_idx = _flat(out), sync.idx
        inv_a = np.full(R, -1, dtype=np.int64)
        pos = np.arange(S)
        inv_a[idx] = pos
        # a row listed twice has one inverse: patching would miss the other copy
        self._inv = inv_a.tolist() if (inv_a[idx] == pos).all() else None
        return out.tobytes()
