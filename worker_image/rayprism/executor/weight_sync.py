"""Moving a trainer's weights into the inference workers.

A weight update group: a process group between a trainer and the workers, outside the workers' default (TP)
group. The trainer is rank 0 and hosts the TCP store; inference worker i of a replica joins as
`rank_offset + i`. Both sides call `weight_update_group` with the same address, port, world size and backend,
then the trainer broadcasts each tensor from rank 0 (`group.broadcast(tensor, 0).wait()`).

Buckets (LLM.update_weights with tensors): (name, tensor) pairs grouped up to a size, each sent to every rank
in one Ray object; a CUDA tensor travels as a CUDA IPC handle (the worker maps the trainer's memory: no copy
through the host), which needs the worker on the same GPU as the trainer (colocated).
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import reduce_tensor

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


@dataclass(frozen=True)
class CudaIpcTensor:
    """A CUDA tensor of another process on the same GPU: torch's rebuild function and arguments, and the GPU's
    UUID (device indices differ between processes that see different CUDA_VISIBLE_DEVICES)."""
    rebuild: object
    args: tuple
    gpu_uuid: str

    @classmethod
    def share(cls, tensor: torch.Tensor) -> "CudaIpcTensor":
        rebuild, args = reduce_tensor(tensor)
        return cls(rebuild, args, str(torch.cuda.get_device_properties(tensor.device).uuid))

    def open(self, device: torch.device) -> torch.Tensor:
        if device.type != "cuda" or str(torch.cuda.get_device_properties(device).uuid) != self.gpu_uuid:
            raise ValueError(f"a CUDA IPC weight is on GPU {self.gpu_uuid}, which this worker ({device}) does not "
                             "use: pass cuda_ipc=False to send weights through host memory")
        args = list(self.args)
        # rebuild_cuda_tensor's storage_device: this process's index of that GPU
        args[6] = device.index if device.index is not None else torch.cuda.current_device()
        return self.rebuild(*args)


def weight_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, cuda_ipc: bool
                   ) -> Iterator[list[tuple[str, torch.Tensor | CudaIpcTensor]]]:
    """Groups (name, tensor) into lists of at most bucket_bytes (a larger tensor alone); CUDA tensors become IPC
    handles where cuda_ipc, else host copies. A bucket's tensors must stay alive until the workers loaded it."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes!r}")
    bucket, size = [], 0
    for name, tensor in named_tensors:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"weights must be (name, torch.Tensor) pairs, got ({type(name).__name__}, "
                            f"{type(tensor).__name__})")
        tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, CudaIpcTensor.share(tensor) if cuda_ipc and tensor.is_cuda else tensor.cpu()))
        size += nbytes
    if bucket:
        yield bucket


def open_bucket(bucket: list[tuple[str, torch.Tensor | CudaIpcTensor]], device: torch.device
                ) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in bucket:
        yield name, tensor.open(device) if isinstance(tensor, CudaIpcTensor) else tensor
