"""Mixture-of-experts layer (Mixtral, Qwen3-MoE): the router's top-k choice and the experts' SwiGLU MLPs.

Every expert's gate/up (column-parallel) and down (row-parallel) matrices are stacked into one parameter per layer:
gate_up_proj [experts, 2 * intermediate / tp, hidden] (each expert's gate rows, then its up rows: this rank's slice
of each) and down_proj [experts, hidden, intermediate / tp]. Each rank computes its partial sum of every token's
experts and the next norm all-reduces it, as after the dense MLP (RowParallelLinear with reduce_results=False).

Checkpoints hold one tensor per expert (Mixtral's experts.{e}.w1/w3/w2, Qwen3-MoE's experts.{e}.gate_proj/up_proj/
down_proj): each loads into its expert's rows with shard id (expert, part), as PACKED_WEIGHTS load into fused
layers. transformers' own stacked tensors (experts.gate_up_proj [experts, 2 * intermediate, hidden],
experts.down_proj [experts, hidden, intermediate]: what a trainer's state dict names) load whole, shard id None.

On CUDA the experts run as fused_moe.py's Triton kernels; the torch path here is the reference and the CPU's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import read_part, tp_rank, tp_size


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool, weights_in_model_dtype: bool):
    """(weights [tokens, top_k] , expert ids [tokens, top_k]): softmax over the experts in float32, the top k,
    renormalised to sum to 1 if asked (Mixtral always, Qwen3-MoE with norm_topk_prob), as transformers' routers.
    Qwen3-MoE rounds the weights to the model dtype; Mixtral keeps them in float32."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if weights_in_model_dtype:
        weights = weights.to(router_logits.dtype).float()
    return weights, ids


def fused_experts_torch(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                        ids: torch.Tensor) -> torch.Tensor:
    """sum over each token's k experts of weight * down(silu(gate(x)) * up(x)): one pass per expert hit, its tokens
    in transformers' order (by slot, then token), so the CPU's sums match transformers'."""
    out = torch.zeros_like(x)
    for expert in ids.unique().tolist():
        slot, token = torch.where(ids.T == expert)
        gate, up = F.linear(x[token], gate_up[expert]).chunk(2, dim=-1)
        h = F.linear(F.silu(gate) * up, down[expert])
        out.index_add_(0, token, (h * weights[token, slot, None]).to(x.dtype))
    return out


class FusedMoE(nn.Module):
    """The experts of one MoE layer; forward(x, router_logits) returns this rank's partial sum (see the module
    docstring)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, top_k: int, renormalize: bool,
                 weights_in_model_dtype: bool):
        super().__init__()
        tp = tp_size()
        assert intermediate_size % tp == 0, f"expert intermediate size {intermediate_size} not divisible by tp {tp}"
        assert top_k <= num_experts, f"{top_k} experts per token of {num_experts}"
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.weights_in_model_dtype = renormalize, weights_in_model_dtype
        self.size = intermediate_size // tp  # this rank's rows of each expert's gate and up, columns of its down
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.size, hidden_size), requires_grad=False)
        self.gate_up_proj.weight_loader = self.gate_up_loader
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, self.size), requires_grad=False)
        self.down_proj.weight_loader = self.down_loader

    def gate_up_loader(self, param: nn.Parameter, loaded, shard_id) -> None:
        """shard_id (expert, 0 for gate or 1 for up): one expert's [intermediate, hidden]; None: all experts'
        [experts, 2 * intermediate, hidden]."""
        size, start = self.size, tp_rank() * self.size
        if shard_id is None:
            for part in (0, 1):
                param.data[:, part * size:(part + 1) * size].copy_(
                    read_part(loaded, 1, part * size * tp_size() + start, size))
        else:
            expert, part = shard_id
            param.data[expert, part * size:(part + 1) * size].copy_(read_part(loaded, 0, start, size))

    def down_loader(self, param: nn.Parameter, loaded, shard_id) -> None:
        """shard_id (expert, None): one expert's [hidden, intermediate]; None: all experts' stacked."""
        start = tp_rank() * self.size
        if shard_id is None:
            param.data.copy_(read_part(loaded, 2, start, self.size))
        else:
            param.data[shard_id[0]].copy_(read_part(loaded, 1, start, self.size))

    def forward(self, x: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # routing and experts in Triton launches, graph-capturable (fused_moe.py)
            from .fused_moe import fused_moe

            return fused_moe(x, self.gate_up_proj, self.down_proj, router_logits, self.top_k, self.renormalize,
                             self.weights_in_model_dtype)
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize, self.weights_in_model_dtype)
        return fused_experts_torch(x, self.gate_up_proj, self.down_proj, weights, ids)
