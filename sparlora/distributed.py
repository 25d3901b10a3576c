"""Data-parallel training across processes started by torchrun.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each worker.
`init_distributed` reads them and joins the process group, with NCCL and one GPU per
process (`cuda:<LOCAL_RANK>`) on CUDA, or with gloo on CPU. Without WORLD_SIZE, or with
WORLD_SIZE=1, everything here does nothing, so the same training code runs in one process.

How the work is split: every rank builds the same global batches (the duration
sampler has no notion of ranks) and takes a contiguous slice of each (`shard`). The
effective batch and the number of optimizer steps therefore do not depend on the number
of processes. The training loop weights each rank's loss by its share of the global
batch's tokens before DDP averages the gradients, so the update is the one-process
update on the whole global batch, up to float rounding. A rank pads its slice to the
slice's longest utterance, not to the global batch's, which would change the
Paraformer's loss if the training loop did not set the encoder output at padded frames
to 0 (`sparlora.train.zero_encoder_padding`).

NOTE: Float rounding can still flip a discrete choice inside the model. The CIF
predictor fires an utterance's last token only when its weights, scaled to sum to the
token count, reach that count, so a sum of 3.9999999 instead of 4.0000001 drops it.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# How long a rank waits in a collective (for example while rank 0 writes a checkpoint)
# before the process group raises a timeout error.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass
class Distributed:
    """The rank, world size and local rank of this process. A world size of 1 means no process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    collective_device: str = "cpu"  # device of the tensors passed to collectives: cpu for gloo, cuda:N for NCCL

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: Sequence[float]) -> list[float]:
        """Return the element-wise sum of `values` over ranks, in float64."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """Return True on every rank when `flag` is True on at least one rank."""
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def all_gather_object(self, obj: Any) -> list:
        """Return the list of every rank's `obj`, in rank order (pickled through the process group)."""
        if not self.enabled:
            return [obj]
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


def environment_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str) -> tuple[Distributed, str]:
    """Join the torchrun process group when WORLD_SIZE > 1, and return (context, this rank's device).

    `device` is the configured device after "auto" is resolved ("cpu" or "cuda"). On
    CUDA each process takes GPU LOCAL_RANK and the backend is NCCL. On CPU it is gloo.
    """
    world_size = environment_world_size()
    if world_size <= 1:
        return Distributed(), device
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if str(device).startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} has no GPU, because this node has {torch.cuda.device_count()}. "
                               "Start at most that many processes per node (torchrun --nproc_per_node).")
        # NOTE: The tests run gloo on CPU only. This NCCL path has not run, for lack of a GPU.
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    context = Distributed(rank=rank, world_size=world_size, local_rank=local_rank,
                          collective_device=device if backend == "nccl" else "cpu")
    logger.info("rank %d of %d (local rank %d) joined the %s process group on %s", rank, world_size, local_rank, backend, device)
    return context, device


def close_distributed(context: Distributed) -> None:
    """Leave the process group after every rank has arrived."""
    if context.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Return rank `rank`'s contiguous slice of a global batch. Slice sizes differ by at most one.

    A batch with fewer utterances than ranks leaves the last ranks an empty slice.
    """
    size, extra = divmod(len(indices), world_size)
    start = rank * size + min(rank, extra)
    end = start + size + (1 if rank < extra else 0)
    return list(indices[start:end])
