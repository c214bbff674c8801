"""Tensor-parallel building blocks (Megatron-style) for Llama-family models.

Every parameter has `weight_loader(param, loaded, shard_id=None)`; `loaded` is a full tensor or a
memory-mapped safetensors slice, and the loader reads only this rank's part of it.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import comm, quant
from .attention import AttentionMetadata, paged_attention, store_kv


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shape_of(loaded) -> list[int]:
    return list(loaded.shape) if isinstance(loaded, torch.Tensor) else loaded.get_shape()


def read_part(loaded, dim: int, start: int, length: int) -> torch.Tensor:
    """Read loaded[start:start+length] along `dim` (only that part is read from a safetensors slice)."""
    index = [slice(None)] * len(shape_of(loaded))
    index[dim] = slice(start, start + length)
    return loaded[tuple(index)]


def default_weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
    param.data.copy_(loaded[:])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None, weight_scale: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear (into `out` if given: [rows, out_features]); on CUDA a single row (batch-1 decode) takes the
    weight-streaming GEMV kernel (gemv.py). weight_scale: an FP8 weight's per-channel scales (quant.fp8_linear)."""
    if weight_scale is not None:
        assert out is None, "an FP8 linear layer writes a new tensor"
        return quant.fp8_linear(x, weight, weight_scale, bias)
    if x.is_cuda:
        from . import gemv

        if gemv.supports(x, weight):
            return gemv.gemv(x, weight, bias, out=out)
    if out is None:
        return F.linear(x, weight, bias)
    return torch.addmm(bias, x, weight.t(), out=out) if bias is not None else torch.mm(x, weight.t(), out=out)


class VocabParallelEmbedding(nn.Module):
    """Vocabulary rows split across ranks (padded to a multiple of the world size)."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.rows_per_rank = math.ceil(num_embeddings / tp_size())
        self.vocab_start = tp_rank() * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        length = max(0, min(self.rows_per_rank, self.num_embeddings - self.vocab_start))
        param.data.zero_()
        param.data[:length].copy_(read_part(loaded, 0, self.vocab_start, length))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if tp_size() == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        mine = (local >= 0) & (local < self.rows_per_rank)
        out = F.embedding(local * mine, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return comm.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-parallel output projection: each rank computes the logits of its slice of the vocabulary (forward);
    `gather` puts whole rows on rank 0 for sampling, `argmax` gives every rank the greedy tokens without them."""

    def forward(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        return linear(hidden, self.weight, out=out)

    def gather(self, logits: torch.Tensor) -> torch.Tensor | None:
        """This rank's logits -> the full-vocabulary rows on rank 0, None on other ranks."""
        if tp_size() == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(tp_size())] if tp_rank() == 0 else None
        dist.gather(logits, parts, dst=0)
        return torch.cat(parts, dim=-1)[:, : self.num_embeddings] if tp_rank() == 0 else None

    def argmax(self, logits: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's logits -> each row's greedy token (the first largest logit of the whole row) on every rank:
        each rank's best candidates are exchanged in one all-reduce (see greedy.py), not the logits."""
        valid = max(0, min(self.rows_per_rank, self.num_embeddings - self.vocab_start))  # the rest is padding
        if logits.is_cuda:
            from . import greedy

            candidates = greedy.chunk_candidates(logits, valid, self.vocab_start, tp_rank(), tp_size())
            return greedy.select(comm.all_reduce(candidates), out)
        candidates = torch.zeros(tp_size(), logits.shape[0], 2)  # [rank, row, (value, index)]
        candidates[tp_rank(), :, 0] = float("-inf")
        if valid:
            values, index = logits[:, :valid].float().max(dim=-1)  # the first of equal maxima
            candidates[tp_rank(), :, 0], candidates[tp_rank(), :, 1] = values, index + self.vocab_start
        candidates = comm.all_reduce(candidates).transpose(0, 1)  # [row, rank, 2]: vocabulary order
        best = candidates[:, :, 0].argmax(dim=-1)
        tokens = candidates[torch.arange(len(best)), best, 1].long()
        return tokens if out is None else out.copy_(tokens)


class ColumnParallelLinear(nn.Module):
    """Output features split across ranks; no communication. quantization "fp8": an FP8 weight with per-channel
    scales (quant.py), split with the rows."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, quantization: str | None = None):
        super().__init__()
        assert output_size % tp_size() == 0, f"output size {output_size} not divisible by tp {tp_size()}"
        self.output_size_per_rank = output_size // tp_size()
        self.weight = nn.Parameter(torch.empty(self.output_size_per_rank, input_size,
                                               dtype=quant.weight_dtype(quantization)), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight_scale = quant.weight_scale_param(self.output_size_per_rank, quantization, self.weight_loader)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.output_size_per_rank), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def shard_rows(self, shard_id) -> tuple[int, int, int, int]:
        """(offset, size, start, full): checkpoint tensor `shard_id`, of `full` rows, gives its rows
        start:start+size to this rank's rows offset:offset+size."""
        size = self.output_size_per_rank
        return 0, size, tp_rank() * size, size * tp_size()

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        offset, size, start, full = self.shard_rows(shard_id)
        rows = slice(offset, offset + size)
        if param is self.weight_scale:
            quant.load_scale_rows(param, rows, loaded, start, size, full)
        elif param is self.weight and self.weight_scale is not None:
            quant.load_weight_rows(param, self.weight_scale, rows, read_part(loaded, 0, start, size))
        else:
            param.data[rows].copy_(read_part(loaded, 0, start, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, weight_scale=self.weight_scale)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs (e.g. gate and up) in one matmul; shard_id indexes them."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 quantization: str | None = None):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, quantization)

    def shard_rows(self, shard_id: int) -> tuple[int, int, int, int]:
        size = self.output_sizes[shard_id] // tp_size()
        return sum(self.output_sizes[:shard_id]) // tp_size(), size, tp_rank() * size, self.output_sizes[shard_id]


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection. Heads split across ranks; KV heads replicated when tp > num_kv_heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 quantization: str | None = None):
        tp = tp_size()
        assert num_heads % tp == 0, f"num_attention_heads {num_heads} not divisible by tp {tp}"
        assert num_kv_heads % tp == 0 or tp % num_kv_heads == 0, (
            f"num_key_value_heads {num_kv_heads} and tp {tp}: one must divide the other"
        )
        self.head_dim = head_dim
        self.num_heads = num_heads // tp
        self.num_kv_heads = max(1, num_kv_heads // tp)
        # With replication, rank r holds KV head r * num_kv_heads // tp.
        self.kv_head_start = tp_rank() * num_kv_heads // tp if tp > num_kv_heads else tp_rank() * self.num_kv_heads
        self.total_kv_heads = num_kv_heads
        super().__init__(hidden_size, (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp, bias, quantization)

    def shard_rows(self, shard_id: str) -> tuple[int, int, int, int]:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            return 0, q_size, tp_rank() * q_size, q_size * tp_size()
        offset = q_size if shard_id == "k" else q_size + kv_size
        return offset, kv_size, self.kv_head_start * self.head_dim, self.total_kv_heads * self.head_dim


class ReplicatedLinear(nn.Module):
    """The whole weight on every rank (a MoE router: every rank must pick the same experts)."""

    def __init__(self, input_size: int, output_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """Input features split across ranks; one all-reduce sums the partial outputs. With reduce_results=False
    each rank returns its partial sum and the caller reduces (the decoder's RMSNorm does, fused with its add)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, reduce_results: bool = True,
                 quantization: str | None = None):
        super().__init__()
        self.reduce_results = reduce_results
        assert input_size % tp_size() == 0, f"input size {input_size} not divisible by tp {tp_size()}"
        self.input_size_per_rank = input_size // tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_rank,
                                               dtype=quant.weight_dtype(quantization)), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        # FP8: one scale per output channel, whole on every rank (quantizing at load takes it over whole rows)
        self.weight_scale = quant.weight_scale_param(output_size, quantization, self.weight_loader)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = default_weight_loader

    def weight_loader(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        size = self.input_size_per_rank
        columns = slice(tp_rank() * size, (tp_rank() + 1) * size)
        if param is self.weight_scale:
            quant.load_scale_rows(param, slice(None), loaded, 0, param.shape[0], param.shape[0])
        elif param is self.weight and self.weight_scale is not None:
            quant.load_weight_rows(param, self.weight_scale, slice(None), loaded[:], columns)
        else:
            param.data.copy_(read_part(loaded, 1, columns.start, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if tp_rank() == 0 else None
        if tp_size() == 1 or self.weight_scale is not None:  # (comm.row_parallel_linear's GEMV is bf16-only)
            out = linear(x, self.weight, bias, weight_scale=self.weight_scale)
            return comm.all_reduce(out) if self.reduce_results else out  # else the next norm all-reduces it
        if self.reduce_results:
            return comm.all_reduce(linear(x, self.weight, bias))
        return comm.row_parallel_linear(x, self.weight, bias)  # the next norm all-reduces it


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual` (the decoder's residual stream): s = x + residual, returns (norm(s), s).

        With a residual, x is the output of a row-parallel layer that left its all-reduce to this norm: under
        tensor parallelism x is this rank's partial sum, and the reduce, the add and the norm run fused."""
        # Same arithmetic as transformers' LlamaRMSNorm: normalise in float32, scale in the model dtype.
        if x.is_cuda:  # one fused launch (fused_ops.py / comm.py), the residual add included, same roundings
            from .fused_ops import rms_norm

            if residual is not None and tp_size() > 1:
                return comm.all_reduce_rms_norm(x, residual, self.weight, self.eps)
            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = (comm.all_reduce(x) if tp_size() > 1 else x) + residual
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        normed = self.weight * x32.to(x.dtype)
        return normed if residual is None else (normed, x)


STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with a cos/sin table for every position up to max_positions."""

    def __init__(self, hf_config, head_dim: int, max_positions: int):
        super().__init__()
        rope = getattr(hf_config, "rope_parameters", None) or {"rope_type": "default"}
        rope_type = rope.get("rope_type", "default")
        if rope_type == "default":
            base = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
            scaling = 1.0
        elif rope_type in STATIC_ROPE_TYPES:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device="cpu")
            inv_freq = inv_freq.to(torch.get_default_device())  # the model may be built under torch.device("cuda")
        else:
            raise ValueError(f"rope_type {rope_type!r} is not supported (supported: {STATIC_ROPE_TYPES})")
        freqs = torch.arange(max_positions, dtype=torch.float)[:, None] * inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim]. (CUDA applies the tables in
        paged_attention.rotary_store_kv, fused with the KV-cache write.)"""
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Applies the rotary embedding, writes this step's K/V into the paged cache, then attends over each
    sequence's cached context."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.rotary = rotary
        # Views into the runner's KV pool: [num_blocks, block_size, num_kv_heads, head_dim]; set by ModelRunner.
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, positions, q, k, v, meta: AttentionMetadata, q_norm: RMSNorm | None = None,
                k_norm: RMSNorm | None = None) -> torch.Tensor:
        """q_norm, k_norm: RMSNorms over head_dim applied to each head of q and k before the rotary (Qwen3)."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if q.is_cuda:  # the norms, the rotary and the cache write in one launch
            from .paged_attention import rotary_store_kv

            norms = (q_norm.weight, k_norm.weight, q_norm.eps) if q_norm is not None else None
            q, k = rotary_store_kv(positions, q, k, v, self.rotary.cos, self.rotary.sin, self.k_cache, self.v_cache,
                                   meta.slot_mapping, norms)
        else:
            if q_norm is not None:
                q, k = q_norm(q), k_norm(k)
            q, k = self.rotary(positions, q, k)
            if self.k_cache.numel():
                store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, meta, self.scale)
        return out.reshape(-1, self.num_heads * self.head_dim)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] (fused gate/up projection output)."""
    if x.is_cuda:  # one fused launch (fused_ops.py), same roundings
        from .fused_ops import silu_and_mul as fused_silu_and_mul

        return fused_silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
