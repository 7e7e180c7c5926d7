"""Tensor-parallel execution: rank 0's `TPExecutor` and the step broadcast (the worker
processes of ranks 1..N-1, the group start and teardown: engine/tp_workers.py).

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
import threading
import time

import torch

from atom_stream.config import ConfigError, EngineConfig, ModelConfig
from atom_stream.engine.model_runner import ModelRunner, StepInputs, load_model_config
from atom_stream.engine.multinode import NodeLayout, RelayLink, RemoteMonitor, new_relay_group
from atom_stream.engine.sequence import ScheduledBatch, StepOutput
from atom_stream.engine.step_codec import StepEncoder
from atom_stream.engine.tp_workers import (
    LocalWorkers,
    _close_group,
    _free_port,
    _rendezvous,
    _set_device,
)
from atom_stream.layers.parallel import TPInfo

logger = logging.getLogger(__name__)

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
