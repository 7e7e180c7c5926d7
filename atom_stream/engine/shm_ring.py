"""A single-writer, multi-reader broadcast ring in POSIX shared memory.

Rank 0 writes each step's inputs once; TP worker ranks 1..N-1 read every message in order.
Layout (all little-endian int64 unless noted):

    header: [write_seq, reader_seq[0..R-1], closed]       (R = number of readers)
    slots:  num_slots x ([seq, length, more] + payload of slot_bytes)

A message travels as one or more chunks, each in its own slot with its own `seq` (`more` is 1
on every chunk but the last). `write(payload)` waits, per chunk, until every reader has consumed
the chunk that last used the slot, copies the chunk in, then publishes `seq` (slot header
first, then write_seq). Every int64 cell is read and written through a memoryview cast to
"q": one aligned 8-byte load or store (`struct` goes byte by byte, and a read racing such a
store could see a mix of old and new bytes). Readers spin briefly, then sleep in growing steps,
on `write_seq`, and
join the chunks; a reader releases each slot as it copies it out, so a message may be larger
than the whole ring. A ring made with `chunked=False` refuses (ValueError) a message larger
than one slot instead. Python's GIL and the ordering of these plain stores are enough on x86-64
and on the CPUs MI355 hosts use; `seq` is written last.
"""

from __future__ import annotations

import os
import time
from multiprocessing import shared_memory

_SLOT_HEAD = 24  # seq, length, more
SPIN_S = 0.05  # busy-wait window before sleeping


class RingClosed(Exception):
    """The writer closed the ring (shutdown)."""


class ShmRing:
    """`chunked` (the writer's side): a message larger than a slot is split over consecutive
    slots (else it is a ValueError). Readers reassemble chunks either way."""

    def __init__(self, name: str | None, num_readers: int, num_slots: int = 4,
                 slot_bytes: int = 4 << 20, create: bool = True, chunked: bool = False):
        self.num_readers = num_readers
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.chunked = chunked
        self.header_bytes = 8 * (2 + num_readers)
        self.slot_stride = _SLOT_HEAD + -(-slot_bytes // 8) * 8  # every slot head 8-aligned
        size = self.header_bytes + num_slots * self.slot_stride
        if create:
            self.shm = shared_memory.SharedMemory(name=name, create=True, size=size)
            self.shm.buf[: self.header_bytes] = bytes(self.header_bytes)
            for i in range(num_slots):
                off = self._slot_off(i)
                self.shm.buf[off:off + _SLOT_HEAD] = bytes(_SLOT_HEAD)
        else:
            self.shm = shared_memory.SharedMemory(name=name, create=False)
        self.name = self.shm.name
        self.buf = self.shm.buf
        self._cells = self.buf[:size].cast("q")  # int64 cells (offset // 8): atomic loads/stores
        self.owner = create
        self._next = 1  # next sequence number (chunk) to write / read
        self._parts: list[bytes] = []  # a reader's chunks of a message not yet complete

    def spec(self) -> tuple:
        """What a reader process needs to attach: (name, num_readers, num_slots, slot_bytes)."""
        return (self.name, self.num_readers, self.num_slots, self.slot_bytes)

    @classmethod
    def attach(cls, spec: tuple) -> ShmRing:
        name, readers, slots, slot_bytes = spec
        return cls(name, readers, slots, slot_bytes, create=False)

    # ---------------------------------------------------------------- helpers
    def _get(self, off: int) -> int:
        return self._cells[off >> 3]

    def _set(self, off: int, value: int) -> None:
        self._cells[off >> 3] = value

    def _slot_off(self, i: int) -> int:
        return self.header_bytes + i * self.slot_stride

    @property
    def closed(self) -> bool:
        return self._get(8 * (1 + self.num_readers)) != 0

    # ---------------------------------------------------------------- writer
    def write(self, payload: bytes | memoryview, timeout: float | None = None,
              alive=None) -> None:
        """Publish one message (in ceil(len / slot_bytes) chunks; one for an empty message).
        `timeout` bounds the whole message; `alive()` (optional) is polled while waiting for
        slow readers: returning False raises RuntimeError (a reader died)."""
        n = len(payload)
        if n > self.slot_bytes and not self.chunked:
            raise ValueError(f"message of {n} bytes exceeds the ring slot ({self.slot_bytes})")
        deadline = None if timeout is None else time.monotonic() + timeout
        view = memoryview(payload).cast("B")
        for lo in range(0, max(n, 1), self.slot_bytes):
            hi = min(n, lo + self.slot_bytes)
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._write_chunk(view[lo:hi], hi < n, left, alive)

    def _write_chunk(self, chunk: memoryview, more: bool, timeout: float | None,
                     alive) -> None:
        seq = self._next
        oldest_needed = seq - self.num_slots  # the chunk that last used this slot
        if oldest_needed > 0:
            self._wait(lambda: all(self._get(8 * (1 + r)) >= oldest_needed
                                   for r in range(self.num_readers)), timeout, alive)
        off = self._slot_off(seq % self.num_slots)
        n = len(chunk)
        self.buf[off + _SLOT_HEAD:off + _SLOT_HEAD + n] = chunk
        self._set(off + 8, n)
        self._set(off + 16, int(more))
        self._set(off, seq)
        self._set(0, seq)
        self._next = seq + 1

    def close(self) -> None:
        """Mark closed (readers raise RingClosed) and release the segment if we own it."""
        if self.owner:
            self._set(8 * (1 + self.num_readers), 1)

    def unlink(self) -> None:
        try:
            self._cells.release()
            self.buf.release()
        except Exception:  # noqa: BLE001 - exported views may still exist at shutdown
            pass
        self.shm.close()
        if self.owner:
            try:
                self.shm.unlink()
            except FileNotFoundError:
                pass

    # ---------------------------------------------------------------- reader
    def read(self, reader: int, timeout: float | None = None) -> bytes:
        """The next message for `reader` (0-based), in order. `timeout` bounds the wait for each
        chunk; a TimeoutError part-way through a message keeps the chunks read so far, and the
        next call goes on with that message."""
        while True:
            data, more = self._read_chunk(reader, timeout)
            if not more:
                break
            self._parts.append(data)
        if self._parts:
            self._parts.append(data)
            data, self._parts = b"".join(self._parts), []
        return data

    def _read_chunk(self, reader: int, timeout: float | None) -> tuple[bytes, bool]:
        """The next chunk and whether more of its message follow; releases its slot."""
        seq = self._next
        self._wait(lambda: self._get(0) >= seq or self.closed, timeout, None)
        # closed only by the flag: the writer sets it after its last store, so write_seq read
        # after it is final (a second read of write_seq alone, racing the writer's next store,
        # once saw a mix of bytes below `seq` and ended a TP worker mid-run)
        if self.closed and self._get(0) < seq:
            raise RingClosed()
        off = self._slot_off(seq % self.num_slots)
        assert self._get(off) == seq, "ring overrun: a reader fell a full ring behind"
        n = self._get(off + 8)
        more = self._get(off + 16) != 0
        data = bytes(self.buf[off + _SLOT_HEAD:off + _SLOT_HEAD + n])
        self._set(8 * (1 + reader), seq)
        self._next = seq + 1
        return data, more

    @staticmethod
    def _wait(ready, timeout: float | None, alive) -> None:
        """Spin (yielding the CPU) for up to SPIN_S so a step starts within microseconds, then
        back off to short sleeps so an idle engine costs no CPU."""
        if ready():
            return
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        n = 0
        while not ready():
            n += 1
            now = time.monotonic()
            if now - start < SPIN_S:
                os.sched_yield()
            else:
                time.sleep(2e-4 if now - start < 1.0 else 1e-3)
                if alive is not None and n % 64 == 0 and not alive():
                    raise RuntimeError("a ring reader died")
            if deadline is not None and now > deadline:
                raise TimeoutError("shared-memory ring wait timed out")
