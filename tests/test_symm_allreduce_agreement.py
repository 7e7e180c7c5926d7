"""layers/symm_allreduce.try_create on the CPU (gloo, 2 processes, the symmetric-memory object
faked): every rank gets the same answer; a group name this process already rendezvoused over is
refused by every rank before anyone rendezvouses; a construction that fails on one rank makes
every rank keep the process group's all-reduce."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, init: str, out: str) -> None:
    from atom_stream.layers import symm_allreduce as sa

    made: list[int] = []
    fail_on: set[int] = set()

    class Fake:  # rendezvous is a collective: the fake meets the peers at a barrier
        def __init__(self, group, device, max_bytes):
            dist.barrier(group=group)
            if rank in fail_on:
                raise RuntimeError("no symmetric memory here")
            made.append(rank)

    sa.SymmAllReduce = Fake
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    cpu = torch.device("cpu")
    try:
        res = {}
        res["first"] = sa.try_create(None, cpu) is not None
        res["made_first"] = len(made)
        res["again"] = sa.try_create(None, cpu) is not None  # same name: refused
        res["made_again"] = len(made)
        sa._RENDEZVOUSED.clear()
        if rank == 0:  # only rank 0 used the name before: still refused everywhere
            sa._RENDEZVOUSED.add(dist.group.WORLD.group_name)
        res["one_used"] = sa.try_create(None, cpu) is not None
        res["made_one_used"] = len(made)
        sa._RENDEZVOUSED.clear()
        fail_on.add(1)
        res["one_fails"] = sa.try_create(None, cpu) is not None
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_try_create_agreement(tmp_path):
    mp.start_processes(_worker, args=(2, f"file://{tmp_path}/rdv", str(tmp_path / "res")),
                       nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        res = torch.load(tmp_path / f"res.{rank}")
        assert res == {"first": True, "made_first": 1, "again": False, "made_again": 1,
                       "one_used": False, "made_one_used": 1, "one_fails": False}, (rank, res)
