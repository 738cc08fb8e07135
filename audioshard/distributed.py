"""One place for process setup: single process, or one of many under `torchrun`.

    torchrun --nproc_per_node=4 -m audioshard train --shards shards/ --out runs/x

Reads RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun), picks NCCL with one GPU per local rank
on CUDA and gloo otherwise, and falls back to a plain single process when they are absent.
Side effects (printing, files) belong to rank 0: use `print0` and `Dist.is_main`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
import torch.utils.data

from audioshard.termsafe import printable


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class World:
    """Who reads: this process's rank of `world_size`, and (inside a DataLoader worker) which of `workers`.

    Every (rank, worker) pair is one reader of a split; readers are numbered rank-major, so together they
    read all of it once. The numbers are worked out here, once, and passed along (as MosaicML's `World`).
    """

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    workers: int = 1

    @classmethod
    def of_process(cls, rank: int | None = None, world_size: int | None = None) -> World:
        """This process (from torch.distributed, or as given), before any loader worker."""
        own_rank, own_size = rank_and_size()
        return cls(own_rank if rank is None else rank, own_size if world_size is None else world_size)

    def in_worker(self) -> World:
        """The same process seen from the DataLoader worker this runs in (worker 0 of 1 outside one)."""
        info = torch.utils.data.get_worker_info()
        return self.with_worker(info.id, info.num_workers) if info is not None else self.with_worker(0, 1)

    def with_worker(self, worker: int, workers: int) -> World:
        return World(self.rank, self.world_size, worker, max(1, workers))

    @property
    def reader(self) -> int:
        """This reader's number among all readers (ranks x workers)."""
        return self.rank * self.workers + self.worker

    @property
    def readers(self) -> int:
        return self.world_size * self.workers


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        if name == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup_distributed(device_name: str = "auto") -> Dist:
    """Initialise torch.distributed when launched by torchrun; a one-process Dist otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist(device=pick_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # before init_process_group, so NCCL binds the right GPU
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch_dist.is_initialized():
        # torchrun's store outlives a restart (--max-restarts): without a per-attempt key prefix, restarted
        # ranks can read their peers' addresses from the failed attempt and fail to connect.
        store, _, _ = next(torch_dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        torch_dist.init_process_group(backend=backend, store=torch_dist.PrefixStore(f"attempt-{attempt}", store),
                                      rank=rank, world_size=world_size,
                                      device_id=device if device.type == "cuda" else None)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def cleanup_distributed() -> None:
    if in_process_group():
        torch_dist.destroy_process_group()


# The rest of audioshard asks here, not torch.distributed: which process this is, and the few collective
# steps outside the train step (DDP's own all-reduce of gradients stays inside DistributedDataParallel).

def in_process_group() -> bool:
    """True in a process of an initialised torch.distributed group (under torchrun)."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank_and_size() -> tuple[int, int]:
    """(this process's rank, how many processes): (0, 1) outside a process group."""
    return (torch_dist.get_rank(), torch_dist.get_world_size()) if in_process_group() else (0, 1)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """`values` summed over every process (float64; as given in a single process)."""
    if not in_process_group():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather(value: object) -> list[object]:
    """Every process's `value`, in rank order (a one-item list in a single process)."""
    if not in_process_group() or torch_dist.get_world_size() == 1:
        return [value]
    gathered: list[object] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if in_process_group():
        torch_dist.barrier()


def print0(*args, **kwargs) -> None:
    """Print on rank 0 only, with control characters escaped (class names and paths in the lines come from
    data; `termsafe`)."""
    if rank_and_size()[0] == 0:
        print(*(printable(a, lines=True) for a in args), **kwargs, flush=True)
