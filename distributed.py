"""Process-group setup from the variables torchrun sets (RANK, LOCAL_RANK, WORLD_SIZE).

One process without torchrun is simply rank 0 of 1; nothing else in the trainer branches on
how it was launched.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cfrobust.errors import UserError
from cfrobust.host_memory import retain_freed_memory


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_device(option: str, local_rank: int) -> torch.device:
    if option == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(option)
    except RuntimeError:
        raise UserError(f"--device {option}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {option}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup_distributed(device_option: str = "auto") -> DistEnv:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_option, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        # Processes on one machine share its cores; oversubscribing them slows every rank.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        retain_freed_memory()  # activations are host memory here: reuse them, step after step
    if world_size > 1 and not dist.is_initialized():
        init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world_size, local_rank, device)


def init_process_group(backend: str) -> None:
    """init_process_group on torchrun's store, under a prefix per restart.

    After `torchrun --max-restarts` restarts the workers, the store still holds the addresses
    the previous attempt's ranks published; a rank that read one of those would try to connect
    to a dead process. Keys under `restart-<n>/` belong to this attempt alone.
    """
    store, rank, world_size = next(dist.rendezvous("env://"))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"restart-{restart}", store), rank=rank, world_size=world_size)


def teardown_distributed() -> None:
    if dist.is_initialized():
        # A DDP wrapper holds the process group; one left in a reference cycle would free it only
        # at interpreter exit, when gloo's threads can no longer be stopped cleanly (seen: a rank
        # of a finished 2-process CPU run aborting with "terminate called without an active
        # exception"). Collect such garbage first, so the group really ends here.
        gc.collect()
        dist.destroy_process_group()


def gather_objects(obj, env: DistEnv) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def sync_buffers(model: torch.nn.Module, env: DistEnv) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank."""
    if env.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
