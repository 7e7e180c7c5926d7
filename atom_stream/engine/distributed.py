"""Tensor-parallel execution: worker processes for ranks 1..N-1 and the step broadcast.

Rank 0 (the engine's process) and every worker build the same `ModelRunner` over their shard
(torch.distributed: NCCL on CUDA, RCCL on ROCm, gloo on the CPU). Each step rank 0 flattens the
batch into `StepInputs`, broadcasts it over a shared-memory ring (msgspec msgpack, fixed-size
slots), and every rank runs the same forward (graph replay on GPUs), meeting in the collectives
inside it. Only rank 0 samples.

Failure handling: a watchdog thread on rank 0 polls the workers; when one dies `dead` is set
within ~0.2 s and the engine fails in-flight requests and reports unhealthy (a collective with a
dead peer also raises in rank 0's step). Workers exit when rank 0 closes the ring or dies, so no
orphan is left behind. Everything runs on one node (rendezvous on 127.0.0.1); multi-node launch
is not implemented (docs/MULTINODE.md). `enable_expert_parallel` reaches every rank through
the config (ModelRunner sets TPInfo.ep). Replica i of a DPEngine passes device "cuda:{i*tp}" and
data_parallel_size > 1: its ranks use GPUs i*tp + r and a private process group.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import msgspec
import torch
import torch.multiprocessing as mp

from atom_stream.config import EngineConfig
from atom_stream.engine.model_runner import ModelRunner, StepInputs
from atom_stream.engine.sequence import ScheduledBatch, StepOutput
from atom_stream.engine.shm_ring import RingClosed, ShmRing
from atom_stream.layers.parallel import TPInfo, private_group

logger = logging.getLogger(__name__)


class StepMessage(msgspec.Struct, array_like=True, tag=True):
    inputs: StepInputs


class ShutdownMessage(msgspec.Struct, array_like=True, tag=True):
    pass


_DECODER = msgspec.msgpack.Decoder(StepMessage | ShutdownMessage)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _set_device(config: EngineConfig, rank: int) -> EngineConfig:
    # "cuda:B" (DPEngine: replica i gets B = i*tp) puts rank r on GPU B + r
    if torch.cuda.is_available() and (config.device in ("auto", "cuda")
                                      or config.device.startswith("cuda:")):
        base = int(config.device.partition(":")[2] or 0)
        torch.cuda.set_device(base + rank)
        config.device = f"cuda:{base + rank}"
    return config


def _init_group(config: EngineConfig, init_method: str, rank: int, world: int):
    """The TP group for TPInfo.group: None (torch.distributed's default group, initialized here),
    or, with data_parallel_size > 1 (DPEngine: this process hosts rank 0 of several replicas and
    may own one default group only), a private group (layers/parallel.private_group)."""
    if config.data_parallel_size > 1:
        return private_group(init_method, rank, world, _backend())
    torch.distributed.init_process_group(_backend(), init_method=init_method, rank=rank,
                                         world_size=world)
    return None


def _close_group(group) -> None:
    try:
        if group is not None:
            group.shutdown()
        elif torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


def _worker_main(config: EngineConfig, rank: int, world: int, init_method: str,
                 ring_spec: tuple) -> None:
    """Entry point of TP rank `rank` (1..world-1)."""
    parent = os.getppid()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    config = _set_device(config, rank)
    group = _init_group(config, init_method, rank, world)
    ring = ShmRing.attach(ring_spec)
    try:
        runner = ModelRunner(config, TPInfo(rank, world, group))
        while True:
            try:
                data = ring.read(rank - 1, timeout=1.0)
            except TimeoutError:
                if os.getppid() != parent:  # rank 0 is gone: do not linger as an orphan
                    return
                continue
            except RingClosed:
                return
            msg = _DECODER.decode(data)
            if isinstance(msg, ShutdownMessage):
                return
            runner.run_inputs(msg.inputs)
    finally:
        ring.unlink()
        _close_group(group)


class TPExecutor:
    """The ModelRunner contract (`execute`, `num_kv_blocks`, `model_config`, `shutdown`) for
    tensor_parallel_size > 1 on one node."""

    def __init__(self, config: EngineConfig):
        world = config.tensor_parallel_size
        self.world = world
        self.ring = ShmRing(None, num_readers=world - 1, num_slots=4, slot_bytes=8 << 20)
        init = f"tcp://127.0.0.1:{_free_port()}"
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_worker_main, name=f"atom-stream-tp{r}",
                                  args=(config, r, world, init, self.ring.spec()), daemon=True)
                      for r in range(1, world)]
        for p in self.procs:
            p.start()
        self.dead: str | None = None
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="tp-watchdog", daemon=True)
        self._watchdog.start()
        self._encoder = msgspec.msgpack.Encoder()
        self.group = None
        try:
            config = _set_device(config, 0)
            self.group = _init_group(config, init, 0, world)
            self.runner = ModelRunner(config, TPInfo(0, world, self.group))
        except BaseException:
            self.shutdown()
            raise
        self.runner.broadcast = self._broadcast
        self.model_config = self.runner.model_config
        self.num_kv_blocks = self.runner.num_kv_blocks
        self.max_model_len = self.runner.max_model_len

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            for p in self.procs:
                if not p.is_alive() and self.dead is None:
                    self.dead = f"TP worker {p.name} died (exit code {p.exitcode})"
                    logger.error(self.dead)

    def _alive(self) -> bool:
        return self.dead is None

    def _broadcast(self, inputs: StepInputs) -> None:
        if self.dead:
            raise RuntimeError(self.dead)
        self.ring.write(self._encoder.encode(StepMessage(inputs)), alive=self._alive)

    def execute(self, batch: ScheduledBatch) -> StepOutput:
        try:
            return self.runner.execute(batch)
        except Exception:
            # a collective raises as soon as a peer dies: record the death now, not at the
            # watchdog's next poll, so the engine reports dead before anyone asks again
            deadline = time.monotonic() + 1.0
            while self.dead is None and time.monotonic() < deadline:
                for p in self.procs:
                    if not p.is_alive():
                        self.dead = f"TP worker {p.name} died (exit code {p.exitcode})"
                time.sleep(0.02)
            raise

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        try:
            if self.dead is None:
                self.ring.write(self._encoder.encode(ShutdownMessage()), timeout=timeout)
        except Exception:  # noqa: BLE001 - a dead reader: we terminate below
            pass
        self.ring.close()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
        self.ring.unlink()
        _close_group(self.group)


def make_executor(config: EngineConfig):
    """The runner the engine core drives: ModelRunner for one rank, TPExecutor for several."""
    if config.tensor_parallel_size > 1:
        return TPExecutor(config)
    # "cuda:i" (a DPEngine replica) becomes this thread's current device, as TP ranks do
    return ModelRunner(_set_device(config, 0) if config.device.startswith("cuda:") else config)
