"""Tensor-parallel all-reduce: small CUDA messages over peer-to-peer symmetric memory, the rest over NCCL.

A batch-1 decode step all-reduces ~65 tiny tensors (8 KiB for hidden size 4096); NCCL takes ~17 us for each
inside the decode CUDA graph. PyTorch's symmetric memory maps every rank's buffer into every other rank's
address space (NVLink P2P), and `symm_mem::one_shot_all_reduce_copy_out` does the whole all-reduce in one
kernel (~6 us): copy the local input into this rank's buffer, signal the peers, read and sum every rank's
buffer. Above ONE_SHOT_MAX_BYTES the two-shot kernel (each rank reduces a slice, then all gather the slices)
reads less and is faster. Both are graph-capturable (device pointers and signal pads only). NVLink
multicast (multimem) is never used. Numbers: bench/results/allreduce_*.json.

    setup_tensor_parallel_comm(device)   # once per rank, after torch.distributed is initialised (collective)
    out = all_reduce(x)                  # sum over the ranks; use the return value (x may be left as is)
    partial = row_parallel_linear(x, weight, bias)                   # a row-parallel layer, reduced by:
    normed, summed = all_reduce_rms_norm(partial, residual, weight, eps)   # a decoder layer's reduce + add + norm

all_reduce_rms_norm fuses the row-parallel layer's all-reduce with the residual add and the RMSNorm that follow
it, in one Triton launch (up to FUSED_MAX_ROWS rows). Each rank writes its partial rows into its own slot of every
peer's symmetric buffer as 8-byte lines, each 4 bytes of data beside a 4-byte flag that names the call (NCCL's
"LL" protocol): an aligned 8-byte store lands whole, so a line that carries this call's flag carries this call's
data, and no fence or separate flag has to follow the data across NVLink. Each rank then waits, in its own
memory, until every line of the peers' rows carries the flag, resets them to 0 (flags are odd: a stale line can
never match a later call), and sums the rows in rank order (so every rank gets the same bits), adds the residual
and normalises. The two halves of the buffer take turns from call to call, so a call never overwrites lines a
peer may still be reading from the previous one. The lines double the bytes sent: at batch 1 (8 KiB) that costs
nothing next to the fence and flag round trip it saves. At batch 1 the row-parallel layer's GEMV sends the lines
itself as each program finishes (row_parallel_linear), so the transfer overlaps the GEMV.

Anything else - CPU/gloo, world size 1, fp16, messages over the buffer, setup failure - goes to
`dist.all_reduce`; why symmetric memory is off is logged once. RAYPRISM_SYMM_MEM=0 turns it off.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

# Largest message on the symmetric-memory path (its buffer); larger ones go to NCCL. 512 decode rows of hidden
# 4096 in bf16 are 4 MiB. On 2 x H200 two-shot beat NCCL up to 16 MiB in a graph (72 vs 86 us) but only up to
# 8 MiB eagerly (prefill), where they were even at 16 MiB.
DEFAULT_MAX_BYTES = 8 << 20
ONE_SHOT_MAX_BYTES = 1 << 20  # one-shot vs two-shot crossover on 2 x H200: between 1 and 2 MiB
TWO_SHOT_WORLD_SIZES = (2, 4, 8)  # two_shot_all_reduce_out is built for these; others stay one-shot
SYMM_DTYPES = (torch.bfloat16, torch.float32)  # the dtypes the one-shot kernel is built for

FUSED_MAX_ROWS = 128  # rows per fused all-reduce + norm call (decode batches); more take the unfused path
FUSED_SLOT_BYTES = 2 << 20  # a rank's lines in one half: FUSED_MAX_ROWS rows of hidden 4096 in bf16, doubled
FUSED_PROGRAMS = 32  # fixed grid: row i is always handled by program i % 32 (the halves' safety depends on it)

_buffer: torch.Tensor | None = None  # this rank's symmetric buffer (bytes), mapped by every peer
_group = None  # the process group it was set up for (the default group)
_group_name = ""
_fused: "_FusedNorm | None" = None  # the fused all-reduce + norm's own symmetric buffer and turns


def setup_tensor_parallel_comm(device: torch.device, max_bytes: int = DEFAULT_MAX_BYTES) -> bool:
    """Allocate and exchange the symmetric buffer on the default group; True if the fast path is on.

    Collective: every rank calls it with the same arguments. Calling again on the same group is a no-op.
    """
    global _buffer, _group, _group_name, _fused
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return False
    if _group is dist.group.WORLD:
        return _buffer is not None
    _buffer, _fused, _group, _group_name = None, None, dist.group.WORLD, dist.group.WORLD.group_name
    device = torch.device(device)
    reason = _unsupported_reason(device)
    ok = reason is None
    if ok:
        try:
            _buffer = _rendezvous(device, max_bytes)
            _fused = _FusedNorm(device)
        except Exception as exc:  # no P2P between the GPUs, old torch, ...
            reason, ok = f"setup failed: {exc!r}", False
    if device.type == "cuda" and dist.get_backend() == "nccl":  # every rank takes the same path, or none
        agreed = torch.tensor([int(ok)], device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        if ok and not agreed.item():
            reason, ok = "another rank could not set it up", False
    if not ok:
        _buffer = _fused = None
        if device.type == "cuda" and reason != "RAYPRISM_SYMM_MEM=0":
            # Loud: decode is measurably slower on this path. Pods under Pod Security `restricted` (no
            # capabilities, RuntimeDefault seccomp) may be refused the CUDA IPC that maps peers' buffers.
            logger.warning("TENSOR-PARALLEL FALLBACK: symmetric memory could not be set up (%s); every all-reduce "
                           "now goes through NCCL (dist.all_reduce), which makes decode slower. If the pods run "
                           "under a restricted security context, CUDA IPC between the ranks may be what failed.",
                           reason)
        else:
            logger.info("tensor-parallel all-reduce: symmetric memory off (%s); using dist.all_reduce", reason)
        return False
    logger.info("tensor-parallel all-reduce: symmetric memory up to %d bytes (one-shot up to %d)", max_bytes,
                ONE_SHOT_MAX_BYTES)
    return True


def _unsupported_reason(device: torch.device) -> str | None:
    if os.environ.get("RAYPRISM_SYMM_MEM", "1") == "0":
        return "RAYPRISM_SYMM_MEM=0"
    if device.type != "cuda" or dist.get_backend() != "nccl":
        return f"device {device.type} with backend {dist.get_backend()}"
    if not hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"):
        return f"torch {torch.__version__} has no symm_mem.one_shot_all_reduce_copy_out"
    return None


def _rendezvous(device: torch.device, max_bytes: int) -> torch.Tensor:
    # Only peer-to-peer mappings are needed: don't create NVLink multicast objects (unsafe on shared hosts).
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    import torch.distributed._symmetric_memory as symm_mem

    buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
    symm_mem.rendezvous(buffer, _group_name)
    # A first all-reduce proves the mappings work before the model relies on them.
    ones = torch.ones(8, dtype=torch.float32, device=device)
    total = torch.ops.symm_mem.one_shot_all_reduce_copy_out(
        buffer[: ones.nbytes].view(torch.float32), ones, "sum", _group_name, torch.empty_like(ones)
    )
    if not bool((total == dist.get_world_size()).all()):
        raise RuntimeError(f"self-check summed to {total.tolist()}")
    return buffer


def path_for(x: torch.Tensor) -> str:
    """"one_shot", "two_shot" or "nccl": how all_reduce(x) runs (the same on every rank for the same x)."""
    nbytes = x.numel() * x.element_size()
    if not (
        _buffer is not None and x.is_cuda and x.dtype in SYMM_DTYPES and 0 < nbytes <= _buffer.numel()
        and nbytes % 4 == 0 and x.is_contiguous() and (x.storage_offset() * x.element_size()) % 16 == 0
    ):
        return "nccl"
    if nbytes > ONE_SHOT_MAX_BYTES and dist.get_world_size() in TWO_SHOT_WORLD_SIZES:
        return "two_shot"
    return "one_shot"


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of x over the tensor-parallel ranks. May return a new tensor; x may or may not be overwritten."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    path = path_for(x)
    if path == "nccl":
        dist.all_reduce(x)
        return x
    # Safe to reuse the buffer at once: each kernel ends with a barrier after every peer's last read of it.
    symm = _buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
    if path == "one_shot":
        return torch.ops.symm_mem.one_shot_all_reduce_copy_out(symm, x, "sum", _group_name, torch.empty_like(x))
    symm.copy_(x)
    return torch.ops.symm_mem.two_shot_all_reduce_out(symm, "sum", _group_name, torch.empty_like(x))


class _FusedNorm:
    """State of all_reduce_rms_norm on this rank: a symmetric buffer of two halves with a slot of 8-byte lines per
    rank in each, and each program's count of calls (its half is that count's parity and its flag 2 * count + 1;
    every rank makes the same calls)."""

    def __init__(self, device: torch.device, slot_bytes: int = FUSED_SLOT_BYTES):
        import torch.distributed._symmetric_memory as symm_mem

        self.slot_bytes = slot_bytes
        self.buffer = symm_mem.empty(2 * dist.get_world_size() * slot_bytes, dtype=torch.uint8, device=device)
        self.buffer.zero_()  # flag 0 matches no call
        self.handle = symm_mem.rendezvous(self.buffer, _group_name)
        self.rank, self.world_size = self.handle.rank, self.handle.world_size
        self.calls = torch.zeros(FUSED_PROGRAMS, dtype=torch.int32, device=device)
        self.sent: torch.Tensor | None = None  # a row-parallel output whose GEMV sent its lines (row_parallel_linear)
        torch.cuda.synchronize(device)
        self.handle.barrier()  # every rank's buffer is zeroed before any peer writes a line into it

    def fits(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.is_contiguous() and self.fits_rows(x.numel() // x.shape[-1], x.shape[-1], x.dtype)

    def fits_rows(self, rows: int, n: int, dtype: torch.dtype) -> bool:
        size = dtype.itemsize
        return dtype in SYMM_DTYPES and rows <= FUSED_MAX_ROWS and (n * size) % 4 == 0 and 2 * rows * n * size <= \
            self.slot_bytes

    def lines(self) -> tuple:
        """(buffer_ptrs, calls, slot_words, rank, world_size): what the fused kernels need of this state."""
        return self.handle.buffer_ptrs_dev, self.calls, self.slot_bytes // 8, self.rank, self.world_size


def row_parallel_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """This rank's partial output of a row-parallel layer, which the next all_reduce_rms_norm sums over the ranks.

    At batch 1 on the fused path the GEMV also sends each program's outputs to the peers as that call's lines as
    soon as it has them, so the transfer overlaps the rest of the GEMV instead of following it; the call then
    only waits for the peers' lines."""
    from . import gemv
    from .layers import linear

    if _fused is None or not (x.is_cuda and gemv.supports(x, weight)
                              and _fused.fits_rows(1, weight.shape[0], x.dtype)):
        return linear(x, weight, bias)
    out = gemv.gemv(x, weight, bias, lines=_fused.lines())
    _fused.sent = out
    return out


def all_reduce_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """x summed over the ranks (x: this rank's partial output of a row-parallel layer), plus residual, then
    RMSNorm'd: returns (norm(s), s) with s = all_reduce(x) + residual, rounded as the unfused ops round."""
    from . import fused_ops

    if _fused is None or not _fused.fits(x):  # no symmetric memory (see setup), or too many rows
        return fused_ops.rms_norm(all_reduce(x), weight, eps, residual)
    sent, _fused.sent = _fused.sent, None
    if sent is not None and sent is not x:  # its lines carry this call's flag: any other rows would be misread
        raise RuntimeError("all_reduce_rms_norm: the row-parallel output sent by row_parallel_linear was not "
                           "reduced next")
    return fused_ops.all_reduce_rms_norm(x, residual, weight, eps, _fused.lines(), sent is x)
