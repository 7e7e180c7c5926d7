"""The shared-memory ring's reader under a racing writer (a TP worker once exited mid-run,
exit code 0, on CI): a second read of write_seq that races the writer's next store must not
read as "closed"; int64 cells sit on 8-byte boundaries for any slot size."""

from __future__ import annotations

import threading

from atom_stream.engine.shm_ring import ShmRing


def _pair(**kw) -> tuple[ShmRing, ShmRing]:
    ring = ShmRing(None, num_readers=1, **kw)
    return ring, ShmRing.attach(ring.spec())


def test_a_lower_second_read_of_write_seq_is_not_closed():
    """The reader sees write_seq reach its chunk, then (racing the next store) a lower value:
    it reads the chunk, as the ring is not closed."""
    ring, reader = _pair(num_slots=4, slot_bytes=32)
    try:
        ring.write(b"hello")
        real = reader._get
        reads = []

        def torn(off: int) -> int:
            value = real(off)
            if off == 0:
                reads.append(value)
                if len(reads) == 2:  # the re-read: old high bytes, new low ones
                    return value - 1
            return value

        reader._get = torn
        assert reader.read(0, timeout=1) == b"hello"
        assert len(reads) >= 1
    finally:
        reader.unlink()
        ring.unlink()


def test_closed_ring_still_raises_ring_closed():
    from atom_stream.engine.shm_ring import RingClosed

    ring, reader = _pair(num_slots=2, slot_bytes=16)
    try:
        ring.write(b"last")
        ring.close()
        assert reader.read(0, timeout=1) == b"last"
        try:
            reader.read(0, timeout=1)
        except RingClosed:
            pass
        else:
            raise AssertionError("a closed, drained ring must raise RingClosed")
    finally:
        reader.unlink()
        ring.unlink()


def test_odd_slot_sizes_keep_cells_aligned_and_messages_whole():
    """slot_bytes not a multiple of 8: every slot head stays 8-aligned; messages of many sizes,
    chunked over several slots, arrive whole and in order across ~1000 chunks (write_seq crosses
    256 and 512, where a byte-wise store would carry into its second byte)."""
    ring = ShmRing(None, num_readers=1, num_slots=3, slot_bytes=13, chunked=True)
    reader = ShmRing.attach(ring.spec())
    try:
        assert all(ring._slot_off(i) % 8 == 0 for i in range(3))
        msgs = [bytes([i % 251]) * (i % 40) for i in range(400)]
        got: list[bytes] = []

        def read_all() -> None:
            for _ in msgs:
                got.append(reader.read(0, timeout=10))

        t = threading.Thread(target=read_all)
        t.start()
        for m in msgs:
            ring.write(m, timeout=10)
        t.join(30)
        assert got == msgs
        assert ring._get(0) > 600
    finally:
        reader.unlink()
        ring.unlink()
