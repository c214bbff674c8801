"""FP8 (float8_e4m3fn) W8A8 linear layers: the quantization math, the checkpoint formats and the dispatch.

Weights carry one float32 scale per output channel (w ~ w_fp8 * scale[n]); activations are quantized per token
(row), dynamically, at each call: per-channel weight scales put _scaled_mm in its row-wise mode, which takes
row-wise activation scales too, and a token's scale needs one pass over its row where a tensor's needs a
reduction over all rows first. A per-tensor scale from a checkpoint is stored as that scale repeated over the
tensor's rows, which dequantizes to the same values, so q, k and v (or gate and up) with their own per-tensor
scales share one fused per-channel layout. Under tensor parallelism a column-parallel layer's scales are split
with its rows; a row-parallel layer's are whole on every rank (its output dim is not split), computed over the
whole row when quantizing at load.

Where each call goes (fp8_linear):
  - CUDA, one row (batch-1 decode): gemv.py's weight-streaming kernel reads the fp8 weight and applies the
    scale in registers; the activation stays bf16 (row-wise-scaled cuBLASLt products at M=1 were slower than
    bf16 for qkv, o and down on an H200: issue #17).
  - CUDA, more rows: per-token quantization (fp8_kernels.py), then torch._scaled_mm (cuBLASLt) with row-wise
    scales on both sides, float32 accumulation.
  - CPU (and shapes _scaled_mm refuses): the reference, the same numerics in the compute dtype: the weight
    dequantized, the activation quantized and dequantized (fake-quantized), then F.linear.

The embedding and lm_head stay in the model dtype: the logits are the most sensitive product, SmolLM2 ties lm_head
to the embedding, and public FP8 checkpoints leave lm_head unquantized (compressed-tensors `ignore`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import QUANTIZATIONS

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
MIN_SCALE = 1e-12  # an all-zero row (padding) gets this scale, not 0
SAFETENSORS_FP8 = "F8_E4M3"
FP8_STRATEGIES = {"weights": ("channel", "tensor"), "input_activations": ("token", "tensor")}


# --- the math ---------------------------------------------------------------------------------------------------
def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row FP8: (x_fp8, scale) with x ~ x_fp8 * scale[..., None]; scale is float32, one per row."""
    scale = (x.abs().amax(dim=-1).float() / FP8_MAX).clamp(min=MIN_SCALE)
    return (x.float() / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def dequantize_rows(x_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (x_fp8.float() * scale.unsqueeze(-1)).to(dtype)


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded to what per-token FP8 can represent, in x's dtype."""
    return dequantize_rows(*quantize_rows(x), x.dtype)


def scaled_mm(x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              out_dtype: torch.dtype) -> torch.Tensor:
    """x_fp8 [M, K] (scale [M]) @ weight [N, K].T (scale [N]) through torch._scaled_mm, row-wise scales on both
    sides (cuBLASLt on CUDA; torch also runs it on the CPU, where the tests compare it with the reference)."""
    return torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale.view(-1, 1), scale_b=weight_scale.view(1, -1),
                            out_dtype=out_dtype)


def scaled_mm_supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """cuBLASLt's row-wise-scaled FP8 products need K and N multiples of 16 and write bfloat16 only."""
    n, k = weight.shape
    return k % 16 == 0 and n % 16 == 0 and x.dtype == torch.bfloat16


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * weight_scale[:, None]).T + bias for an FP8 weight [N, K]; see the module doc for the paths."""
    if x.is_cuda:
        from . import gemv

        if gemv.supports(x, weight):
            return gemv.gemv(x, weight, bias, weight_scale=weight_scale)
        if scaled_mm_supports(x, weight):
            from .fp8_kernels import quantize_rows as quantize_rows_cuda

            rows = x.reshape(-1, x.shape[-1])
            out = scaled_mm(*quantize_rows_cuda(rows), weight, weight_scale, x.dtype)
            if bias is not None:
                out += bias
            return out.view(*x.shape[:-1], weight.shape[0])
    return F.linear(fake_quantize_rows(x), dequantize_rows(weight, weight_scale, x.dtype), bias)


# --- parameters and loading ---------------------------------------------------------------------------------------
def weight_dtype(quantization: str | None) -> torch.dtype | None:
    """A quantized layer's weight dtype; None: the default (model) dtype."""
    return FP8 if quantization == "fp8" else None


def weight_scale_param(rows: int, quantization: str | None, weight_loader) -> nn.Parameter | None:
    if quantization is None:
        return None
    param = nn.Parameter(torch.ones(rows, dtype=torch.float32), requires_grad=False)
    param.weight_loader = weight_loader
    return param


def load_weight_rows(weight: nn.Parameter, weight_scale: nn.Parameter, rows: slice, part: torch.Tensor,
                     columns: slice = slice(None)) -> None:
    """part: checkpoint rows for weight[rows] (whole rows: `columns` picks this rank's part of them). FP8 rows are
    copied as they are (their scale is the checkpoint's weight_scale); float rows are quantized here."""
    if part.dtype == FP8:
        weight.data[rows].copy_(part[:, columns])
    elif not part.is_floating_point() or part.dtype.itemsize == 1:
        raise ValueError(f"weight of dtype {part.dtype}: an FP8 layer loads float weights (quantized at load) or "
                         f"{FP8} ones with a weight_scale")
    else:
        quantized, scale = quantize_rows(part.to(weight.device))
        weight.data[rows].copy_(quantized[:, columns])
        weight_scale.data[rows].copy_(scale)


def load_scale_rows(weight_scale: nn.Parameter, rows: slice, loaded, start: int, size: int, full_rows: int) -> None:
    """A checkpoint's weight_scale for the tensor whose rows start:start+size land in weight_scale[rows]: one
    per tensor (shape [] or [1]) or one per output channel ([full_rows] or [full_rows, 1])."""
    shape = list(loaded.shape) if isinstance(loaded, torch.Tensor) else loaded.get_shape()
    if math.prod(shape) == 1:
        weight_scale.data[rows].fill_(float(loaded[...].reshape(())))
    elif shape in ([full_rows], [full_rows, 1]):
        weight_scale.data[rows].copy_(loaded[start: start + size].reshape(-1))
    else:
        raise ValueError(f"weight_scale of shape {shape}: expected one per tensor ([] or [1]) or one per output "
                         f"channel ([{full_rows}] or [{full_rows}, 1]); block-wise scales are not supported")


def scales_quantized_at_load(model: nn.Module, checkpoint_dtypes: dict[str, str]) -> set[str]:
    """The weight_scale parameters that loading computes from a float checkpoint weight (every other one must come
    from the checkpoint's own weight_scale)."""
    params = dict(model.named_parameters())
    scales = set()
    for name, dtype in checkpoint_dtypes.items():
        target = model.checkpoint_target(name)
        if target is not None and dtype != SAFETENSORS_FP8 and target[0] + "_scale" in params:
            scales.add(target[0] + "_scale")
    return scales


# --- the checkpoint's quantization_config -------------------------------------------------------------------------
def resolve(hf_config, requested: str | None) -> str | None:
    """The quantization the model is built with: fp8 if requested or if the checkpoint is a supported pre-quantized
    FP8 one (compressed-tensors); refuses what the engine does not support, naming the field."""
    if requested not in QUANTIZATIONS:
        raise ValueError(f"quantization={requested!r}: expected one of {QUANTIZATIONS}")
    config = getattr(hf_config, "quantization_config", None)
    if config is not None:
        check_compressed_tensors_fp8(config if isinstance(config, dict) else config.to_dict())
    quantization = "fp8" if config is not None else requested
    if quantization and (getattr(hf_config, "num_local_experts", 0) or getattr(hf_config, "num_experts", 0)):
        raise ValueError("quantization fp8 is not supported for mixture-of-experts models yet (num_local_experts / "
                         "num_experts in config.json)")
    return quantization


def check_compressed_tensors_fp8(config: dict) -> None:
    """Accept a compressed-tensors FP8 W8A8 (or W8A16) config: per-channel or per-tensor weight scales, activations
    per token or per tensor (a checkpoint's static input_scale is not used: activations are always quantized
    per token, dynamically). Anything else raises ValueError naming the field."""
    field = "config.json quantization_config"
    method = config.get("quant_method")
    if method != "compressed-tensors":
        raise ValueError(f"{field}.quant_method={method!r} is not supported (supported: 'compressed-tensors' FP8)")
    if config.get("kv_cache_scheme") is not None:
        raise ValueError(f"{field}.kv_cache_scheme={config['kv_cache_scheme']!r}: KV-cache scales are not supported")
    ignore = config.get("ignore") or []
    if "lm_head" not in ignore:
        raise ValueError(f"{field}.ignore={ignore!r} must list 'lm_head': the engine keeps lm_head unquantized")
    groups = config.get("config_groups") or {}
    if not groups:
        raise ValueError(f"{field}.config_groups is empty")
    for name, group in groups.items():
        where = f"{field}.config_groups.{name}"
        fmt = group.get("format") or config.get("format")
        if fmt != "float-quantized":
            raise ValueError(f"{where}.format={fmt!r} is not supported (supported: 'float-quantized', FP8)")
        if group.get("output_activations") is not None:
            raise ValueError(f"{where}.output_activations: output quantization is not supported")
        for kind in ("weights", "input_activations"):
            scheme = group.get(kind)
            if scheme is None and kind == "input_activations":
                continue  # weight-only FP8: activations are quantized at run time all the same
            if scheme is None:
                raise ValueError(f"{where}.weights is missing")
            if (scheme.get("type"), scheme.get("num_bits")) != ("float", 8):
                raise ValueError(f"{where}.{kind}: type={scheme.get('type')!r} num_bits={scheme.get('num_bits')!r} "
                                 "is not supported (supported: float, 8 bits: FP8 e4m3)")
            if not scheme.get("symmetric", True):
                raise ValueError(f"{where}.{kind}.symmetric=False is not supported")
            if scheme.get("strategy") not in FP8_STRATEGIES[kind]:
                raise ValueError(f"{where}.{kind}.strategy={scheme.get('strategy')!r} is not supported (supported: "
                                 f"{FP8_STRATEGIES[kind]}; block-wise and group-wise scales are not)")
