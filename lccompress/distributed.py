"""Running the L steps on several processes (`torchrun`): the process group, the data shards, and
the checks that keep every process's θ the same.

Under `torchrun --nproc_per_node N` (WORLD_SIZE > 1 in the environment) every process runs the
same command: the L steps train a DistributedDataParallel model on its own shard of the training
data (global batch = N × the loader's batch), the C steps run on every process on the same
all-reduced weights — so θ is the same everywhere, which is checked after every C step — and only
process 0 writes the artifact, the report and the LC state.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from .errors import ConfigError


def world() -> int:
    """Processes in the run (1 without torchrun)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> torch.device:
    """Join the process group when started by torchrun (NCCL on CUDA, gloo on the CPU); the device
    of this process (cuda:LOCAL_RANK on CUDA)."""
    if world() <= 1 or not dist.is_available():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def active() -> bool:
    return world() > 1 and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if active():
        dist.barrier()


def mean(values: list[float]) -> list[float]:
    """The mean over processes of each value (the values as they are on one process)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return (t / world()).tolist()


def average_gradients(tensors: list[torch.Tensor]) -> list[Any]:
    """Hooks that replace each tensor's gradient by its mean over processes as backward computes
    it (what DistributedDataParallel does for a module's parameters, here for any leaf tensors);
    returns the handles, to be removed after training. Nothing when not under torchrun."""
    if not active():
        return []

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad.div_(world())

    return [t.register_hook(hook) for t in tensors if t.requires_grad]


def digest(tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        for key in sorted(tensors[name]):
            t = tensors[name][key].detach().cpu().contiguous()
            h.update(f"{name}/{key}/{t.dtype}/{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_same(thetas: Mapping[str, Mapping[str, torch.Tensor]], where: str) -> None:
    """Raise unless θ is bit for bit the same on every process."""
    if not active():
        return
    mine = digest(thetas)
    every: list[Any] = [None] * world()
    dist.all_gather_object(every, mine)
    if len(set(every)) != 1:
        raise ConfigError(f"θ differs between processes after {where}; the C step must be deterministic")


class Strided:
    """Every world-th batch of a loader, starting at this process's rank, the same number on every
    process (for loaders without a sampler to split: all processes draw the same order)."""

    def __init__(self, loader: Iterable, rank: int, world: int) -> None:
        self.loader, self.rank, self.world = loader, rank, world

    def __len__(self) -> int:
        return len(self.loader) // self.world  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:
        n = len(self) if hasattr(self.loader, "__len__") else None
        taken = 0
        for i, b in enumerate(self.loader):
            if n is not None and taken >= n:
                return
            if i % self.world == self.rank:
                taken += 1
                yield b

    @property
    def generator(self) -> Any:
        return getattr(self.loader, "generator", None)


def shard(loader: Iterable, seed: int, device: torch.device) -> Iterable:
    """This process's part of a training loader: a DataLoader over the same dataset with a
    DistributedSampler (shuffled like the original; batches of the original size), or every
    world-th batch of anything else."""
    if not active():
        return loader
    if isinstance(loader, DataLoader) and loader.batch_size is not None and \
            isinstance(loader.sampler, (RandomSampler, SequentialSampler)):
        sampler = DistributedSampler(loader.dataset, num_replicas=world(), rank=rank(),
                                     shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
                                     drop_last=loader.drop_last)
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler,
                          num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                          pin_memory=loader.pin_memory or device.type == "cuda", drop_last=loader.drop_last,
                          worker_init_fn=loader.worker_init_fn)
    if isinstance(loader, DataLoader) and isinstance(loader.sampler, BatchSampler) and \
            isinstance(loader.sampler.sampler, (RandomSampler, SequentialSampler)):
        inner = loader.sampler
        sampler = DistributedSampler(loader.dataset, num_replicas=world(), rank=rank(),
                                     shuffle=isinstance(inner.sampler, RandomSampler), seed=seed,
                                     drop_last=inner.drop_last)
        return DataLoader(loader.dataset, sampler=BatchSampler(sampler, inner.batch_size, inner.drop_last),
                          batch_size=None, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                          pin_memory=loader.pin_memory or device.type == "cuda")
    try:
        len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError("under torchrun the training data must be a DataLoader or have a len() "
                          "(it is split between the processes)") from None
    return Strided(loader, rank(), world())


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell a DistributedSampler (directly or inside a BatchSampler) which pass begins."""
    s = getattr(loader, "sampler", None)
    s = getattr(s, "sampler", s) if isinstance(s, BatchSampler) else s
    if isinstance(s, DistributedSampler):
        s.set_epoch(epoch)
