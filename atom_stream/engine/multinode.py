"""Multi-node tensor parallelism: node layout, the cross-node step relay, heartbeats, and the
headless entry point of nodes 1..nnodes-1 (issue 9).

    node 0:  atom-stream serve --model M -tp 16 --nnodes 2 --node-rank 0 \\
                 --master-addr A --master-port P                  (the server: rank 0)
    node k:  atom-stream serve --model M -tp 16 --nnodes 2 --node-rank k \\
                 --master-addr A --master-port P --headless       (ranks only, no server)

Layout: world = tensor_parallel_size ranks, L = world / nnodes per node; node k hosts global
ranks [k*L, (k+1)*L) on its local GPUs 0..L-1. Rank k*L, the node's *leader*, is the process the
command runs in (on node 0: the server); the leader spawns its node's other L-1 ranks as worker
processes (engine/tp_workers.LocalWorkers) and feeds them through the node's shared-memory ring.
Every rank joins one torch.distributed group (NCCL/RCCL on GPUs, gloo on the CPU) by TCP
rendezvous at MASTER_ADDR:MASTER_PORT (the store is served by rank 0); the model's collectives
span the nodes.

Step inputs: rank 0 encodes each step once (engine/step_codec.py: block-table deltas keep it
small) and `RelayLink.send` broadcasts the bytes over a gloo group of the leaders {0, L, 2L, ...}
(a fixed 32 KiB message, plus a second broadcast of the rest for a larger step); each remote
leader relays the same bytes into its node's ring, then runs the step. No home-made transport:
torch.distributed's gloo collectives and TCPStore only.

Failure handling:
- Every remote leader bumps `atom_stream/hb/<rank>` in the TCPStore every HEARTBEAT_S. Rank 0's
  watchdog (`RemoteMonitor.poll`) declares a node dead when its counter stalls for
  HEARTBEAT_TIMEOUT_S (or 1.5 s once a step has failed), with the reason the node published in
  `atom_stream/dead/<rank>` when it has one. A gloo collective with a dead peer raises at once.
- A remote leader exits when rank 0 is gone (the store or the relay broadcast fails), when rank 0
  sends the shutdown message, or when one of its local ranks dies (it publishes why, kills its
  other local ranks and exits 1), so no process is left behind on any node.
- Config drift is an error: each remote leader publishes a digest of the settings every rank must
  share and rank 0 compares it with its own before serving (`check_config_digests`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import threading
import time

import numpy as np
import torch

from atom_stream.config import ConfigError, EngineConfig

logger = logging.getLogger(__name__)

RELAY_BYTES = 32 << 10  # one broadcast carries a steady-decode step (deltas: ~10 KB at 256 seqs)
HEARTBEAT_S = 0.25
HEARTBEAT_TIMEOUT_S = 5.0
HEARTBEAT_TIMEOUT_AFTER_ERROR_S = 1.5
# the relay waits between steps for as long as the server idles: no collective timeout there
RELAY_TIMEOUT = datetime.timedelta(days=365)
_DIGEST_FIELDS = ("model", "tensor_parallel_size", "nnodes", "enable_expert_parallel",
                  "kv_cache_dtype", "dtype", "block_size", "max_num_seqs",
                  "max_num_batched_tokens", "max_model_len", "num_kv_blocks", "enforce_eager",
                  "cudagraph_capture_sizes", "load_format", "seed")


@dataclasses.dataclass(frozen=True)
class NodeLayout:
    """Where the ranks live. Single node: nnodes 1, node_rank 0."""

    world: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @classmethod
    def of(cls, config: EngineConfig) -> NodeLayout:
        return cls(config.tensor_parallel_size, config.nnodes, config.node_rank,
                   config.master_addr, config.master_port)

    @property
    def local_size(self) -> int:
        return self.world // self.nnodes

    @property
    def first_rank(self) -> int:
        return self.node_rank * self.local_size

    @property
    def leaders(self) -> list[int]:
        return [k * self.local_size for k in range(self.nnodes)]

    def init_method(self) -> str | None:
        """The rendezvous every rank uses (None on one node: rank 0 picks a local port)."""
        if self.nnodes == 1:
            return None
        return f"tcp://{self.master_addr}:{self.master_port}"


def new_relay_group(layout: NodeLayout):
    """The gloo group of the node leaders. torch.distributed requires EVERY rank of the default
    group to call this, in the same order relative to other group creations."""
    return torch.distributed.new_group(layout.leaders, backend="gloo", timeout=RELAY_TIMEOUT)


class RelayLink:
    """Step bytes from rank 0 to the remote node leaders over the leaders' gloo group."""

    def __init__(self, group):
        self.group = group
        self.head = torch.zeros(RELAY_BYTES, dtype=torch.uint8)
        self.head_np = self.head.numpy()

    def send(self, data: bytes) -> None:
        """Rank 0: broadcast one message (blocks until gloo has handed it over)."""
        n = len(data)
        k = min(n, RELAY_BYTES - 8)
        self.head_np[:8] = np.frombuffer(np.int64(n).tobytes(), dtype=np.uint8)
        self.head_np[8:8 + k] = np.frombuffer(data, dtype=np.uint8, count=k)
        torch.distributed.broadcast(self.head, src=0, group=self.group)
        if n > k:
            rest = torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=k).copy())
            torch.distributed.broadcast(rest, src=0, group=self.group)

    def recv(self) -> bytes:
        """A remote leader: the next message (raises when rank 0 is gone)."""
        torch.distributed.broadcast(self.head, src=0, group=self.group)
        n = int(self.head_np[:8].view(np.int64)[0])
        k = min(n, RELAY_BYTES - 8)
        data = self.head_np[8:8 + k].tobytes()
        if n > k:
            rest = torch.empty(n - k, dtype=torch.uint8)
            torch.distributed.broadcast(rest, src=0, group=self.group)
            data += rest.numpy().tobytes()
        return data


def _store(layout: NodeLayout):
    """A TCPStore client of the rendezvous store rank 0 serves (heartbeats, digests)."""
    return torch.distributed.TCPStore(layout.master_addr, layout.master_port, is_master=False,
                                      timeout=datetime.timedelta(seconds=10))


def config_digest(config: EngineConfig) -> str:
    return json.dumps({f: getattr(config, f) for f in _DIGEST_FIELDS}, sort_keys=True)


class RemoteMonitor:
    """Rank 0's view of the remote nodes: heartbeat counters in the store."""

    def __init__(self, layout: NodeLayout):
        self.layout = layout
        self.store = _store(layout)
        self.remote = layout.leaders[1:]
        self._seen = {r: (-1, time.monotonic()) for r in self.remote}
        self.failed_at: float | None = None  # set after a failed step: judge faster
        self.lost: str | None = None

    def check_config_digests(self, config: EngineConfig) -> None:
        mine = config_digest(config)
        for r in self.remote:
            theirs = self.store.get(f"atom_stream/config/{r}").decode()
            if theirs != mine:
                raise ConfigError(f"nnodes: node {r // self.layout.local_size} (rank {r}) runs "
                                  f"different settings: {theirs} vs node 0: {mine}; every node "
                                  "must get the same flags (only --node-rank/--headless differ)")

    def poll(self) -> str | None:
        """A death message for the first remote node whose heartbeat stalled, else None
        (sticky: also kept in `lost`)."""
        if self.lost:
            return self.lost
        now = time.monotonic()
        limit = HEARTBEAT_TIMEOUT_S if self.failed_at is None else HEARTBEAT_TIMEOUT_AFTER_ERROR_S
        for r in self.remote:
            value = self.store.add(f"atom_stream/hb/{r}", 0)
            last, since = self._seen[r]
            if value != last:
                self._seen[r] = (value, now)
                continue
            if now - max(since, self.failed_at or since) > limit:
                why = "stopped heartbeating"
                if self.store.check([f"atom_stream/dead/{r}"]):
                    why = self.store.get(f"atom_stream/dead/{r}").decode()
                self.lost = f"TP rank {r} (node {r // self.layout.local_size}) is gone: {why}"
                return self.lost
        return None


class Heartbeat:
    """A remote leader's heartbeat thread. Calls `on_fatal(reason)` (which must end the
    process) when the store is unreachable (rank 0 died) or `local_dead()` reports a death."""

    def __init__(self, layout: NodeLayout, local_dead, on_fatal):
        self.store = _store(layout)
        self.rank = layout.first_rank
        self.key = f"atom_stream/hb/{layout.first_rank}"
        self.dead_key = f"atom_stream/dead/{layout.first_rank}"
        self.local_dead = local_dead
        self.on_fatal = on_fatal
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="node-heartbeat", daemon=True)

    def publish(self, config: EngineConfig) -> None:
        self.store.set(f"atom_stream/config/{self.rank}", config_digest(config))

    def report(self, why: str) -> None:
        try:
            self.store.set(self.dead_key, why)
        except Exception as e:  # noqa: BLE001 - rank 0 may be gone already
            logger.debug("could not publish the failure: %s", e)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            why = self.local_dead()
            if why:
                self.report(why)
                self.on_fatal(why)
                return
            try:
                self.store.add(self.key, 1)
            except Exception as e:  # noqa: BLE001 - the store lives in rank 0's process
                if not self._stop.is_set():
                    self.on_fatal(f"lost rank 0 (the store at the master address): {e}")
                return


def run_node(config: EngineConfig) -> int:
    """The headless command of node `config.node_rank` >= 1: run this node's leader rank here,
    spawn the node's other ranks, relay rank 0's steps to them until rank 0 shuts down (exit 0)
    or a rank dies (exit 1). Blocks."""
    from atom_stream.config import resolve_model_path
    from atom_stream.engine.model_runner import ModelRunner
    from atom_stream.engine.step_codec import StepDecoder
    from atom_stream.engine.tp_workers import LocalWorkers, _close_group, _init_group, _set_device
    from atom_stream.layers.parallel import TPInfo

    config.model = resolve_model_path(config.model, config.load_format)  # hub ids
    layout = NodeLayout.of(config)
    init = layout.init_method()
    logger.info("node %d/%d: ranks %d..%d, rendezvous %s", layout.node_rank, layout.nnodes,
                layout.first_rank, layout.first_rank + layout.local_size - 1, init)
    local = LocalWorkers(config, layout, init)
    group = None

    def fatal(why: str) -> None:
        logger.error("node %d exits: %s", layout.node_rank, why)
        local.kill()
        os._exit(1)

    hb = runner = None
    closed = False

    def close() -> None:  # this leader's teardown, while its workers do theirs
        nonlocal closed
        closed = True
        _close_group(group, runner=runner)

    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // layout.local_size))
        cfg = _set_device(config, 0)
        group = _init_group(cfg, init, layout.first_rank, layout.world)
        relay = RelayLink(new_relay_group(layout))
        hb = Heartbeat(layout, local.poll, fatal)
        hb.publish(config)
        hb.start()
        runner = ModelRunner(cfg, TPInfo(layout.first_rank, layout.world, group))
        decoder = StepDecoder()
        logger.info("node %d ready", layout.node_rank)
        while True:
            data = relay.recv()
            local.write(data)
            inputs = decoder.decode(data)
            if inputs is None:
                local.shutdown(None, before_join=close)
                return 0
            runner.run_inputs(inputs)
    except Exception as e:  # report, clean up, exit non-zero
        logger.exception("node %d failed", layout.node_rank)
        if hb is not None:
            hb.report(f"{type(e).__name__}: {e}")
        local.shutdown(None, timeout=2.0)
        return 1
    finally:
        if hb is not None:
            hb.stop()
        if not closed:
            _close_group(group, runner=runner, sync=False)
