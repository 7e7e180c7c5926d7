"""Multi-node TP simulated on localhost with gloo (engine/multinode.py): "node 1" is a separate
process started the documented way (`python -m atom_stream.cli serve ... --nnodes 2 --node-rank 1
--headless`, rendezvous from MASTER_ADDR/MASTER_PORT in its environment). Node 0 is the engine in
this process. Checked: greedy tokens equal TP=1 (one rank per node, and two per node: the leader
relays steps into its node's ring); a clean shutdown ends the remote node by itself (exit 0);
killing the remote node fails the in-flight request within 10 s, marks the engine dead, and leaves
no process behind on either node."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from hf_checkpoints import write_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KW = {"device": "cpu", "dtype": "float32", "num_kv_blocks": 48, "block_size": 4,
      "max_model_len": 128}
PARAMS = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(ckpt: str, tp: int, port: int, log_path) -> subprocess.Popen:
    """Node 1 as an operator starts it: the headless command, master from the environment."""
    cmd = [sys.executable, "-m", "atom_stream.cli", "serve", "--model", ckpt, "-tp", str(tp),
           "--nnodes", "2", "--node-rank", "1", "--headless", "--device", "cpu",
           "--dtype", "float32", "--num-kv-blocks", "48", "--block-size", "4",
           "--max-model-len", "128", "--log-level", "warning"]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    with open(log_path, "a") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("multinode_deepseek"))
    write_hf_checkpoint(path, "deepseek", seed=5)
    return path


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(9)
    return [torch.randint(0, 320, (n,), generator=g).tolist() for n in (7, 13)]


@pytest.fixture(scope="module")
def want(ckpt, prompts):
    from atom_stream.llm import LLM
    from atom_stream.sampling_params import SamplingParams

    llm = LLM(ckpt, skip_tokenizer_init=True, **KW)
    try:
        return [o.token_ids for o in llm.generate(prompt_token_ids=prompts,
                                                  sampling_params=SamplingParams(**PARAMS))]
    finally:
        llm.engine.shutdown()


def test_two_nodes_one_rank_each_match_tp1_and_shut_down_cleanly(ckpt, prompts, want, tmp_path):
    from atom_stream.llm import LLM
    from atom_stream.sampling_params import SamplingParams

    port = _free_port()
    node1 = _start_node(ckpt, 2, port, tmp_path / "node1.log")
    try:
        llm = LLM(ckpt, skip_tokenizer_init=True, tensor_parallel_size=2, nnodes=2,
                  master_addr="127.0.0.1", master_port=port, **KW)
        try:
            assert llm.engine.runner.procs == []  # one rank per node: nothing spawned locally
            got = [o.token_ids for o in llm.generate(prompt_token_ids=prompts,
                                                     sampling_params=SamplingParams(**PARAMS))]
        finally:
            llm.engine.shutdown()
        assert got == want
        assert node1.wait(timeout=20) == 0, (tmp_path / "node1.log").read_text()
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()


async def test_killing_the_remote_node_fails_requests_and_leaves_no_process(
        ckpt, prompts, want, tmp_path):
    """Two ranks per node: node 0 spawns rank 1; node 1's leader (rank 2) spawns rank 3 and
    relays the steps into its ring."""
    from atom_stream import AsyncEngine, SamplingParams
    from atom_stream.config import EngineConfig
    from atom_stream.errors import AtomStreamError

    port = _free_port()
    node1 = _start_node(ckpt, 4, port, tmp_path / "node1.log")
    cfg = EngineConfig(model=ckpt, tensor_parallel_size=4, nnodes=2, master_addr="127.0.0.1",
                       master_port=port, **KW)
    try:
        async with AsyncEngine(cfg, skip_tokenizer_init=True) as engine:
            ex = engine.core.runner
            local = list(ex.procs)
            remote = _children(node1.pid)  # rank 3 and multiprocessing's resource tracker
            assert len(local) == 1 and len(remote) >= 1
            got = []
            for p in prompts:
                toks = []
                async for out in engine.generate(p, SamplingParams(**PARAMS)):
                    toks += out.token_ids
                got.append(toks)
            assert got == want

            n, t_kill = 0, None
            with pytest.raises(AtomStreamError):
                async for out in engine.generate(prompts[0], SamplingParams(
                        temperature=0, max_tokens=100, ignore_eos=True)):
                    n += len(out.token_ids)
                    if n >= 3 and t_kill is None:
                        os.kill(node1.pid, signal.SIGKILL)
                        t_kill = time.monotonic()
                    await asyncio.sleep(0)
            assert t_kill is not None and time.monotonic() - t_kill < 10
            assert engine.is_dead
            while "rank 2 (node 1)" not in ex.dead and time.monotonic() - t_kill < 10:
                await asyncio.sleep(0.1)  # the heartbeat verdict names the node
            assert "rank 2 (node 1) is gone" in ex.dead, ex.dead
        assert not any(p.is_alive() for p in local)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in remote) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not any(_alive(pid) for pid in remote), "node 1 left a process behind"
    finally:
        if node1.poll() is None:
            node1.kill()
        node1.wait()


def test_remote_node_exits_when_the_server_dies(ckpt, tmp_path):
    """Rank 0 (here a separate process holding a TPExecutor) is SIGKILLed: node 1 notices (relay
    broadcast / store fail), exits non-zero and leaves nothing behind."""
    port = _free_port()
    ready = tmp_path / "ready"
    script = (
        "import sys, time\n"
        "from atom_stream.config import EngineConfig\n"
        "from atom_stream.engine.distributed import TPExecutor\n"
        f"ex = TPExecutor(EngineConfig(model={ckpt!r}, tensor_parallel_size=2, nnodes=2, "
        f"master_addr='127.0.0.1', master_port={port}, **{KW!r}))\n"
        f"open({str(ready)!r}, 'w').close()\n"
        "time.sleep(60)\n")
    node1 = _start_node(ckpt, 2, port, tmp_path / "node1.log")
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.05)
        assert ready.exists(), (tmp_path / "server.log").read_text()
        remote = _children(node1.pid)
        server.kill()
        t0 = time.monotonic()
        assert node1.wait(timeout=10) != 0
        assert time.monotonic() - t0 < 10
        while any(_alive(pid) for pid in remote) and time.monotonic() - t0 < 10:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in remote), "node 1 left a process behind"
    finally:
        for p in (server, node1):
            if p.poll() is None:
                p.kill()
            p.wait()


@pytest.mark.parametrize("kw, field", [
    ({"tensor_parallel_size": 3, "nnodes": 2}, "nnodes"),
    ({"tensor_parallel_size": 4, "nnodes": 2, "master_addr": None}, "master_addr"),
    ({"tensor_parallel_size": 4, "nnodes": 2, "master_port": None}, "master_port"),
    ({"tensor_parallel_size": 4, "nnodes": 2, "data_parallel_size": 2}, "nnodes"),
    ({"tensor_parallel_size": 4, "nnodes": 2, "node_rank": 2, "headless": True}, "node_rank"),
    ({"tensor_parallel_size": 4, "nnodes": 2, "node_rank": 1}, "node_rank"),
    ({"tensor_parallel_size": 4, "nnodes": 2, "headless": True}, "headless"),
])
def test_invalid_multinode_settings_name_the_field(kw, field):
    from atom_stream.config import ConfigError, EngineConfig

    kw = {"master_addr": "10.0.0.1", "master_port": 29500, **kw}
    with pytest.raises(ConfigError, match=f"^{field}:"):
        EngineConfig(**kw)


def test_cli_flags_and_torch_environment(monkeypatch):
    from atom_stream.cli import engine_config_from_args, serve_parser

    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    cfg = engine_config_from_args(serve_parser().parse_args(
        ["-tp", "16", "--nnodes", "2", "--node-rank", "1", "--headless"]))
    assert (cfg.nnodes, cfg.node_rank, cfg.headless) == (2, 1, True)
    assert (cfg.master_addr, cfg.master_port) == ("10.0.0.1", 29500)
    cfg = engine_config_from_args(serve_parser().parse_args(
        ["-tp", "16", "--nnodes", "2", "--dist-init-addr", "node0:1234"]))
    assert (cfg.master_addr, cfg.master_port, cfg.headless) == ("node0", 1234, False)
    cfg = engine_config_from_args(serve_parser().parse_args(
        ["-tp", "16", "--nnodes", "2", "--master_addr", "a", "--master_port", "7"]))
    assert (cfg.master_addr, cfg.master_port) == ("a", 7)
