"""Data-parallel training with PyTorch DDP under ``torchrun``.

``torchrun --nproc_per_node 2 -m lowbit.cli train ...`` sets ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK``; :func:`setup` joins the process group (gloo on CPU, NCCL on CUDA). Every rank draws
the same permutation and trains on its share of each global batch (see
:meth:`lowbit.data.ArrayDataset.batches`); rank 0 alone logs and writes checkpoints.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistContext", "all_reduce_sum", "barrier", "setup", "teardown"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size`` (1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str = "cpu") -> DistContext:
    """Join the process group if launched by torchrun with ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        dist.init_process_group(backend=backend)
        owns = True
        # A script that builds a Trainer and simply returns must not exit with a live group:
        # gloo's worker threads are then torn down by static destructors while the other rank may
        # still be talking, and the process aborts ("terminate called without an active
        # exception"). Leaving the group at interpreter exit is a no-op if teardown() ran. No
        # barrier there: after an uncaught error on one rank it would wait on ranks still training.
        atexit.register(_leave_group, sync=False)
    return DistContext(rank, world, local, owns)


def _leave_group(sync: bool = True) -> None:
    if dist.is_initialized():
        if sync:  # every rank reaches this point before any rank closes its connections
            dist.barrier()
        dist.destroy_process_group()


def teardown(ctx: DistContext) -> None:
    """Leave the process group if :func:`setup` created it (after a barrier, so no rank closes
    its connections while another is still sending)."""
    if ctx.owns_group:
        _leave_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op when not distributed)."""
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(ctx: DistContext, t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op when not distributed); returns ``t``."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
