"""ModelRunner: one per tensor-parallel rank. Holds this rank's weight slices and KV pool, runs the model.

Rank 0 drives: `call(name, *args)` broadcasts (name, args) to the other ranks over a gloo group (so NCCL
carries only the model's tensors), then runs the method locally. Ranks > 0 sit in `serve_forever`.
"""
from __future__ import annotations

import array
import itertools
import logging
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from transformers import AutoConfig

from . import quant
from .attention import AttentionMetadata
from .comm import setup_tensor_parallel_comm
from .config import EngineConfig
from .layers import Attention
from .loader import CheckpointReader, resolve_model_path
from .model import CausalLM
from .sequence import PENDING, Sequence

logger = logging.getLogger(__name__)

CONTROL_TIMEOUT = timedelta(days=365)
# On the CPU there is no "free device memory": the KV pool gets kv_cache_memory_fraction of this budget.
CPU_KV_CACHE_BUDGET_BYTES = 2 << 30


@dataclass
class Batch:
    """One forward pass: the prefilled sequences first (each one's new tokens: a whole prompt, or a chunk of it,
    or what follows its cached prefix), then one new token per decoding sequence. Either part may be empty; a step
    with both (a mixed step) reads the weights once."""

    input_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    cu_seqlens: list[int]  # prefill part: [0, n0, n0+n1, ...]
    block_tables: list[list[int]]  # decode part, padded with -1 to the longest
    context_lens: list[int]  # decode part
    previous_rows: int = 0  # > 0: negative input ids name rows of the previous step's sampled tokens
    greedy: bool = False  # the step returns greedy tokens (on every rank), not logits
    # Prefill part: the sequences whose logits are returned for every new token (prompt_logprobs), and those whose
    # new tokens reach their end (the last row's logits sample the next token; a chunk before the last has none).
    prompt_logits: list[bool] | None = None
    samples: list[bool] | None = None
    # Prefill part, where a sequence's new tokens do not start at position 0: each one's context (its tokens in the
    # cache, the new ones included) and block table, padded with -1; empty where every prefill starts at 0.
    prefill_context_lens: list[int] = field(default_factory=list)
    prefill_block_tables: list[list[int]] = field(default_factory=list)

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], num_prefill: int, block_size: int, previous_rows: int = 0,
                       greedy: bool = False) -> Batch:
        """seqs[:num_prefill] are prefilled (num_scheduled_tokens of each, from its num_computed_tokens on), the rest
        decode. A decode input still pending on the device (the previous step, of previous_rows rows, sampled it) is
        written as -1 - its row there. A prefilled sequence that wants_prompt_logprobs gets the logits of every new
        token."""
        input_ids, positions, slots, cu_seqlens = [], [], [], [0]
        pending = False
        for i, seq in enumerate(seqs):
            start = seq.num_computed_tokens if i < num_prefill else len(seq) - 1
            for pos in range(start, start + seq.num_scheduled_tokens if i < num_prefill else len(seq)):
                token = seq.token_ids[pos]
                if token == PENDING:
                    token, pending = -1 - seq.pending_row, True
                input_ids.append(token)
                positions.append(pos)
                slots.append(seq.block_table[pos // block_size] * block_size + pos % block_size)
            if i < num_prefill:
                cu_seqlens.append(len(input_ids))
        prefilled, decode = seqs[:num_prefill], seqs[num_prefill:]
        batch = cls(input_ids, positions, slots, cu_seqlens, _padded([seq.block_table for seq in decode]),
                    [len(seq) for seq in decode], previous_rows if pending else 0, greedy,
                    [seq.wants_prompt_logprobs for seq in prefilled], [seq.samples for seq in prefilled])
        if any(seq.num_computed_tokens for seq in prefilled):
            batch.prefill_context_lens = [seq.num_computed_tokens + seq.num_scheduled_tokens for seq in prefilled]
            batch.prefill_block_tables = _padded([seq.block_table for seq in prefilled])
        return batch

    def logits_rows(self) -> list[int]:
        """The tokens whose logits the step returns, in order: of each prefilled sequence its last token where it
        samples (all of its new tokens where prompt_logits says so), then every decode token."""
        num_prefill = len(self.cu_seqlens) - 1
        prompt_logits = self.prompt_logits or [False] * num_prefill
        samples = self.samples or [True] * num_prefill
        rows = []
        for start, end, every, last in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:], prompt_logits, samples):
            rows.extend(range(start, end) if every else [end - 1] if last else [])
        return rows + list(range(self.cu_seqlens[-1], len(self.input_ids)))

    def pack(self) -> torch.Tensor:
        """One int64 CPU tensor, a header of sizes then every field: what rank 0 broadcasts to the other ranks,
        and one host-to-device copy instead of one per field."""
        prefill_lens = [end - start for start, end in zip(self.cu_seqlens[:-1], self.cu_seqlens[1:])]
        logits_rows = self.logits_rows()
        width = len(self.block_tables[0]) if self.block_tables else 0
        prefill_width = len(self.prefill_block_tables[0]) if self.prefill_block_tables else 0
        header = [len(self.input_ids), len(prefill_lens), len(self.context_lens), width, max(prefill_lens, default=0),
                  self.previous_rows, int(self.greedy), len(logits_rows), prefill_width,
                  max(self.prefill_context_lens, default=0), sum(self.prefill_context_lens), 0]
        # array('q') converts in C; torch.tensor(list) takes several ms for the block tables of a large batch.
        packed = array.array("q", header)
        for field_ in (self.input_ids, self.positions, self.slot_mapping, self.cu_seqlens, logits_rows,
                       self.context_lens, itertools.chain(*self.block_tables), self.prefill_context_lens,
                       itertools.chain(*self.prefill_block_tables)):
            packed.extend(field_)
            if len(packed) % 2:  # every field starts 16-byte aligned (see unpack)
                packed.append(0)
        return torch.frombuffer(packed, dtype=torch.int64)


def _padded(tables: list[list[int]]) -> list[list[int]]:
    """Block tables padded with -1 to the longest."""
    width = max(map(len, tables), default=0)
    return [table + [-1] * (width - len(table)) for table in tables]


def unpack(data: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    """The fields of a packed batch (after its header). Each starts 16-byte aligned: Triton compiles a kernel
    once per alignment of its pointer arguments, and views at batch-dependent offsets made serving compile new
    kernel variants for minutes."""
    return [part[:size] for part, size in zip(data.split([size + size % 2 for size in sizes]), sizes)]


PACK_HEADER = 12  # even, so the fields after the header stay 16-byte aligned (Batch.pack, unpack)
# Control messages from rank 0: a 2-int header (kind, payload length), then the payload.
EXECUTE, CALL = 0, 1


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
            # Ranks > 0 wait on this group for rank 0's next command for as long as the replica is idle.
            self.control_group = dist.group.WORLD if gloo else dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
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
                self.model = CausalLM(self.hf_config, config.max_model_len or max_positions,
                                      config.quantization).eval()
        finally:
            torch.set_default_dtype(default_dtype)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        if config.load_format == "dummy":
            self._random_weights()
        else:
            self.load_weights(config.model, config.revision)
        self.num_kv_blocks = self._kv_pool_size()
        self.max_model_len = self._max_model_len(max_positions)
        self.kv_cache: torch.Tensor | None = None
        self._allocate_kv_cache()
        self.asleep: set[str] = set()   # of "weights", "kv_cache": what sleep() freed and wake_up() has not restored
        self._parked_weights: list[tuple[torch.nn.Parameter, torch.Tensor]] = []   # (parameter, its data asleep)
        # The previous step's tokens: a greedy step's on every rank; else rank 0's, set by the engine's sampler.
        self.previous_tokens: torch.Tensor | None = None
        self.previous_tokens_on_every_rank = False
        # Two pinned buffers, used in turn: the batch's copy to the device then never waits for the step in
        # flight (a copy from pageable memory may), and a buffer is reused only once its copy has run.
        self._staging = [torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)]

    # --- driving the other ranks -------------------------------------------------------------------
    def call(self, name: str, *args):
        """Run method `name` on every rank (only rank 0 calls this). execute_model's packed batch travels as
        a tensor; anything else pickled."""
        if self.world_size == 1:
            return getattr(self, name)(*args)
        if name == "execute_model":
            kind, payload = EXECUTE, args[0]
        else:
            kind, payload = CALL, torch.frombuffer(bytearray(pickle.dumps((name, args))), dtype=torch.uint8)
        dist.broadcast(torch.tensor([kind, payload.numel()]), src=0, group=self.control_group)
        dist.broadcast(payload, src=0, group=self.control_group)
        return self._run_on_all_ranks(name, args)

    def serve_forever(self) -> None:
        while True:
            header = torch.empty(2, dtype=torch.long)
            dist.broadcast(header, src=0, group=self.control_group)
            kind, size = header.tolist()
            payload = torch.empty(size, dtype=torch.long if kind == EXECUTE else torch.uint8)
            dist.broadcast(payload, src=0, group=self.control_group)
            name, args = ("execute_model", (payload,)) if kind == EXECUTE else pickle.loads(payload.numpy().tobytes())
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
        self._check_weights_awake()
        path = resolve_model_path(model, revision)
        reader = CheckpointReader(path)
        params = dict(self.model.named_parameters())
        dtypes = reader.dtypes()
        targets = [t[0] for t in map(self.model.checkpoint_target, dtypes) if t is not None]
        unknown = set(targets) - set(params)
        missing = set(params) - set(targets) - quant.scales_quantized_at_load(self.model, dtypes)
        if unknown or missing:
            raise ValueError(
                f"model {model!r}: checkpoint does not fit the model (missing {sorted(missing)[:3]}, "
                f"unexpected {sorted(unknown)[:3]})"
            )
        self.model.load_weights(reader.slices(desc=f"Loading weights (rank {self.rank})"))
        self.model_path = path

    def _random_weights(self) -> None:
        """load_format "dummy": every weight random (normal, std 0.02), norms 1, biases 0, seeded per rank."""
        generator = torch.Generator(self.device).manual_seed(self.config.seed + self.rank)
        modules = dict(self.model.named_modules())
        for name, param in self.model.named_parameters():
            if name.endswith(".weight_scale"):
                continue  # set with its FP8 weight, which is quantized from random model-dtype values
            if param.dtype == quant.FP8:
                owner = modules[name.rpartition(".")[0]]
                values = torch.empty(param.shape, dtype=self.dtype, device=self.device).normal_(0.0, 0.02,
                                                                                                generator=generator)
                param.data, owner.weight_scale.data = quant.quantize_rows(values)
            elif param.dim() == 1:
                param.data.fill_(1.0 if name.endswith("norm.weight") else 0.0)
            else:
                param.data.normal_(0.0, 0.02, generator=generator)

    def load_named_tensors(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Full (unsharded) HF-named tensors; each rank copies its slice. Runs on every rank."""
        self._check_weights_awake()
        self.model.load_weights(named_tensors)

    def _check_weights_awake(self) -> None:
        if "weights" in getattr(self, "asleep", ()):   # absent during __init__'s first load
            raise RuntimeError("the weights are asleep: wake_up(['weights']) before loading new ones")

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
        """Not bounded by max_num_batched_tokens: a longer prompt is prefilled in chunks."""
        capacity = self.num_kv_blocks * self.config.block_size
        if self.config.max_model_len is None:
            return min(max_positions, capacity)
        if self.config.max_model_len > capacity:
            raise ValueError(f"max_model_len={self.config.max_model_len} exceeds the KV cache capacity "
                             f"(num_kv_blocks * block_size) = {capacity}")
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
        """Decode CUDA graphs over padded batch sizes (the one place they are used: execute_model); they hold the
        cache's and weights' addresses."""
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

    def sleep(self, level: int = 1) -> None:
        """Level 1: drop the KV cache and move the weights to host memory; level 2: drop both (the weights'
        shapes are kept on the meta device: load new ones after wake_up(["weights"]), the old values are gone)."""
        if level not in (1, 2):
            raise ValueError(f"level must be 1 or 2, got {level!r}")
        self._free_kv_cache()
        if "weights" not in self.asleep:
            self._parked_weights = [(param, self._park(param.data, level)) for param in self.model.parameters()]
            for param, _ in self._parked_weights:
                param.data = torch.empty(0, dtype=param.dtype, device=self.device)
        self.asleep = {"weights", "kv_cache"}
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @staticmethod
    def _park(data: torch.Tensor, level: int) -> torch.Tensor:
        """Where a weight waits while asleep: its shape only (level 2), itself (level 1 on the CPU), or a pinned
        host copy (level 1 on CUDA: copied back at full speed)."""
        if level == 2:
            return data.to("meta")
        if not data.is_cuda:
            return data
        return torch.empty_like(data, device="cpu", pin_memory=True).copy_(data)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Restores the weights ("weights": to their place, or allocated empty after sleep level 2) and the KV cache
        ("kv_cache", once the weights are back: the decode graphs it captures run the model); None: both."""
        tags = ["weights", "kv_cache"] if tags is None else list(tags)
        if not tags or not set(tags) <= {"weights", "kv_cache"}:
            raise ValueError(f"tags must be a non-empty subset of ['weights', 'kv_cache'], got {tags!r}")
        if "weights" in tags and "weights" in self.asleep:
            for param, parked in self._parked_weights:
                param.data = (torch.empty_like(parked, device=self.device) if parked.is_meta
                              else parked.to(self.device))
            self._parked_weights = []
            self.asleep.discard("weights")
        if "kv_cache" in tags and "kv_cache" in self.asleep:
            if "weights" in self.asleep:
                raise ValueError("wake_up(['kv_cache']) needs the weights awake first (wake_up(['weights']))")
            self._allocate_kv_cache()
            self.asleep.discard("kv_cache")

    def shutdown(self) -> None:
        self._free_kv_cache()

    # --- forward ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def execute_model(self, packed: torch.Tensor) -> torch.Tensor | None:
        """Run one step (a Batch.pack()). A greedy batch returns its tokens (on every rank: they stay on the device
        for the next step); any other returns to rank 0 the logits of Batch.logits_rows (None elsewhere)."""
        header = packed[:PACK_HEADER].tolist()
        (num_tokens, num_prefill, num_decode, width, max_prefill_len, previous_rows, greedy, num_logits_rows,
         prefill_width, max_context_len, num_context_tokens, _) = header
        num_context_seqs = num_prefill if prefill_width else 0
        sizes = [num_tokens] * 3 + [num_prefill + 1, num_logits_rows, num_decode, num_decode * width,
                                    num_context_seqs, num_context_seqs * prefill_width]
        data = self._to_device(packed[PACK_HEADER:])
        (input_ids, positions, slots, cu_seqlens, logits_rows, context_lens, tables, prefill_context_lens,
         prefill_tables) = unpack(data, sizes)
        if previous_rows and self.world_size > 1 and not self.previous_tokens_on_every_rank:
            if self.rank > 0:  # rank 0 sampled them
                self.previous_tokens = torch.empty(previous_rows, dtype=torch.long, device=self.device)
            dist.broadcast(self.previous_tokens, src=0)
        previous = self.previous_tokens if previous_rows else None
        graphs = self.decode_graphs
        if not num_prefill and graphs and graphs.can_run(num_tokens):
            logits, tokens = graphs.run(input_ids, positions, slots, context_lens, tables.view(num_decode, width),
                                        previous)
        else:
            if previous is not None:  # inputs sampled by the previous step and never read back
                input_ids = torch.where(input_ids < 0, previous[(-1 - input_ids).clamp(min=0)], input_ids)
            meta = AttentionMetadata(slot_mapping=slots)
            if num_prefill:
                meta.num_prefill_tokens = num_tokens - num_decode
                meta.cu_seqlens, meta.max_prefill_len = cu_seqlens.to(torch.int32), max_prefill_len
            if prefill_width:
                meta.context_slots, meta.cu_context_lens = self._context_slots(
                    prefill_context_lens, prefill_tables.view(num_prefill, prefill_width), num_context_tokens)
                meta.max_context_len = max_context_len
            if num_decode:
                meta.block_tables, meta.context_lens = tables.view(num_decode, width), context_lens
            hidden = self.model(input_ids, positions, meta)
            if not num_logits_rows:  # only chunks before their prompt's last: the step computes KV, no logits
                tokens = torch.empty(0, dtype=torch.long, device=self.device)
                self.previous_tokens_on_every_rank, self.previous_tokens = True, tokens
                return tokens if greedy else hidden.new_empty(0, self.hf_config.vocab_size)
            logits = self.model.lm_head(hidden[logits_rows])
            tokens = self.model.lm_head.argmax(logits) if greedy else None
        self.previous_tokens_on_every_rank = bool(greedy)
        if greedy:
            self.previous_tokens = tokens
            return tokens
        return self.model.lm_head.gather(logits)

    def _context_slots(self, context_lens: torch.Tensor, block_tables: torch.Tensor, num_context_tokens: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cache slots of every prefilled sequence's context, back to back, and their int32 offsets [0, c0,
        c0+c1, ...]: where attention reads the K/V of a prefill that does not start at position 0. Computed on the
        device, once per step (a context can be tens of thousands of tokens)."""
        cu_context_lens = torch.zeros(len(context_lens) + 1, dtype=torch.long, device=context_lens.device)
        torch.cumsum(context_lens, 0, out=cu_context_lens[1:])
        rows = torch.arange(len(context_lens), device=context_lens.device)
        owner = torch.repeat_interleave(rows, context_lens, output_size=num_context_tokens)
        position = torch.arange(num_context_tokens, device=context_lens.device) - cu_context_lens[owner]
        block_size = self.config.block_size
        slots = block_tables[owner, position // block_size] * block_size + position % block_size
        return slots, cu_context_lens.to(torch.int32)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """KV blocks copied (source, destination) in every layer: a forked sequence's own copy of a shared prompt's
        last, partial block. Queued on the stream after the prefill that wrote them."""
        if self.kv_cache is not None:
            src, dst = torch.tensor(pairs, device=self.device).T
            self.kv_cache[:, :, dst] = self.kv_cache[:, :, src]

    def _to_device(self, data: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return data
        self._staging.reverse()
        if self._staging[0].numel() < data.numel():
            self._staging[0] = torch.empty(2 * data.numel(), dtype=torch.long, pin_memory=True)
        staged = self._staging[0][: data.numel()]
        staged.copy_(data)
        return staged.to(self.device, non_blocking=True)
