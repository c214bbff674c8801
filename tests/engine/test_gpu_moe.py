"""Qwen3 and the mixtures of experts on CUDA (marked gpu: skipped without a GPU): the Triton MoE kernels against
moe.py's torch path, captured in a CUDA graph, Qwen3's q/k norms fused into the rotary, and the tiny random models
through the decode graphs against eager decode and transformers."""
import pytest
import torch

from rayprism.engine import EngineConfig, LLMEngine, SamplingParams

from .helpers import generate, prefill_logits
from .test_tensor_parallel import PROBE_IDS, PROMPTS

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
# (experts, top k, hidden, expert intermediate): Mixtral's routing, Qwen3-MoE's, and odd sizes (masked edges)
SHAPES = [(8, 2, 512, 448), (128, 8, 256, 96), (6, 3, 200, 72)]


def random_experts(num_experts, hidden, inter, dtype, generator):
    gate_up = torch.randn(num_experts, 2 * inter, hidden, device="cuda", generator=generator) / hidden ** 0.5
    down = torch.randn(num_experts, hidden, inter, device="cuda", generator=generator) / inter ** 0.5
    router = torch.randn(num_experts, hidden, device="cuda", generator=generator) / hidden ** 0.5
    return gate_up.to(dtype), down.to(dtype), router.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=["mixtral", "qwen3-moe", "odd"])
def test_fused_moe_matches_torch_path(shape, dtype):
    """Routing and both expert paths (per-pair GEMVs; sorted grouped GEMMs) against the torch path, from one token
    to a prefill's worth."""
    from rayprism.engine import fused_moe, moe

    num_experts, top_k, hidden, inter = shape
    generator = torch.Generator(device="cuda").manual_seed(0)
    gate_up, down, router = random_experts(num_experts, hidden, inter, dtype, generator)
    round_weights = dtype == torch.bfloat16
    for tokens in (1, 3, 16, 257, 2048):
        x = torch.randn(tokens, hidden, device="cuda", generator=generator).to(dtype)
        logits = x @ router.T
        weights, ids = fused_moe.route(logits, top_k, True, round_weights)
        expected_weights, expected_ids = moe.select_experts(logits, top_k, True, round_weights)
        assert torch.equal(ids.long().sort(-1).values, expected_ids.sort(-1).values)
        torch.testing.assert_close(weights.sort(-1).values, expected_weights.sort(-1).values, rtol=1e-5, atol=1e-6)
        expected = moe.fused_experts_torch(x, gate_up, down, expected_weights, expected_ids).float()
        for gemv in (True, False) if tokens <= 16 else (False,):
            got = fused_moe.fused_experts(x, gate_up, down, expected_weights, expected_ids, gemv=gemv).float()
            error = (got - expected).norm() / expected.norm()
            assert error < (1e-5 if dtype == torch.float32 else 1e-2), (tokens, gemv, error.item())


@pytest.mark.parametrize("tokens", [1, 4, 64])  # the GEMV path, the sorted path with 16-row and 64-row runs
def test_fused_moe_replays_in_a_cuda_graph(tokens):
    """No host sync and no data-dependent shape: captured once, replayed with other inputs (other experts chosen),
    it gives what an eager call gives."""
    from rayprism.engine import fused_moe

    generator = torch.Generator(device="cuda").manual_seed(1)
    gate_up, down, router = random_experts(128, 256, 96, torch.bfloat16, generator)
    x = torch.randn(tokens, 256, device="cuda", generator=generator).bfloat16()

    def step():
        return fused_moe.fused_moe(x, gate_up, down, x @ router.T, 8, True, True)

    step()  # compiles the kernels
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for seed in (2, 3):
        x.copy_(torch.randn(tokens, 256, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)))
        graph.replay()
        assert torch.equal(out, step())


def test_rotary_with_qk_norm_matches_eager_bf16():
    """Qwen3's per-head norms fused into the rotary launch: bit for bit the eager RMSNorm then the eager rotary in
    bf16 (head_dim 128, as Qwen3's)."""
    from rayprism.engine.layers import RMSNorm, rotate_half
    from rayprism.engine.paged_attention import rotary_store_kv

    torch.manual_seed(0)
    tokens, heads, kv_heads, head_dim = 5, 32, 4, 128
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=torch.bfloat16, device="cuda") * 4
    q, k, v = (part.view(tokens, -1, head_dim)
               for part in qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
    with torch.device("cuda"):
        q_norm, k_norm = RMSNorm(head_dim, 1e-6).bfloat16(), RMSNorm(head_dim, 1e-6).bfloat16()
    q_norm.weight.data.uniform_(0.5, 1.5)
    k_norm.weight.data.uniform_(0.5, 1.5)
    cos, sin = torch.randn(300, head_dim, device="cuda"), torch.randn(300, head_dim, device="cuda")
    positions = torch.tensor([0, 7, 299, 3, 100], device="cuda")
    empty = torch.empty(0, dtype=torch.bfloat16, device="cuda")
    q_rot, k_rot = rotary_store_kv(positions, q, k, v, cos, sin, empty, empty, positions,
                                   (q_norm.weight, k_norm.weight, 1e-6))
    c, s = cos[positions].bfloat16().unsqueeze(1), sin[positions].bfloat16().unsqueeze(1)
    for got, x, norm in ((q_rot, q, q_norm), (k_rot, k, k_norm)):
        # the eager norm on the CPU path's arithmetic (the module's CUDA path is the fused kernel itself)
        x32 = x.float()
        normed = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16()
        expected = normed * c + rotate_half(normed) * s
        mismatched = (got != expected).sum().item()
        # the sum of squares is ordered differently: a rare rstd one float32 step away may flip a rounding
        assert mismatched <= got.numel() // 1000, f"{mismatched} of {got.numel()} differ"
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["qwen3", "mixtral", "qwen3_moe"])
def test_new_families_through_decode_graphs(name, tiny_qwen3_dir, tiny_mixtral_dir, tiny_qwen3_moe_dir):
    """float32 on CUDA: prefill logits equal to transformers', greedy tokens through the decode graphs (MoE in
    them: the GEMV path at batch 1, the sorted path above) equal to eager decode's and to transformers'."""
    from transformers import AutoModelForCausalLM

    folder = {"qwen3": tiny_qwen3_dir, "mixtral": tiny_mixtral_dir, "qwen3_moe": tiny_qwen3_moe_dir}[name]

    def engine(enforce_eager):
        return LLMEngine(EngineConfig(model=folder, device="cuda", dtype="float32", num_kv_blocks=64,
                                      max_num_seqs=8, enforce_eager=enforce_eager))

    graphs = engine(False)
    assert graphs.runner.decode_graphs is not None
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).cuda()
    with torch.no_grad():
        expected_logits = reference(torch.tensor([PROBE_IDS], device="cuda")).logits[0, -1].cpu()
    torch.testing.assert_close(prefill_logits(graphs, PROBE_IDS)[0], expected_logits, rtol=1e-3, atol=1e-3)
    ours = generate(graphs, PROMPTS, GREEDY)
    assert generate(graphs, PROMPTS, GREEDY, staggered=True) == ours
    assert generate(engine(True), PROMPTS, GREEDY) == ours
    for i, prompt in enumerate(PROMPTS):
        ids = graphs.tokenizer(prompt, return_tensors="pt").input_ids.cuda()
        expected = reference.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)
        assert ours[str(i)]["token_ids"] == expected[0, ids.shape[1]:].tolist(), prompt
