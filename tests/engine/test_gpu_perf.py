"""CUDA fast paths (marked gpu: skipped without a GPU): the Triton paged-KV kernels against a float64
reference, and decode through CUDA graphs against eager decode and against transformers."""
import pytest
import torch

from rayprism.engine import EngineConfig, LLMEngine, SamplingParams

from .helpers import generate, reference_decode

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

PROMPTS = [[5, 17, 99, 3], list(range(40, 90)), [7] * 19]  # 3 sequences: a padded graph batch of 4
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("splits", [None, 1, 4, 16])  # None: num_splits() picks (16 here: 6 x kv_heads programs)
@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim", [
    (torch.bfloat16, 32, 8, 128), (torch.float32, 8, 2, 64), (torch.bfloat16, 4, 4, 64)])
def test_paged_decode_matches_reference(dtype, heads, kv_heads, head_dim, splits):
    """Contexts of 1 token, exactly one block, one past it, and long ones; with 16 splits most programs of the
    short contexts get no tile."""
    from rayprism.engine.paged_attention import paged_decode_attention

    torch.manual_seed(0)
    num_blocks, block_size = 300, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    context_lens = torch.tensor([1, 16, 17, 300, 1000, 63], device="cuda")
    block_tables = torch.full((6, 70), -1, dtype=torch.long, device="cuda")
    free = torch.randperm(num_blocks).tolist()
    for i, length in enumerate(context_lens.tolist()):
        n = -(-length // block_size)
        block_tables[i, :n] = torch.tensor(free[:n])
        free = free[n:]
    q = torch.randn(6, heads, head_dim, dtype=dtype, device="cuda")
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, head_dim ** -0.5, splits)
    expected = reference_decode(q, k_cache, v_cache, block_tables, context_lens, head_dim ** -0.5)
    error = (out.double() - expected).norm() / expected.norm()
    assert error < (1e-5 if dtype == torch.float32 else 1e-2), error


@pytest.mark.parametrize("dtype,heads,kv_heads,head_dim", [
    (torch.bfloat16, 32, 8, 128), (torch.float32, 9, 3, 64), (torch.bfloat16, 6, 2, 48)])
def test_rotary_store_kv_matches_eager_and_skips_padding(dtype, heads, kv_heads, head_dim):
    """Bit for bit the eager rotary (transformers' roundings) and the cache write; slot -1 writes nothing; an
    empty cache (no KV pool) only rotates. head_dim 48 is not a power of two (masked lanes)."""
    from rayprism.engine.layers import rotate_half
    from rayprism.engine.paged_attention import rotary_store_kv

    torch.manual_seed(0)
    tokens = 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device="cuda")
    q, k, v = (part.view(tokens, -1, head_dim)  # strided rows, as split from the fused projection
               for part in qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
    cos, sin = torch.randn(300, head_dim, device="cuda"), torch.randn(300, head_dim, device="cuda")
    positions = torch.tensor([0, 7, 299, 3, 100], device="cuda")
    k_cache = torch.randn(8, 16, kv_heads, head_dim, dtype=dtype, device="cuda")
    v_cache = torch.randn_like(k_cache)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([5, -1, 100, 127, 64], device="cuda")
    q_rot, k_rot = rotary_store_kv(positions, q, k, v, cos, sin, k_cache, v_cache, slots)
    c, s = cos[positions].to(dtype).unsqueeze(1), sin[positions].to(dtype).unsqueeze(1)
    # Bit for bit where it matters: bf16 with a power-of-two head_dim (every supported model's). In float32 the
    # compiler may fuse a multiply-add (one rounding fewer). With the masked lanes of head_dim 48 a quarter of the
    # bf16 elements came out one rounding of a product away (up to 0.031 where the two products cancel; 2 x H200,
    # 2026-11-27): held to one bf16 step of a product plus one of the sum, 2^-6 (|x cos| + |rotate_half(x) sin|).
    for got, x in ((q_rot, q), (k_rot, k)):
        expected = x * c + rotate_half(x) * s
        if dtype == torch.bfloat16 and head_dim & (head_dim - 1) == 0:
            assert torch.equal(got, expected), f"{(got != expected).sum().item()} of {got.numel()} differ"
        else:
            scale = (x.float() * c.float()).abs() + (rotate_half(x).float() * s.float()).abs()
            bound = (2 ** -6 if dtype == torch.bfloat16 else 1e-6) * scale + 1e-6
            error = (got.float() - expected.float()).abs()
            assert torch.all(error <= bound), error.max()
    flat_k, flat_v = k_cache.view(128, kv_heads, head_dim), v_cache.view(128, kv_heads, head_dim)
    written = {5: 0, 100: 2, 127: 3, 64: 4}
    for slot, row in written.items():
        assert torch.equal(flat_k[slot], k_rot[row]) and torch.equal(flat_v[slot], v[row])
    untouched = [slot for slot in range(128) if slot not in written]
    assert torch.equal(flat_k[untouched], before_k.view(128, kv_heads, head_dim)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(128, kv_heads, head_dim)[untouched])
    empty = torch.empty(0, dtype=dtype, device="cuda")
    q_only, k_only = rotary_store_kv(positions, q, k, v, cos, sin, empty, empty, slots)
    assert torch.equal(q_only, q_rot) and torch.equal(k_only, k_rot)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Random Llama with head_dim 64 and GQA, plus a word-level tokenizer over its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = str(tmp_path_factory.mktemp("gpu-llama"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.1, bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer = Tokenizer(models.WordLevel({f"<t{i}>": i for i in range(1024)}, unk_token="<t0>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<t0>", eos_token="<t1>").save_pretrained(folder)
    return folder


def engine(folder, dtype, enforce_eager):
    return LLMEngine(EngineConfig(model=folder, device="cuda", dtype=dtype, num_kv_blocks=128, max_num_seqs=8,
                                  enforce_eager=enforce_eager))


def test_graph_decode_matches_eager_float32(llama_dir):
    graphs = engine(llama_dir, "float32", enforce_eager=False)
    assert graphs.runner.decode_graphs is not None and graphs.runner.decode_graphs.batch_sizes == [1, 2, 4, 8]
    eager = engine(llama_dir, "float32", enforce_eager=True)
    assert eager.runner.decode_graphs is None
    expected = generate(eager, PROMPTS, GREEDY)
    assert generate(graphs, PROMPTS, GREEDY) == expected
    assert generate(graphs, PROMPTS, GREEDY, staggered=True) == expected  # mixed prefill + decode steps
    # A sampled request between greedy ones: the graphs' logits are gathered and sampled, then greedy again.
    sampled = SamplingParams(max_tokens=4, temperature=0.8, seed=3, ignore_eos=True)
    between = generate(graphs, PROMPTS[:3], [GREEDY, sampled, GREEDY], staggered=True)
    assert [between[r]["token_ids"] for r in ("0", "2")] == [expected[r]["token_ids"] for r in ("0", "2")]
    assert len(between["1"]["token_ids"]) == 4
    graphs.sleep()  # new weight and cache addresses: the graphs are captured again
    graphs.wake_up()
    assert generate(graphs, PROMPTS, GREEDY) == expected


@pytest.mark.parametrize("staggered", [False, True], ids=["together", "mixed-steps"])
def test_graph_decode_bf16_follows_transformers(llama_dir, staggered):
    """Each greedy token we pick is transformers' argmax on the same prefix, up to bf16 noise: a near-tie
    may go either way (the tolerance of test_gpu.py), anything else fails. Staggered arrivals run mixed
    steps: flash prefill and paged decode in one forward."""
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).cuda()
    ours = generate(engine(llama_dir, "bfloat16", enforce_eager=False), PROMPTS, GREEDY, staggered)
    for i, prompt in enumerate(PROMPTS):
        tokens = ours[str(i)]["token_ids"]
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + tokens], device="cuda")).logits[0].float()
        steps = logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)]
        best = steps.max(dim=-1).values
        chosen = steps.gather(-1, torch.tensor(tokens, device="cuda")[:, None]).squeeze(-1)
        assert torch.all(best - chosen <= 0.3 + 0.02 * best.abs()), (i, (best - chosen).max())


def test_fused_ops_match_eager_ops():
    from rayprism.engine import fused_ops

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(7, 4096, dtype=dtype, device="cuda")
        residual = torch.randn(7, 4096, dtype=dtype, device="cuda")
        weight = torch.randn(4096, dtype=dtype, device="cuda")

        def norm(t):
            t32 = t.float()
            return weight * (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)

        torch.testing.assert_close(fused_ops.rms_norm(x, weight, 1e-5), norm(x))
        normed, summed = fused_ops.rms_norm(x, weight, 1e-5, residual)
        assert torch.equal(summed, x + residual)  # the residual stream itself is exact
        torch.testing.assert_close(normed, norm(x + residual))
        gate_up = torch.randn(7, 2 * 14336, dtype=dtype, device="cuda")
        gate, up = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(fused_ops.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up)


@pytest.mark.parametrize("n,k", [(3072, 4096), (4096, 2048), (13, 1500)])  # tp2 qkv, tp2 o_proj, partial blocks
def test_gemv_matches_cublas(n, k):
    """bf16 GEMV against cuBLAS (both accumulate in float32: only the order of the sum differs), with and without
    a bias; launched with programmatic dependent launch on Hopper, as in the model."""
    from rayprism.engine import gemv

    torch.manual_seed(0)
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5
    bias = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
    from rayprism.engine.layers import linear

    for got, expected in ((gemv.gemv(x, weight), torch.nn.functional.linear(x, weight)),
                          (gemv.gemv(x, weight, bias), torch.nn.functional.linear(x, weight, bias)),
                          (linear(x.view(1, 1, k), weight, bias),  # the layers' dispatch, a 3-D row
                           torch.nn.functional.linear(x, weight, bias).view(1, 1, n))):
        # one bf16 rounding of the output apart at most (outputs are ~N(0, 1))
        torch.testing.assert_close(got, expected, rtol=8e-3, atol=1e-2)


def test_gemv_reads_its_input_after_the_kernel_that_writes_it():
    """Under programmatic dependent launch the GEMV starts during the kernel before it and streams weights until
    gdc_wait: in a CUDA graph after the SiLU kernel that writes its input, it must read this replay's input, not
    what the buffer held before."""
    from rayprism.engine import fused_ops, gemv

    torch.manual_seed(0)
    k, n = 4096, 3072
    weight = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") / k ** 0.5
    gate_up = torch.zeros(1, 2 * k, dtype=torch.bfloat16, device="cuda")
    gemv.gemv(fused_ops.silu_and_mul(gate_up), weight)  # compiles both before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv.gemv(fused_ops.silu_and_mul(gate_up), weight)
    for _ in range(5):
        gate_up.copy_(torch.randn(1, 2 * k, dtype=torch.bfloat16, device="cuda"))
        graph.replay()
        expected = torch.nn.functional.linear(fused_ops.silu_and_mul(gate_up), weight)
        torch.testing.assert_close(out, expected, rtol=8e-3, atol=1e-2)


def test_varlen_prefill_matches_per_sequence_sdpa():
    from rayprism.engine.paged_attention import varlen_prefill_attention

    torch.manual_seed(0)
    cu_seqlens = [0, 1, 130, 200, 713]
    q = torch.randn(713, 32, 128, dtype=torch.bfloat16, device="cuda")
    qkv_k = torch.randn(713, 3, 8, 128, dtype=torch.bfloat16, device="cuda")  # k/v as strided views
    k, v = qkv_k[:, 0], qkv_k[:, 1]
    offsets = torch.tensor(cu_seqlens, dtype=torch.int32, device="cuda")
    out = varlen_prefill_attention(q, k, v, offsets, offsets, 513, 513, 128 ** -0.5)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs, ks, vs = (t[start:end].double().transpose(0, 1) for t in (q, k, v))
        ks, vs = ks.repeat_interleave(4, dim=0), vs.repeat_interleave(4, dim=0)
        expected = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=128 ** -0.5)
        got = out[start:end].double().transpose(0, 1)
        assert (got - expected).norm() / expected.norm() < 1e-2, (start, end)
