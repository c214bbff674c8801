"""ModelRunner: one per tensor-parallel rank. Holds this rank's weight slices and KV pool, runs the model.

Rank 0 drives: `call(name, *args)` broadcasts (name, args) to the other ranks over a gloo group (so NCCL
carries only tensors), then runs the method locally. Ranks > 0 sit in `serve_forever`.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import AutoConfig

from .attention import AttentionMetadata
from .comm import setup_tensor_parallel_comm
from .config import EngineConfig
from .layers import Attention
from .loader import CheckpointReader, resolve_model_path
from .model import CausalLM
from .sequence import Sequence

logger = logging.getLogger(__name__)

# On the CPU there is no "free device memory": the KV pool gets kv_cache_memory_fraction of this budget.
CPU_KV_CACHE_BUDGET_BYTES = 2 << 30


@dataclass
class Batch:
    """One forward pass, as plain lists (cheap to broadcast to the other ranks)."""

    is_prefill: bool
    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    cu_seqlens: list[int]
    block_tables: list[list[int]]
    context_lens: list[int]

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], is_prefill: bool, block_size: int) -> Batch:
        input_ids, positions, slots, cu_seqlens = [], [], [], [0]
        for seq in seqs:
            new_positions = range(len(seq)) if is_prefill else [len(seq) - 1]
            for pos in new_positions:
                input_ids.append(seq.token_ids[pos])
                positions.append(pos)
                slots.append(seq.block_table[pos // block_size] * block_size + pos % block_size)
            cu_seqlens.append(len(input_ids))
        block_tables, context_lens = [], []
        if not is_prefill:
            width = max(len(seq.block_table) for seq in seqs)
            block_tables = [seq.block_table + [-1] * (width - len(seq.block_table)) for seq in seqs]
            context_lens = [len(seq) for seq in seqs]
        return cls(is_prefill, input_ids, positions, slots, cu_seqlens, block_tables, context_lens)


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0, world_size: int = 1):
        self.config, self.rank, self.world_size = config, rank, world_size
        if world_size != config.tensor_parallel_size:
            raise ValueError(f"world_size={world_size} but tensor_parallel_size={config.tensor_parallel_size}")
        if world_size > 1:
            if not dist.is_initialized() or dist.get_world_size() != world_size or dist.get_rank() != rank:
                raise RuntimeError(
                    f"tensor parallel rank {rank}/{world_size} needs torch.distributed initialised with that rank "
                    "and world size (gloo on CPU, nccl on CUDA) before ModelRunner is created"
                )
            gloo = dist.get_backend() == "gloo"
            self.control_group = dist.group.WORLD if gloo else dist.new_group(backend="gloo")
        self.device = config.torch_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(rank % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())
            setup_tensor_parallel_comm(self.device)  # symmetric-memory all-reduce (comm.py); collective
        self.dtype = config.torch_dtype()
        self.model_path = resolve_model_path(config.model, config.revision)
        self.hf_config = AutoConfig.from_pretrained(self.model_path)
        max_positions = self.hf_config.max_position_embeddings
        if config.max_model_len and config.max_model_len > max_positions:
            raise ValueError(f"max_model_len={config.max_model_len} exceeds the model's {max_positions} positions")
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                self.model = CausalLM(self.hf_config, config.max_model_len or max_positions).eval()
        finally:
            torch.set_default_dtype(default_dtype)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.load_weights(config.model, config.revision)
        self.num_kv_blocks = self._kv_pool_size()
        self.max_model_len = self._max_model_len(max_positions)
        self.kv_cache: torch.Tensor | None = None
        self._allocate_kv_cache()

    # --- driving the other ranks -------------------------------------------------------------------
    def call(self, name: str, *args):
        """Run method `name` on every rank (only rank 0 calls this)."""
        if self.world_size == 1:
            return getattr(self, name)(*args)
        dist.broadcast_object_list([name, args], src=0, group=self.control_group)
        return self._run_on_all_ranks(name, args)

    def serve_forever(self) -> None:
        while True:
            message = [None, None]
            dist.broadcast_object_list(message, src=0, group=self.control_group)
            name, args = message
            try:
                self._run_on_all_ranks(name, args)
            except Exception:  # rank 0 raises the same failure to its caller; stay in the loop
                logger.exception("rank %d: %s failed", self.rank, name)
            if name == "shutdown":
                return

    def _run_on_all_ranks(self, name: str, args: tuple):
        if name == "execute_model":  # the hot path skips the extra round trip
            return self.execute_model(*args)
        # Everything else (weights, sleep) must succeed everywhere or be reported as failed on rank 0.
        result, error, local_exc = None, None, None
        try:
            result = getattr(self, name)(*args)
        except Exception as exc:
            error, local_exc = f"rank {self.rank}: {exc}", exc
        errors = [None] * self.world_size
        dist.all_gather_object(errors, error, group=self.control_group)
        if local_exc is not None:
            raise local_exc
        if any(errors):
            raise RuntimeError(f"{name} failed: " + "; ".join(e for e in errors if e))
        return result

    # --- weights ------------------------------------------------------------------------------------
    def load_weights(self, model: str, revision: str | None = None) -> None:
        """Load this rank's slices; a checkpoint that lacks or adds tensors is refused before any is copied."""
        path = resolve_model_path(model, revision)
        reader = CheckpointReader(path)
        params = dict(self.model.named_parameters())
        targets = [t[0] for t in map(self.model.checkpoint_target, reader.names()) if t is not None]
        unknown, missing = set(targets) - set(params), set(params) - set(targets)
        if unknown or missing:
            raise ValueError(
                f"model {model!r}: checkpoint does not fit the model (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unknown)[:3]})"
            )
        self.model.load_weights(reader.slices(desc=f"Loading weights (rank {self.rank})"))
        self.model_path = path

    def load_named_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Full (unsharded) HF-named tensors; each rank copies its slice. Runs on every rank."""
        self.model.load_weights(named_tensors)

    # --- KV cache -----------------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        attn = self.attention_layers[0]
        per_token = 2 * len(self.attention_layers) * attn.num_kv_heads * attn.head_dim * self.dtype.itemsize
        return per_token * self.config.block_size

    def _kv_pool_size(self) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        if self.device.type == "cuda":
            budget = torch.cuda.mem_get_info(self.device)[0] * self.config.kv_cache_memory_fraction
        else:
            budget = CPU_KV_CACHE_BUDGET_BYTES * self.config.kv_cache_memory_fraction
        num_blocks = torch.tensor([int(budget) // self._block_bytes()])
        if self.world_size > 1:  # every rank must hold the same number of blocks
            dist.all_reduce(num_blocks, op=dist.ReduceOp.MIN, group=self.control_group)
        if num_blocks.item() < 1:
            raise RuntimeError("no memory left for the KV cache; lower the model size or raise the memory fraction")
        return int(num_blocks.item())

    def _max_model_len(self, max_positions: int) -> int:
        capacity = self.num_kv_blocks * self.config.block_size
        limits = {
            "the KV cache capacity (num_kv_blocks * block_size)": capacity,
            "max_num_batched_tokens": self.config.max_num_batched_tokens,  # a prefill must fit one step
        }
        if self.config.max_model_len is None:
            return min(max_positions, *limits.values())
        for what, limit in limits.items():
            if self.config.max_model_len > limit:
                raise ValueError(f"max_model_len={self.config.max_model_len} exceeds {what} = {limit}")
        return self.config.max_model_len

    def _allocate_kv_cache(self) -> None:
        attn = self.attention_layers[0]
        shape = (2, len(self.attention_layers), self.num_kv_blocks, self.config.block_size, attn.num_kv_heads,
                 attn.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        for i, layer in enumerate(self.attention_layers):
            layer.k_cache, layer.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        self.decode_graphs = self._capture_decode_graphs()

    def _capture_decode_graphs(self):
        """Decode CUDA graphs over padded batch sizes; they hold the cache's and weights' addresses."""
        if self.device.type != "cuda" or self.config.enforce_eager:
            return None
        from .cuda_graphs import DecodeGraphs
        from .paged_attention import supports  # imports Triton: CUDA only

        if not supports(self.attention_layers[0].head_dim):
            return None
        max_blocks_per_seq = -(-self.max_model_len // self.config.block_size)
        return DecodeGraphs(self.model, min(self.config.max_num_seqs, 512), max_blocks_per_seq, self.device)

    def _free_kv_cache(self) -> None:
        for layer in self.attention_layers:
            layer.k_cache = layer.v_cache = torch.empty(0)
        self.kv_cache = self.decode_graphs = None

    def sleep(self) -> None:
        """Drop the KV cache and move the weights to host memory."""
        self._free_kv_cache()
        if self.device.type == "cuda":
            for param in self.model.parameters():
                param.data = param.data.to("cpu")
            torch.cuda.empty_cache()

    def wake_up(self) -> None:
        if self.device.type == "cuda":
            for param in self.model.parameters():
                param.data = param.data.to(self.device)
        self._allocate_kv_cache()

    def shutdown(self) -> None:
        self._free_kv_cache()

    # --- forward ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, batch: Batch) -> torch.Tensor | None:
        """Run one step; rank 0 gets the logits of each sequence's last token, other ranks None."""
        def as_tensor(values):
            return torch.tensor(values, dtype=torch.long, device=self.device)

        meta = AttentionMetadata(
            is_prefill=batch.is_prefill,
            slot_mapping=as_tensor(batch.slot_mapping),
            cu_seqlens=batch.cu_seqlens,
            block_tables=None if batch.is_prefill else as_tensor(batch.block_tables),
            context_lens=None if batch.is_prefill else as_tensor(batch.context_lens),
        )
        hidden = self.run_model(as_tensor(batch.input_ids), as_tensor(batch.positions), meta)
        last_tokens = as_tensor(batch.cu_seqlens[1:]) - 1
        return self.model.compute_logits(hidden[last_tokens])

    def run_model(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # The one place for decode CUDA graphs (config.enforce_eager turns them off).
        if not meta.is_prefill and self.decode_graphs and self.decode_graphs.can_run(len(input_ids)):
            return self.decode_graphs.run(input_ids, positions, meta)
        return self.model(input_ids, positions, meta)
