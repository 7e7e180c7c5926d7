"""A single-writer, multi-reader broadcast ring in POSIX shared memory.

Rank 0 writes each step's inputs once; TP worker ranks 1..N-1 read every message in order.
Layout (all little-endian int64 unless noted):

    header: [write_seq, reader_seq[0..R-1], closed]       (R = number of readers)
    slots:  num_slots x ([seq, length] + payload of slot_bytes)

`write(payload)` waits until every reader has consumed the message that last used the slot,
copies the payload in, then publishes `seq` (slot header first, then write_seq). Readers spin
briefly, then sleep in growing steps, on `write_seq`. A message larger than a slot is an error
(the caller sizes slots for the largest step). Python's GIL and the ordering of these plain
stores are enough on x86-64 and on the CPUs MI355 hosts use; `seq` is written last.
"""

from __future__ import annotations

import os
import struct
import time
from multiprocessing import shared_memory

_I64 = struct.Struct("<q")
SPIN_S = 0.05  # busy-wait window before sleeping


class RingClosed(Exception):
    """The writer closed the ring (shutdown)."""


class ShmRing:
    def __init__(self, name: str | None, num_readers: int, num_slots: int = 4,
                 slot_bytes: int = 4 << 20, create: bool = True):
        self.num_readers = num_readers
        self.num_slots = num_slots
        self.slot_bytes = slot_bytes
        self.header_bytes = 8 * (2 + num_readers)
        self.slot_stride = 16 + slot_bytes
        size = self.header_bytes + num_slots * self.slot_stride
        if create:
            self.shm = shared_memory.SharedMemory(name=name, create=True, size=size)
            self.shm.buf[: self.header_bytes] = bytes(self.header_bytes)
            for i in range(num_slots):
                off = self._slot_off(i)
                self.shm.buf[off:off + 16] = bytes(16)
        else:
            self.shm = shared_memory.SharedMemory(name=name, create=False)
        self.name = self.shm.name
        self.buf = self.shm.buf
        self.owner = create
        self._next = 1  # next sequence number to write / read

    def spec(self) -> tuple:
        """What a reader process needs to attach: (name, num_readers, num_slots, slot_bytes)."""
        return (self.name, self.num_readers, self.num_slots, self.slot_bytes)

    @classmethod
    def attach(cls, spec: tuple) -> ShmRing:
        name, readers, slots, slot_bytes = spec
        return cls(name, readers, slots, slot_bytes, create=False)

    # ---------------------------------------------------------------- helpers
    def _get(self, off: int) -> int:
        return _I64.unpack_from(self.buf, off)[0]

    def _set(self, off: int, value: int) -> None:
        _I64.pack_into(self.buf, off, value)

    def _slot_off(self, i: int) -> int:
        return self.header_bytes + i * self.slot_stride

    @property
    def closed(self) -> bool:
        return self._get(8 * (1 + self.num_readers)) != 0

    # ---------------------------------------------------------------- writer
    def write(self, payload: bytes | memoryview, timeout: float | None = None,
              alive=None) -> None:
        """Publish one message. `alive()` (optional) is polled while waiting for slow readers;
        returning False raises RuntimeError (a reader died)."""
        n = len(payload)
        if n > self.slot_bytes:
            raise ValueError(f"message of {n} bytes exceeds the ring slot ({self.slot_bytes})")
        seq = self._next
        oldest_needed = seq - self.num_slots  # the message that last used this slot
        if oldest_needed > 0:
            self._wait(lambda: all(self._get(8 * (1 + r)) >= oldest_needed
                                   for r in range(self.num_readers)), timeout, alive)
        off = self._slot_off(seq % self.num_slots)
        self.buf[off + 16:off + 16 + n] = payload
        self._set(off + 8, n)
        self._set(off, seq)
        self._set(0, seq)
        self._next = seq + 1

    def close(self) -> None:
        """Mark closed (readers raise RingClosed) and release the segment if we own it."""
        if self.owner:
            self._set(8 * (1 + self.num_readers), 1)

    def unlink(self) -> None:
        try:
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
        """The next message for `reader` (0-based), in order."""
        seq = self._next
        self._wait(lambda: self._get(0) >= seq or self.closed, timeout, None)
        if self._get(0) < seq:
            raise RingClosed()
        off = self._slot_off(seq % self.num_slots)
        assert self._get(off) == seq, "ring overrun: a reader fell a full ring behind"
        n = self._get(off + 8)
        data = bytes(self.buf[off + 16:off + 16 + n])
        self._set(8 * (1 + reader), seq)
        self._next = seq + 1
        return data

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
