"""Tensor-parallel execution: worker processes for ranks 1..N-1 and the step broadcast.

Rank 0 (the engine's process) and every worker build the same `ModelRunner` over their shard
(torch.distributed: NCCL on CUDA, RCCL on ROCm, gloo on the CPU). Each step rank 0 flattens the
batch into `StepInputs`, encodes it once (engine/step_codec.py: msgspec msgpack; of the block
tables only the cells rank 0's BlockTableRows wrote since the last step travel), writes the bytes
into the node's shared-memory ring (fixed-size slots), and every rank runs the same forward (graph
replay on GPUs), meeting in the collectives inside it. Only rank 0 samples.

Several nodes (`nnodes` > 1, engine/multinode.py): node k hosts ranks [k*L, (k+1)*L) with
L = tensor_parallel_size / nnodes; all ranks rendezvous at master_addr:master_port; rank 0 also
broadcasts the step bytes over a gloo group of the node leaders (ranks k*L), each of which relays
them into its own node's ring. Nodes 1.. are started by the headless command (`run_node`).

Failure handling: a watchdog thread on rank 0 polls the local workers and the remote nodes'
heartbeats; when one dies `dead` is set (~0.2 s for a local worker, HEARTBEAT_TIMEOUT_S for a
silent node, at once when a step fails with a dead peer) and the engine fails in-flight requests
and reports unhealthy (a gloo collective with a dead peer also raises in rank 0's step). A rank
that is alive but hung (stopped, or stuck inside a collective) is caught by the same thread: a
step still running after `watchdog_timeout` seconds sets `dead` and kills the local workers, so
rank 0's blocked ring write, or gloo collective, fails instead of waiting forever (an NCCL/RCCL
collective may stay blocked until that library's timeout; the engine no longer waits for it:
AsyncEngine stops awaiting a dead runner's step and shuts the runner down beside it). Workers
exit when rank 0 closes the ring or dies, so no orphan is left behind. Start-up: each worker
reports over a pipe once its ModelRunner is built, or the error that stopped it; rank 0 watches
the workers during its rendezvous (a rank that dies there raises at once, not after torch's
30-minute timeout) and raises a rank's start-up error naming it (ConfigError/CheckpointError
keep their type), so an engine never starts with a dead rank. A step that fails on rank 0 after
its inputs were broadcast but before rank 0's forward finished is fail-stop (`dead`, workers
killed): the other ranks ran the whole step and the collectives are out of step. A step error
caused by a dead rank is raised as RuntimeError(`dead`). `enable_expert_parallel`
reaches every rank through the config (ModelRunner sets TPInfo.ep). Replica i of a DPEngine
passes device "cuda:{i*tp}" and data_parallel_size > 1: its ranks use GPUs i*tp + r and a
private process group.
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

from atom_stream.config import ConfigError, EngineConfig, ModelConfig
from atom_stream.engine.model_runner import ModelRunner, StepInputs, load_model_config
from atom_stream.engine.multinode import NodeLayout, RelayLink, RemoteMonitor, new_relay_group
from atom_stream.engine.sequence import ScheduledBatch, StepOutput
from atom_stream.engine.shm_ring import RingClosed, ShmRing
from atom_stream.engine.step_codec import StepDecoder, StepEncoder
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


def check_tp_shapes(cfg: ModelConfig, world: int, expert_parallel: bool) -> None:
    """Raise one ConfigError naming the first config.json dimension that `world` TP ranks
    cannot split (the layers' own checks, run here before any rank is spawned: those fail on
    every rank after its start-up). The vocab needs no check: it is padded (layers/linear.py)."""
    dims = [("num_attention_heads", cfg.num_attention_heads)]
    if any(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        dims.append(("intermediate_size", cfg.intermediate_size))
    if cfg.n_routed_experts:
        dims.append(("n_routed_experts", cfg.n_routed_experts) if expert_parallel
                    else ("moe_intermediate_size", cfg.moe_intermediate_size))
        if cfg.n_shared_experts:
            dims.append(("moe_intermediate_size * n_shared_experts",
                         cfg.moe_intermediate_size * cfg.n_shared_experts))
    for name, full in dims:
        if full % world:
            if name == "n_routed_experts":  # only expert parallelism splits the experts
                raise ConfigError(f"enable_expert_parallel: n_routed_experts ({full}) is not "
                                  f"divisible by the EP size {world} (= tensor_parallel_size)")
            raise ConfigError(f"tensor_parallel_size: {name} ({full}) is not divisible by "
                              f"{world}")


class TPExecutor:
    """The ModelRunner contract (`execute`, `num_kv_blocks`, `model_config`, `shutdown`) for
    tensor_parallel_size > 1: this process is rank 0 (node 0's leader)."""

    def __init__(self, config: EngineConfig):
        layout = self.layout = NodeLayout.of(config)
        # config.json errors and shapes the ranks cannot split fail here, before any spawn
        check_tp_shapes(load_model_config(config), layout.world, config.enable_expert_parallel)
        self.world = layout.world
        init = layout.init_method() or f"tcp://127.0.0.1:{_free_port()}"
        # a default group already in this process (the application's, or one an earlier
        # engine's stuck teardown abandoned) cannot be initialized again: use a private one
        private = torch.distributed.is_available() and torch.distributed.is_initialized()
        if private and layout.nnodes > 1:
            raise ConfigError("tensor parallel over several nodes needs torch.distributed's "
                              "default process group, and this process already initialized it; "
                              "start the engine in a process without one")
        self.private_group = private
        self.local = LocalWorkers(config, layout, init, private)
        self.procs = self.local.procs
        self.ring = self.local.ring
        self.dead: str | None = None
        self.remote: RemoteMonitor | None = None
        self.relay: RelayLink | None = None
        self._encoder = StepEncoder()
        self._stop = threading.Event()
        self._check_lock = threading.Lock()
        self._deaths: list[str] = []
        self.watchdog_timeout = float(config.watchdog_timeout)
        # monotonic start of the `launch` running now, and launch times of the launched steps
        # whose device work may still run, by id(handle), until collected (async scheduling
        # keeps up to two: N+1 is launched before N is collected)
        self._launch_t0: float | None = None
        self._inflight: dict[int, float] = {}
        self._watchdog = threading.Thread(target=self._watch, name="tp-watchdog", daemon=True)
        self._watchdog.start()
        self.group = None
        try:
            config = _set_device(config, 0)
            self.group = _rendezvous(config, init, layout.world, private, self.local)
            if layout.nnodes > 1:
                self.relay = RelayLink(new_relay_group(layout))
            self.runner = ModelRunner(config, TPInfo(0, layout.world, self.group))
            self.local.wait_ready()  # a rank that failed alone raises its error here
            if layout.nnodes > 1:
                remote = RemoteMonitor(layout)
                remote.check_config_digests(config)
                self.remote = remote  # the watchdog starts polling it
        except BaseException:
            self.shutdown()
            raise
        self.runner.broadcast = self._broadcast
        self._forward = self.runner._run
        self.runner._run = self._run_forward
        self._stage = ""  # of the launch running now: "" | "sent" (inputs out) | "ran" (forward)
        self.model_config = self.runner.model_config
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.max_model_len = self.runner.max_model_len

    def _died(self, why: str) -> None:
        """Add a death to `dead` (all of them are reported: a local worker that died because a
        remote node vanished mid-collective is listed with that node)."""
        with self._check_lock:
            if why not in self._deaths:
                self._deaths.append(why)
                self.dead = "; ".join(self._deaths)
                logger.error(why)

    def _check(self) -> None:
        for why in (self.local.poll(), self.remote.poll() if self.remote else None):
            if why:
                self._died(why)
        t0 = self._oldest_step()
        if t0 is not None and self.dead is None and \
                time.monotonic() - t0 > self.watchdog_timeout:
            self._died(f"a TP step has not finished in {self.watchdog_timeout:g} s "
                       f"(--watchdog-timeout): a rank is hung")
            self.local.kill()  # unblocks rank 0's collective / ring write with an error

    def _oldest_step(self) -> float | None:
        """Start of the oldest step not yet known finished (None: none). Read from the
        watchdog thread while the engine's thread mutates the dict: a racing read skips."""
        try:
            times = [*self._inflight.values()]
        except RuntimeError:  # changed size during iteration
            times = []
        t = self._launch_t0
        if t is not None:
            times.append(t)
        return min(times, default=None)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._check()
            except Exception as e:  # noqa: BLE001 - the store is rank 0's: should not fail
                logger.warning("TP watchdog: %s", e)

    def _alive(self) -> bool:
        return self.dead is None

    def _broadcast(self, inputs: StepInputs) -> None:
        if self.dead:
            raise RuntimeError(self.dead)
        try:
            # the runner's BlockTableRows made inputs.tables: the codec sends only its writes
            data = self._encoder.encode(inputs, getattr(self.runner, "_block_rows", None))
            if self.relay is not None:
                try:
                    self.relay.send(data)
                except Exception as e:
                    # the leaders' gloo group only fails when a remote leader is gone
                    self._died(f"lost a remote node (step relay failed): {e}")
                    raise RuntimeError(self.dead) from e
            if self.ring is not None:
                self.ring.write(data, alive=self._alive)
            self._stage = "sent"
        except BaseException:
            self._encoder.reset()  # some rank may have missed it: the next step goes whole
            raise

    def _run_forward(self, inp, pending):
        """Rank 0's forward (ModelRunner._run, collectives inside); records that it finished."""
        out = self._forward(inp, pending)
        self._stage = "ran"
        return out

    @property
    def supports_async(self) -> bool:
        return self.runner.supports_async

    def execute(self, batch: ScheduledBatch) -> StepOutput:
        return self.collect(self.launch(batch))

    def launch(self, batch: ScheduledBatch, prev=None):
        """Async scheduling: rank 0's `ModelRunner.launch` (the inputs reach the other ranks
        through `_broadcast`; pending decode ids through a device broadcast inside the step)."""
        t0 = self._launch_t0 = time.monotonic()
        self._stage = ""
        try:
            handle = self.runner.launch(batch, prev)
        except Exception as e:
            # first a peer that died (its collective's error is what rank 0 saw): the death
            # is the cause to report, not rank 0's failure
            self._after_failure()
            if self._stage == "sent" and self.dead is None:
                # rank 0's forward stopped part-way while the other ranks run the whole step:
                # they wait in a collective rank 0 left, and its next step's collectives would
                # pair with those (wrong sums when the sizes match, else a gloo abort). The
                # group cannot be re-synchronized: fail-stop instead of serving wrong tokens.
                self._died(f"a TP step failed on rank 0 after its inputs reached the other "
                           f"ranks ({type(e).__name__}: {e}); the ranks' collectives are out "
                           f"of step")
                self.local.kill()
            if self.dead:  # name the dead rank, not the collective's error
                raise RuntimeError(self.dead) from e
            raise
        finally:
            self._launch_t0 = None
        if getattr(handle, "event", None) is not None:  # device work may still be running
            self._inflight[id(handle)] = t0
        return handle

    def collect(self, handle) -> StepOutput:
        try:
            return self.runner.collect(handle)
        except Exception as e:
            self._after_failure()
            if self.dead:
                raise RuntimeError(self.dead) from e
            raise
        finally:
            self._inflight.pop(id(handle), None)

    def _after_failure(self) -> None:
        """A collective raises as soon as a peer dies: record the death now, not at the
        watchdog's next poll, so the engine reports dead before anyone asks again."""
        if self.remote is not None:
            self.remote.failed_at = time.monotonic()
        deadline = time.monotonic() + (2.0 if self.remote is not None else 1.0)
        while time.monotonic() < deadline:
            self._check()
            if self.dead and (self.remote is None or self.remote.lost):
                break
            time.sleep(0.02)
        if self.remote is not None:
            self.remote.failed_at = None

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        goodbye = self._encoder.encode_shutdown() if self.dead is None else None
        if goodbye is not None and self.relay is not None:
            try:
                self.relay.send(goodbye)
            except Exception as e:  # noqa: BLE001 - a remote node is gone; its leader exits alone
                logger.debug("shutdown message not relayed: %s", e)
        # rank 0 tears down while the workers do (NCCL teardown may wait for every rank),
        # then joins them; with a dead peer, no device sync (it could wait on a collective)
        runner = getattr(self, "runner", None)
        sync = self.dead is None
        self.local.shutdown(goodbye, timeout, before_join=lambda: _close_group(
            self.group, runner=runner, sync=sync))
        self._inflight.clear()


def make_executor(config: EngineConfig):
    """The runner the engine core drives: ModelRunner for one rank, TPExecutor for several."""
    if config.tensor_parallel_size > 1:
        return TPExecutor(config)
    # "cuda:i" (a DPEngine replica) becomes this thread's current device, as TP ranks do
    return ModelRunner(_set_device(config, 0) if config.device.startswith("cuda:") else config)
