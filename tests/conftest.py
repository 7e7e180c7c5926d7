"""Shared pytest setup: the tests folder and the client SDK are importable; small torch threads;
module-scoped `srv` (a demo-model server, tests/serving_helpers.running_server), `http` (an
httpx client on it) and `llm` (an in-process demo-model LLM on the CPU) fixtures: a module that
needs another server defines its own `srv`, and `http` then talks to that one; likewise `llm`."""

from __future__ import annotations

import os
import sys

import httpx
import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "clients", "python"))
torch.set_num_threads(1)  # 2-core CI box: more threads only contend


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Every module starts with one intra-op thread (a test that changed it is undone): the
    demo model is tiny, and 2 spinning OpenMP threads on a loaded 2-core box make each op
    10-50x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def srv():
    from serving_helpers import running_server

    with running_server() as s:
        yield s


@pytest.fixture(scope="module")
def http(srv):
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def llm():
    from atom_stream import LLM

    with LLM("demo", device="cpu", dtype="float32", num_kv_blocks=64) as engine:
        yield engine
