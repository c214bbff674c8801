"""Engine configuration (contracts.md section 1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
QUANTIZATIONS = (None, "fp8")  # fp8: quant.py
KV_CACHE_DTYPES = ("auto",)  # fp8: issue #17, under way


@dataclass
class EngineConfig:
    model: str  # local path, file:///path, hf://org/name or builtin://smollm2-135m-instruct; may hold "{revision}"
    revision: str | None = None
    tokenizer: str | None = None  # default: the model folder
    dtype: str = "auto"  # auto -> bfloat16 on cuda, float32 on cpu
    device: str = "auto"  # auto | cuda | cpu
    max_model_len: int | None = None  # default: max_position_embeddings, capped by the KV pool
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    kv_cache_memory_fraction: float = 0.9  # of free GPU memory; on CPU of CPU_KV_CACHE_BUDGET_BYTES
    num_kv_blocks: int | None = None  # explicit pool size; overrides the memory fraction
    block_size: int = 16
    enforce_eager: bool = False  # no CUDA graphs
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    seed: int = 0
    # auto: the checkpoint's weights; dummy: random ones (benchmarks at real shapes without a checkpoint on disk:
    # only config.json and the tokenizer are read)
    load_format: str = "auto"
    # Full KV blocks content-addressed and reused by later requests with the same prefix.
    enable_prefix_caching: bool = True
    # None: the checkpoint's dtype (bf16); fp8: e4m3 weights (quantized at load, or a pre-quantized checkpoint)
    quantization: str | None = None
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8: e4m3 KV cache

    def __post_init__(self):
        if self.pipeline_parallel_size != 1:
            raise ValueError(
                f"pipeline_parallel_size={self.pipeline_parallel_size}: the runtime supports only 1 for now"
            )
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected auto or one of {sorted(DTYPES)}")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format={self.load_format!r}: expected auto or dummy")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization={self.quantization!r}: expected one of {QUANTIZATIONS}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r}: expected one of {KV_CACHE_DTYPES}")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ValueError(f"device={self.device!r}: expected auto, cuda or cpu")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "tensor_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("max_model_len", "num_kv_blocks"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError(f"kv_cache_memory_fraction={self.kv_cache_memory_fraction}: must be in (0, 1]")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.torch_device().type == "cuda" else torch.float32
        return DTYPES[self.dtype]
