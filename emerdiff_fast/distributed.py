"""Sharding a folder or a data set over processes started by torchrun.

`torchrun --nproc-per-node N -m emerdiff_fast eval|segment ...` starts N copies; each
reads RANK / WORLD_SIZE / LOCAL_RANK, takes every N-th item (item i goes to rank i % N: a
deterministic split, so a rerun gives each rank the same share and finished items are
skipped), runs on `cuda:LOCAL_RANK` when the device is CUDA, and writes into the shared
output folder (atomic writes, one file per item, so ranks never touch the same file).
Rank 0 then waits for all (a barrier) and does the work that needs everything, once.
Without torchrun, one process does all of it and nothing here starts a process group.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch

# A barrier waits for the slowest rank's whole share (hours for a full data set on one
# GPU each), so the process group's timeout must not be the 30-minute default.
BARRIER_TIMEOUT = datetime.timedelta(hours=48)


@dataclass(frozen=True)
class Shard:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def take(self, items: list) -> list:
        """This rank's items: every world-th, starting at rank."""
        return items[self.rank::self.world]

    def device(self, name: str) -> str:
        """CUDA ranks take their local GPU ("cuda" or "cuda:0" -> "cuda:LOCAL_RANK")."""
        if self.world > 1 and torch.device(name).type == "cuda":
            return f"cuda:{self.local_rank}"
        return name

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def agree(self, message: str | None) -> str | None:
        """Rank 0's verdict (an error message, or None) given to every rank, so a setup
        check that rank 0 makes stops all ranks, not only rank 0 while the rest wait."""
        if self.world == 1:
            return message
        box = [message]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    @contextlib.contextmanager
    def checked(self, *errors: type[Exception], raise_as: type[Exception]):
        """Setup checks that every rank must pass or fail together: an `errors` exception
        in the block (any rank's own, or rank 0's verdict) ends every rank with
        raise_as(message) after leaving the process group; no error: the ranks go on
        together (the block's end is a sync point)."""
        problem = None
        try:
            yield
        except errors as exc:
            problem = str(exc)
        verdict = self.agree(problem)
        problem = problem or verdict
        if problem:
            finish(self)
            raise raise_as(problem)

    def log_prefix(self) -> str:
        return f"[rank {self.rank}/{self.world}] " if self.world > 1 else ""


def from_env(device: str = "cpu") -> Shard:
    """The shard of this process; under torchrun, joins the process group (NCCL for CUDA
    devices, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Shard()
    shard = Shard(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not torch.distributed.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(shard.local_rank)
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)
    return shard


def finish(shard: Shard) -> None:
    if shard.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
