"""Device and process-group set-up, and every collective the project uses, in one place. Under torchrun (env
LOCAL_RANK): NCCL on CUDA, gloo on CPU, plus a gloo group for object gathers and CPU flags. Without torchrun: one
process, no process group, and every collective below returns its input, so the same code runs on a laptop."""

import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from utils.errors import ConfigError


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
        raise ConfigError(f"device={device} asked for, but torch sees no CUDA device; use device=cpu")
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


def gather_objects(obj: Any, dst: int = 0, group: Optional[Any] = None) -> Optional[List[Any]]:
    """Every rank's `obj` in rank order on rank `dst` (None on the others), over `group` (default: the gloo
    group); `[obj]` in a single process."""
    if not is_distributed():
        return [obj]
    out: Optional[List[Any]] = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group if group is not None else _object_group())
    return out


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """[N, ...] on every rank -> [world_size * N, ...], the ranks' rows in rank order (same N on every rank)."""
    if not is_distributed():
        return t
    out = torch.empty((dist.get_world_size() * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_gather_into_tensor(out, t.contiguous())
    return out


def reduce_sum_to_main(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.reduce(t, dst=0)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t)
    return t


def all_reduce_sum_coalesced(tensors: List[torch.Tensor]) -> None:
    """Sum each tensor over ranks, in place, with one collective: flattened into one buffer (one dtype) and
    copied back."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for t, reduced in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(reduced.view_as(t))


def max_over_ranks(value: int) -> int:
    """The largest of the ranks' integers, on every rank; over the gloo group, so no GPU synchronisation."""
    if not is_distributed():
        return value
    flag = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_object_group())
    return int(flag.item())


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
    # Object collectives and CPU flags go through gloo: NCCL would move them through the GPU.
    return _CPU_GROUP if _CPU_GROUP is not None else dist.group.WORLD
