"""A process group between a trainer and the inference workers, outside the workers' default (TP) group.

The trainer is rank 0 and hosts the TCP store; inference worker i of a replica joins as `rank_offset + i`.
Both sides call `weight_update_group` with the same address, port, world size and backend, then the trainer
broadcasts each tensor from rank 0 (`group.broadcast(tensor, 0).wait()`).
"""
from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

_TIMEOUT = timedelta(minutes=10)


def weight_update_group(master_address: str, master_port: int, rank: int, world_size: int,
                        backend: str = "gloo", group_name: str = "rayprism-weights") -> dist.ProcessGroup:
    """Joins (rank 0: creates) a standalone process group; it does not touch torch.distributed's default group."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=_TIMEOUT)
    prefixed = dist.PrefixStore(group_name, store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, world_size, _TIMEOUT)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = _TIMEOUT
        return dist.ProcessGroupNCCL(prefixed, rank, world_size, options)
    raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")


def receive_broadcast(group: dist.ProcessGroup, names: list[str], dtypes: list, shapes: list,
                      device: torch.device):
    """Yields (name, tensor) as each tensor arrives, so only one received tensor is alive at a time."""
    if not len(names) == len(dtypes) == len(shapes):
        raise ValueError(f"names, dtypes and shapes differ in length: {len(names)}, {len(dtypes)}, {len(shapes)}")
    for name, dtype, shape in zip(names, dtypes, shapes):
        tensor = torch.empty(tuple(shape), dtype=to_dtype(dtype), device=device)
        group.broadcast(tensor, 0).wait()
        yield name, tensor


def to_dtype(dtype) -> torch.dtype:
    """Accepts torch dtypes or their names ("bfloat16", "torch.float32")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved
