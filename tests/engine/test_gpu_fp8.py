"""FP8 on a GPU (marked gpu: skipped without one): the FP8 GEMV and the per-token quantization kernel against torch,
the _scaled_mm path against the reference numerics, and SmolLM2 end to end (through the decode CUDA graphs)."""
import pytest
import torch

from rayprism.engine import EngineConfig, LLMEngine, SamplingParams, quant
from rayprism.engine.model_runner import ModelRunner

from .helpers import generate, prefill_logits
from .test_fp8 import MAX_KL, MAX_MEAN_KL, write_compressed_tensors
from .test_smollm2 import PROMPTS

pytestmark = pytest.mark.gpu
# Llama-3.1-8B's linear layers at tensor parallel 1 (qkv, o, gate_up, down) and partial tiles
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (13, 1500)]


@pytest.mark.parametrize("n,k", SHAPES)
def test_fp8_gemv_matches_dequantized_product(n, k):
    """bf16 row x FP8 weight with per-channel scales against the float32 product with the dequantized weight: one
    bf16 rounding of the output apart at most; also through the layers' dispatch (a 3-D row), with a bias."""
    from rayprism.engine import gemv
    from rayprism.engine.layers import linear

    torch.manual_seed(0)
    weight_fp8, scale = quant.quantize_rows(torch.randn(n, k, device="cuda") / k ** 0.5)
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    expected = x.float() @ quant.dequantize_rows(weight_fp8, scale, torch.float32).T
    torch.testing.assert_close(gemv.gemv(x, weight_fp8, weight_scale=scale), expected.bfloat16(), rtol=8e-3,
                               atol=1e-2)
    torch.testing.assert_close(linear(x.view(1, 1, k), weight_fp8, bias, weight_scale=scale),
                               (expected + bias.float()).bfloat16().view(1, 1, n), rtol=8e-3, atol=1e-2)


@pytest.mark.parametrize("rows,k", [(1, 4096), (7, 14336), (300, 4096), (3, 13)])
def test_quantize_rows_kernel_bit_exact(rows, k):
    """fp8_kernels.quantize_rows gives quant.quantize_rows' bits (rows strided, as split from a fused output)."""
    from rayprism.engine import fp8_kernels

    torch.manual_seed(1)
    x = (torch.randn(rows, k + 8, device="cuda") * 4).bfloat16()[:, :k]
    x[0, 0] = 0.0
    q, scale = fp8_kernels.quantize_rows(x)
    expected_q, expected_scale = quant.quantize_rows(x)
    assert torch.equal(scale, expected_scale)
    assert torch.equal(q.view(torch.uint8), expected_q.view(torch.uint8))


@pytest.mark.parametrize("rows", [2, 64, 1000])
@pytest.mark.parametrize("n,k", SHAPES[:2] + SHAPES[3:4])
def test_scaled_mm_path_matches_reference(rows, n, k):
    """More than one row: per-token quantization + torch._scaled_mm against the CPU path's numerics (dequantized
    weight, fake-quantized activations) in float32: a bf16 rounding apart, plus cuBLASLt's order of summation."""
    torch.manual_seed(2)
    weight_fp8, scale = quant.quantize_rows(torch.randn(n, k, device="cuda") / k ** 0.5)
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    got = quant.fp8_linear(x, weight_fp8, scale, bias)
    expected = torch.nn.functional.linear(quant.fake_quantize_rows(x.float()),
                                          quant.dequantize_rows(weight_fp8, scale, torch.float32), bias.float())
    assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
    torch.testing.assert_close(got.float(), expected, rtol=1e-2, atol=2e-2)


def kl(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.kl_div(other.log_softmax(-1), reference.log_softmax(-1), log_target=True,
                                      reduction="none").sum(-1)


def test_smollm2_fp8_close_to_bf16_through_decode_graphs(smollm2_dir):
    """bf16 engine against the same with FP8 weights: last-token logits within the CPU test's KL bounds; greedy
    generation through the decode graphs (batch 1: the FP8 GEMV; several rows: _scaled_mm) agrees with eager for
    the first tokens (padded graph batches may sum in another order)."""
    config = dict(model=smollm2_dir, device="cuda", dtype="bfloat16", num_kv_blocks=256)
    bf16 = LLMEngine(EngineConfig(**config))
    fp8 = LLMEngine(EngineConfig(**config, quantization="fp8"))
    assert fp8.runner.decode_graphs is not None
    kls = []
    for prompt in PROMPTS:
        ids = fp8.tokenizer(prompt).input_ids
        kls.append(kl(prefill_logits(bf16, ids)[0], prefill_logits(fp8, ids)[0]).item())
    assert max(kls) <= MAX_KL and sum(kls) / len(kls) <= MAX_MEAN_KL, kls
    params = SamplingParams(max_tokens=32, temperature=0)
    graphs = generate(fp8, PROMPTS, params)
    bs1 = generate(fp8, PROMPTS[:1], params)  # batch 1 alone: the GEMV
    eager = generate(LLMEngine(EngineConfig(**config, quantization="fp8", enforce_eager=True)), PROMPTS, params)
    for i in range(len(PROMPTS)):
        assert graphs[str(i)]["token_ids"][:8] == eager[str(i)]["token_ids"][:8], PROMPTS[i]
    assert bs1["0"]["token_ids"][:8] == eager["0"]["token_ids"][:8]


def test_compressed_tensors_checkpoint_loads_the_same_weights_on_gpu(smollm2_dir, tmp_path):
    """A compressed-tensors checkpoint (quantized on the CPU) against quantizing the same weights at load on the
    GPU: every FP8 weight and scale bit for bit."""
    folder = write_compressed_tensors(smollm2_dir, tmp_path / "fp8")
    loaded = ModelRunner(EngineConfig(model=folder, device="cuda", dtype="bfloat16", num_kv_blocks=8))
    quantized = ModelRunner(EngineConfig(model=smollm2_dir, device="cuda", dtype="bfloat16", num_kv_blocks=8,
                                         quantization="fp8"))
    expected = dict(quantized.model.named_parameters())
    compared = 0
    for name, param in loaded.model.named_parameters():
        if param.dtype == quant.FP8:
            scale = name + "_scale"
            assert torch.equal(param.view(torch.uint8), expected[name].view(torch.uint8)), name
            assert torch.equal(loaded.model.get_parameter(scale), expected[scale]), scale
            compared += 1
    assert compared == 4 * loaded.hf_config.num_hidden_layers  # qkv, o, gate_up and down in every layer
