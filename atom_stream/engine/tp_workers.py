"""The worker side of tensor parallelism (the design: engine/distributed.py's docstring).

- `LocalWorkers`: the spawned processes of a node's ranks 1..L-1, fed through the node's
  shared-memory ring (`RING_SLOTS` slots of `RING_SLOT_BYTES`); start-up reports over pipes
  (`wait_ready` / `start_failure` raise a rank's error naming it), `poll()` names a dead one.
- `_worker_main`: a non-leader rank's loop (build its ModelRunner, read each step, run it).
- `_init_group` / `_close_group` / `_rendezvous`: the TP process group's start and bounded
  teardown; `_free_port`: a rendezvous port below the ephemeral range.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from multiprocessing.connection import wait as wait_any

import torch
import torch.multiprocessing as mp

from atom_stream.config import ConfigError, EngineConfig
from atom_stream.engine.model_runner import ModelRunner
from atom_stream.engine.multinode import NodeLayout, new_relay_group
from atom_stream.engine.shm_ring import RingClosed, ShmRing
from atom_stream.engine.step_codec import StepDecoder
from atom_stream.layers.parallel import TPInfo, private_group
from atom_stream.loader import CheckpointError

logger = logging.getLogger(__name__)

RING_SLOTS = 4
RING_SLOT_BYTES = 8 << 20  # a larger step (many long prefix-cached rows) spans several slots


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out as a connection's local port (Linux:
    ip_local_port_range; 32768 elsewhere or when unreadable)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _free_port(tries: int = 64) -> int:
    """A free TCP port on 127.0.0.1 for the TP rendezvous store, BELOW the ephemeral range: the
    workers start connecting to the store before rank 0 listens on it, and a client's own
    ephemeral local port can be that very port (a TCP self-connect), after which rank 0's
    listen fails with EADDRINUSE (seen on four H200s). Ports the kernel never hands out as local
    ports cannot collide that way. Falls back to an ephemeral port when none is found."""
    import random

    eph = min(_ephemeral_low(), 65536)
    low = max(1025, eph - 12000)
    high = max(low + 1, eph - 1)
    for port in random.Random().sample(range(low, high), min(tries, high - low)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _set_device(config: EngineConfig, local_rank: int) -> EngineConfig:
    # "cuda:B" (DPEngine: replica i gets B = i*tp) puts local rank r on GPU B + r
    if torch.cuda.is_available() and (config.device in ("auto", "cuda")
                                      or config.device.startswith("cuda:")):
        base = int(config.device.partition(":")[2] or 0)
        torch.cuda.set_device(base + local_rank)
        config.device = f"cuda:{base + local_rank}"
    return config


def _init_group(config: EngineConfig, init_method: str, rank: int, world: int,
                private: bool = False):
    """The TP group for TPInfo.group: None (torch.distributed's default group, initialized here),
    or a private group (layers/parallel.private_group) when `private` (the leader's process
    already had a default group: the application's own, or one a stuck teardown abandoned) or
    with data_parallel_size > 1 (DPEngine: this process hosts rank 0 of several replicas and may
    own one default group only). Every rank of the group must make the same choice."""
    if private or config.data_parallel_size > 1:
        return private_group(init_method, rank, world, _backend())
    torch.distributed.init_process_group(_backend(), init_method=init_method, rank=rank,
                                         world_size=world)
    return None


GROUP_CLOSE_TIMEOUT_S = 15.0


def _close_group(group, timeout: float = GROUP_CLOSE_TIMEOUT_S, runner=None,
                 sync: bool = True) -> None:
    """Tear down this rank's side of TP, best effort, waiting at most `timeout` s: first
    `runner.shutdown(sync)` (its graphs hold collectives), then the process group. Every rank
    of a node tears down at about the same time (NCCL/RCCL teardown may wait for the peers), and
    a teardown can block on a peer that is gone or stuck, which the engine's shutdown must not:
    so it runs in a daemon thread that is abandoned, with a warning, when it overruns. `sync`
    False (a peer is dead): no device synchronize, which could wait on a collective forever."""
    def close():
        try:
            if runner is not None:
                runner.shutdown(sync=sync)
            if group is not None:
                group.shutdown()
            elif torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception as e:  # noqa: BLE001 - best effort at exit
            logger.debug("TP teardown: %s", e)

    t = threading.Thread(target=close, name="tp-group-close", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        logger.warning("TP teardown still blocked after %.0f s; abandoned (this process keeps "
                       "its process group)", timeout)


def _worker_main(config: EngineConfig, rank: int, local_rank: int, init_method: str,
                 ring_spec: tuple, private_group: bool = False, ready=None) -> None:
    """Entry point of a non-leader rank (local rank 1..L-1 of its node): reads every step from
    the node's ring. `ready` (a Connection, optional): the start-up report the leader waits for
    (LocalWorkers.wait_ready): None once this rank's ModelRunner is built, else the error
    (type name, message) that stopped it (then the process exits 1)."""
    parent = os.getppid()
    layout = NodeLayout.of(config)
    ring = group = runner = None
    try:
        try:
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // layout.local_size))
            config = _set_device(config, local_rank)
            group = _init_group(config, init_method, rank, layout.world, private_group)
            if layout.nnodes > 1:
                new_relay_group(layout)  # a collective call: every rank takes part, members or not
            ring = ShmRing.attach(ring_spec)
            runner = ModelRunner(config, TPInfo(rank, layout.world, group))
        except Exception as e:
            _report(ready, (type(e).__name__, str(e)))
            if isinstance(e, (ConfigError, CheckpointError)):
                # the leader raises it (or its own): one line here, not a traceback per rank
                logger.error("TP rank %d could not start: %s: %s", rank, type(e).__name__, e)
                raise SystemExit(1) from None
            raise
        _report(ready, None)
        decoder = StepDecoder()
        while True:
            try:
                data = ring.read(local_rank - 1, timeout=1.0)
            except TimeoutError:
                if os.getppid() != parent:  # the node's leader is gone: do not linger
                    return
                continue
            except RingClosed:
                return
            inputs = decoder.decode(data)
            if inputs is None:
                return
            runner.run_inputs(inputs)
    finally:
        if ring is not None:
            ring.unlink()
        _close_group(group, runner=runner)  # graphs hold collectives: released before the group


def _report(conn, what: tuple[str, str] | None) -> None:
    """Send a worker's start-up report to its leader, best effort (the leader may be gone)."""
    if conn is None:
        return
    try:
        conn.send(what)
        conn.close()
    except OSError:
        pass


def _spawn_hint(exitcode: int | None) -> str:
    """For a rank that exited 1 before reporting, started from a script: the usual cause. A
    spawned rank re-imports the main script; one that builds the engine at import time starts
    ranks from inside that import, which multiprocessing refuses (vLLM asks for the same)."""
    main = sys.modules.get("__main__")
    if exitcode != 1 or not getattr(main, "__file__", None):
        return ""
    return (f" (if {os.path.basename(main.__file__)} builds the engine at import time, put that "
            f"code under `if __name__ == '__main__':`: each TP rank's process imports the "
            f"script)")


_START_ERRORS = {"ConfigError": ConfigError, "CheckpointError": CheckpointError}


class LocalWorkers:
    """The other ranks of this node (global ranks first+1 .. first+L-1 on local GPUs 1..L-1):
    spawned processes fed through the node's shared-memory ring. `poll()` reports a death.
    `private_group`: the workers join the leader's private TP group (_init_group)."""

    def __init__(self, config: EngineConfig, layout: NodeLayout, init_method: str,
                 private_group: bool = False):
        n = layout.local_size - 1
        self.ring = ShmRing(None, num_readers=n, num_slots=RING_SLOTS,
                            slot_bytes=RING_SLOT_BYTES, chunked=True) if n else None
        ctx = mp.get_context("spawn")
        first = layout.first_rank
        self.ranks = list(range(first + 1, first + n + 1))
        pipes = [ctx.Pipe(duplex=False) for _ in range(n)]
        self._ready = [r for r, _ in pipes]  # start-up reports (wait_ready); None: received
        self.procs = [ctx.Process(target=_worker_main, name=f"atom-stream-tp{first + i}",
                                  args=(config, first + i, i, init_method, self.ring.spec(),
                                        private_group, pipes[i - 1][1]),
                                  daemon=True)
                      for i in range(1, n + 1)]
        self.dead: str | None = None
        try:
            for p in self.procs:
                p.start()
        except BaseException:  # e.g. this is a spawned child importing an unguarded script
            self.kill()
            if self.ring is not None:
                self.ring.unlink()
            raise
        finally:
            for _, w in pipes:
                w.close()  # the children hold theirs: a dead child's pipe then reads EOF

    def poll(self) -> str | None:
        """A message naming the first local worker that exited, else None (sticky)."""
        if self.dead is None:
            for p in self.procs:
                if not p.is_alive():
                    self.dead = f"TP worker {p.name} died (exit code {p.exitcode})"
                    break
        return self.dead

    def start_failure(self) -> Exception | None:
        """Non-blocking: the error to raise for a local rank that could not start ("TP rank r
        could not start: ..."; ConfigError and CheckpointError keep their type, others
        RuntimeError), or for one that died, once one did; None while all are alive and still
        starting or ready. A dead rank's own report (or its pipe's EOF) is preferred over the
        bare exit."""
        dead = self.poll()  # before the pipes: a rank dead now has its report (or EOF) there
        for i, conn in enumerate(self._ready):
            if conn is None or not conn.poll():
                continue
            try:
                what = conn.recv()
            except (EOFError, OSError):  # exited without a report
                self.procs[i].join(1.0)
                code = self.procs[i].exitcode
                what = ("", f"died during start-up (exit code {code}){_spawn_hint(code)}")
            self._ready[i] = None
            conn.close()
            if what is not None:
                name, msg = what
                why = f"TP rank {self.ranks[i]} could not start: " + (
                    f"{name}: {msg}" if name else msg)
                self.dead = self.dead or why
                return _START_ERRORS.get(name, RuntimeError)(why)
        return RuntimeError(dead) if dead is not None else None

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every local rank reported its ModelRunner built. A rank that reported an
        error raises it (ConfigError and CheckpointError keep their type, others RuntimeError)
        naming the rank; one that died or did not report within `timeout` s raises
        RuntimeError. Never waits on a dead rank."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while any(c is not None for c in self._ready):
            err = self.start_failure()
            if err is not None:
                raise err
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"TP ranks did not start within {timeout:g} s")
            live = [c for c in self._ready if c is not None]
            wait_any(live, timeout=0.1)

    def write(self, data: bytes) -> None:
        if self.ring is not None:
            self.ring.write(data, alive=lambda: self.poll() is None)

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()

    def shutdown(self, goodbye: bytes | None, timeout: float = 10.0, before_join=None) -> None:
        """Send `goodbye` (the shutdown message; None: already sent, or not deliverable), close
        the ring, run `before_join()` (the leader's own teardown, which the workers' may wait
        for), join the workers (terminate/kill stragglers) and release the ring."""
        if goodbye is not None and self.ring is not None and self.poll() is None:
            try:
                self.ring.write(goodbye, timeout=timeout)
            except Exception as e:  # noqa: BLE001 - a dead reader: we terminate below
                logger.debug("shutdown message not delivered: %s", e)
        if self.ring is not None:
            self.ring.close()
        if before_join is not None:
            before_join()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
        if self.ring is not None:
            self.ring.unlink()


def _rendezvous(config: EngineConfig, init: str, world: int, private: bool, local: LocalWorkers):
    """Rank 0's `_init_group`, which waits for every rank to join, run in a helper thread while
    this one watches the local workers: one that dies or fails before joining raises here at
    once instead of leaving rank 0 blocked in the rendezvous until torch's timeout (30 min).
    On that failure the helper thread stays blocked and is abandoned (daemon)."""
    box: dict = {}

    def join() -> None:
        try:
            box["group"] = _init_group(config, init, 0, world, private)
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e

    t = threading.Thread(target=join, name="tp-rendezvous", daemon=True)
    t.start()
    while t.is_alive():
        err = local.start_failure()
        if err is not None:
            raise err
        t.join(0.05)
    if "error" in box:
        raise box["error"]
    return box.get("group")
