"""Device and process-group set-up, in one place. Under torchrun (env LOCAL_RANK): NCCL on CUDA, gloo on CPU,
plus a gloo group for object gathers. Without torchrun: one process, no process group, and every collective
below is a no-op, so the same code runs on a laptop."""

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist


_CPU_GROUP: Optional[Any] = None  # set by setup_distributed under torchrun


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    cpu_group: Optional[Any]  # gloo group over all ranks (object gathers); None in a single process

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str] = None) -> DistInfo:
    """`device`: None picks CUDA when available, else CPU; "cpu" forces the CPU (gloo under torchrun)."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ValueError(f"device={device} asked for, but torch sees no CUDA device; use device=cpu")
    if "LOCAL_RANK" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda" if use_cuda else "cpu"), None)

    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl", device_id=torch.device("cuda", local_rank))
        cpu_group = dist.new_group(backend="gloo")
        dev = torch.device("cuda", local_rank)
    else:
        dist.init_process_group(backend="gloo")
        cpu_group = dist.group.WORLD
        dev = torch.device("cpu")
    global _CPU_GROUP
    _CPU_GROUP = cpu_group
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, cpu_group)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not is_distributed():
        return obj
    box: List[Any] = [obj]
    dist.broadcast_object_list(box, src=src, group=_object_group())
    return box[0]


def all_gather_objects(obj: Any) -> List[Any]:
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_object_group())
    return out


def reduce_sum_to_main(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.reduce(t, dst=0)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t)
    return t


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Make every rank start from rank `src`'s parameters and buffers (persistent or not)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t, src=src)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _object_group():
    # Object collectives go through gloo: NCCL would move pickled bytes through the GPU.
    return _CPU_GROUP if _CPU_GROUP is not None else dist.group.WORLD
