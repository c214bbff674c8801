"""One implementation of the Llama family: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
(per-head q/k norms) and the mixtures of experts MixtralForCausalLM and Qwen3MoeForCausalLM (moe.py)."""
from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from . import quant
from .attention import AttentionMetadata
from .layers import (
    Attention,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    ReplicatedLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    silu_and_mul,
)
from .moe import FusedMoE

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "MixtralForCausalLM", "Qwen3MoeForCausalLM")

# Hugging Face checkpoint name -> (our fused parameter, shard id)
PACKED_WEIGHTS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# One expert's checkpoint tensor (Mixtral's names, Qwen3-MoE's) -> (our stacked parameter, part): moe.FusedMoE
EXPERT_WEIGHTS = {
    "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", None),
}
EXPERT_TENSOR = re.compile(r"(.*\.experts)\.(\d+)\.(\w+)\.weight")


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def is_moe_layer(cfg, index: int) -> bool:
    """Mixtral: every layer; Qwen3-MoE: those its decoder_sparse_step and mlp_only_layers leave sparse."""
    if not (getattr(cfg, "num_local_experts", 0) or 0):
        return False
    return index not in (getattr(cfg, "mlp_only_layers", None) or []) and \
        (index + 1) % (getattr(cfg, "decoder_sparse_step", 1) or 1) == 0


class DecoderAttention(nn.Module):
    def __init__(self, cfg, rotary: RotaryEmbedding, quantization: str | None = None):
        super().__init__()
        head_dim = head_dim_of(cfg)
        qwen2 = cfg.model_type == "qwen2"  # Qwen2: bias on q/k/v only; Llama: attention_bias on all four
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, bias=qwen2 or attention_bias,
            quantization=quantization,
        )
        self.q_size = self.qkv_proj.num_heads * head_dim
        self.kv_size = self.qkv_proj.num_kv_heads * head_dim
        self.o_proj = RowParallelLinear(  # its all-reduce runs in the next norm (DecoderLayer)
            cfg.num_attention_heads * head_dim, cfg.hidden_size, bias=attention_bias and not qwen2,
            reduce_results=False, quantization=quantization,
        )
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim, rotary)
        self.q_norm = self.k_norm = None
        if cfg.model_type in ("qwen3", "qwen3_moe"):  # RMSNorm of each head of q and k, before the rotary
            self.q_norm = RMSNorm(head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(head_dim, cfg.rms_norm_eps)

    def forward(self, positions, hidden, meta: AttentionMetadata):
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        return self.o_proj(self.attn(positions, q, k, v, meta, self.q_norm, self.k_norm))


class MLP(nn.Module):
    def __init__(self, cfg, quantization: str | None = None):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (only silu)")
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2, bias=bias,
                                                       quantization=quantization)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=bias, reduce_results=False,
                                           quantization=quantization)

    def forward(self, x):
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class SparseMoeBlock(nn.Module):
    """Router and experts (moe.py); like MLP, returns this rank's partial sum for the next norm to all-reduce."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (only silu)")
        num_experts = cfg.num_local_experts
        self.gate = ReplicatedLinear(cfg.hidden_size, num_experts)
        self.experts = FusedMoE(
            num_experts, cfg.hidden_size, getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size,
            cfg.num_experts_per_tok, renormalize=bool(getattr(cfg, "norm_topk_prob", True)),
            weights_in_model_dtype=cfg.model_type != "mixtral")  # Mixtral keeps its routing weights in float32

    def forward(self, x):
        return self.experts(x, self.gate(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, rotary: RotaryEmbedding, index: int, quantization: str | None = None):
        super().__init__()
        self.self_attn = DecoderAttention(cfg, rotary, quantization)
        self.mlp = SparseMoeBlock(cfg) if is_moe_layer(cfg, index) else MLP(cfg, quantization)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions, hidden, residual, meta):
        """Returns (this layer's output, the residual stream before it): the next norm adds them, in the same
        launch on CUDA. The first layer gets residual None. Under tensor parallelism the attention's and the MLP's
        outputs are each rank's partial sums: the norm after each all-reduces them (RMSNorm.forward)."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg, max_positions: int, quantization: str | None = None):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        rotary = RotaryEmbedding(cfg, head_dim_of(cfg), max_positions)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, i, quantization) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, meta):
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        return self.norm(hidden, residual)[0]


class CausalLM(nn.Module):
    def __init__(self, cfg, max_positions: int, quantization: str | None = None):
        """quantization: None or "fp8" (quant.py); a pre-quantized FP8 checkpoint's config selects fp8 itself."""
        super().__init__()
        architecture = (getattr(cfg, "architectures", None) or ["LlamaForCausalLM"])[0]
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {architecture!r} is not supported (supported: {SUPPORTED_ARCHITECTURES})")
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        self.quantization = quant.resolve(cfg, quantization)
        self.model = DecoderModel(cfg, max_positions, self.quantization)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def checkpoint_target(self, name: str) -> tuple[str, object] | None:
        """(our parameter, shard id) that HF checkpoint tensor `name` loads into; None for tensors we skip."""
        if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
            return None
        if name.endswith(".input_scale"):  # FP8 checkpoints' static activation scales: we quantize per token
            return None
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's checkpoints name its MoE block so
        expert = EXPERT_TENSOR.fullmatch(name)
        if expert and expert.group(3) in EXPERT_WEIGHTS:
            ours, part = EXPERT_WEIGHTS[expert.group(3)]
            return f"{expert.group(1)}.{ours}", (int(expert.group(2)), part)
        for hf_part, (our_part, shard_id) in PACKED_WEIGHTS.items():
            if f".{hf_part}." in name:
                return name.replace(hf_part, our_part), shard_id
        return name, None

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Load HF-named full tensors or safetensors slices through each parameter's weight_loader."""
        params = dict(self.named_parameters())
        for name, loaded in weights:
            target = self.checkpoint_target(name)
            if target is None:
                continue
            if target[0] not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no matching parameter in the model")
            param = params[target[0]]
            param.weight_loader(param, loaded, target[1])
