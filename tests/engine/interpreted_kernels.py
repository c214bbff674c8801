"""Checks of the Triton kernels run on the CPU by Triton's interpreter; test_kernels_interpreted.py runs each in
a subprocess with TRITON_INTERPRET=1 (the interpreter is chosen when a kernel module is imported):

    TRITON_INTERPRET=1 python -m tests.engine.interpreted_kernels CHECK

float32 only: the interpreter rounds to bf16 by truncation, where the GPU rounds to nearest (the GPU tests check
bf16 bit for bit). References are the engine's own CPU paths or float64.
"""
from __future__ import annotations

import sys

import torch

from rayprism.engine import cuda_graphs, fused_moe, fused_ops, gemv, greedy, moe, paged_attention
from rayprism.engine.attention import store_kv
from rayprism.engine.layers import RMSNorm, rotate_half

from .helpers import reference_decode


def close(got: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-6) -> None:
    error = (got.double() - expected.double()).abs().max().item()
    assert torch.allclose(got.double(), expected.double(), rtol=rtol, atol=rtol), f"{what}: off by {error}"


def norm_and_silu() -> None:
    generator = torch.Generator().manual_seed(0)
    x, residual, weight = (torch.randn(shape, generator=generator) for shape in ((3, 96), (3, 96), (96,)))

    def reference(t):
        return weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5))

    close(fused_ops.rms_norm(x, weight, 1e-5), reference(x), "rms_norm")
    normed, summed = fused_ops.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(summed, x + residual), "the residual stream is exact"
    close(normed, reference(x + residual), "rms_norm with residual")
    gate_up = torch.randn(3, 2 * 80, generator=generator)  # 80: a partial block of the 1024-wide launch
    gate, up = gate_up.chunk(2, dim=-1)
    close(fused_ops.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, "silu_and_mul")


def rotary_and_cache_write() -> None:
    generator = torch.Generator().manual_seed(1)
    for heads, kv_heads, head_dim in ((9, 3, 64), (6, 2, 48)):  # 48: masked lanes (not a power of two)
        tokens = 4
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator)
        q, k, v = (part.view(tokens, -1, head_dim)  # strided rows, as split from the fused projection
                   for part in qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
        cos, sin = torch.randn(50, head_dim, generator=generator), torch.randn(50, head_dim, generator=generator)
        positions = torch.tensor([0, 3, 49, 7])
        k_cache = torch.randn(6, 4, kv_heads, head_dim, generator=generator)
        v_cache = torch.randn(6, 4, kv_heads, head_dim, generator=generator)
        slots = torch.tensor([5, -1, 20, 9])  # -1: a padding row, writes nothing
        expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        expected_q, expected_k = q * c + rotate_half(q) * s, k * c + rotate_half(k) * s
        keep = slots >= 0
        store_kv(expected_k[keep], v[keep], expected_k_cache, expected_v_cache, slots[keep])

        q_rot, k_rot = paged_attention.rotary_store_kv(positions, q, k, v, cos, sin, k_cache, v_cache, slots)
        close(q_rot, expected_q, f"rotary q, head_dim {head_dim}")
        close(k_rot, expected_k, f"rotary k, head_dim {head_dim}")
        written = k_cache.view(-1, kv_heads, head_dim)[slots[keep]]
        assert torch.equal(written, k_rot[keep]), "the cache holds the rotated k that was returned"
        close(k_cache, expected_k_cache, "k cache")
        assert torch.equal(v_cache, expected_v_cache), "v cache: its slots written, every other slot untouched"
        empty = torch.empty(0)
        q_only, k_only = paged_attention.rotary_store_kv(positions, q, k, v, cos, sin, empty, empty, slots)
        assert torch.equal(q_only, q_rot) and torch.equal(k_only, k_rot), "no KV pool: rotates only"


def rotary_with_qk_norm() -> None:
    """Qwen3's per-head q/k RMSNorms fused before the rotary: the eager norms, then the eager rotary."""
    generator = torch.Generator().manual_seed(7)
    for heads, kv_heads, head_dim in ((4, 2, 32), (3, 1, 48)):
        tokens = 3
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator) * 3
        q, k, v = (part.view(tokens, -1, head_dim)
                   for part in qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1))
        q_norm, k_norm = RMSNorm(head_dim, 1e-6), RMSNorm(head_dim, 1e-6)
        q_norm.weight.data, k_norm.weight.data = (torch.rand(head_dim, generator=generator) + 0.5 for _ in range(2))
        cos, sin = torch.randn(20, head_dim, generator=generator), torch.randn(20, head_dim, generator=generator)
        positions, slots = torch.tensor([0, 7, 19]), torch.tensor([2, -1, 5])
        k_cache, v_cache = torch.zeros(2, 4, kv_heads, head_dim), torch.zeros(2, 4, kv_heads, head_dim)
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        qn, kn = q_norm(q), k_norm(k)
        expected_q, expected_k = qn * c + rotate_half(qn) * s, kn * c + rotate_half(kn) * s
        q_rot, k_rot = paged_attention.rotary_store_kv(positions, q, k, v, cos, sin, k_cache, v_cache, slots,
                                                       (q_norm.weight, k_norm.weight, 1e-6))
        close(q_rot, expected_q, f"normed rotary q, head_dim {head_dim}", rtol=1e-5)
        close(k_rot, expected_k, f"normed rotary k, head_dim {head_dim}", rtol=1e-5)
        assert torch.equal(k_cache.view(-1, kv_heads, head_dim)[slots[[0, 2]]], k_rot[[0, 2]])


def moe_routing_and_experts() -> None:
    """fused_moe's routing (softmax, top k, renormalised or not, rounded or not) and both expert paths (per-pair
    GEMVs; pairs sorted by expert into grouped GEMMs) against moe.py's torch path."""
    generator = torch.Generator().manual_seed(8)
    logits = torch.randn(9, 6, generator=generator)
    logits[3, [1, 4]] = 5.0  # equal logits: the first expert wins, as torch.topk's order does not promise
    for renormalize in (True, False):
        weights, ids = fused_moe.route(logits, 3, renormalize, round_weights=False)
        expected_weights, expected_ids = moe.select_experts(logits, 3, renormalize, False)
        assert ids.tolist()[3][:2] == [1, 4], ids.tolist()[3]
        assert torch.equal(ids.long().sort(-1).values, expected_ids.sort(-1).values), (ids, expected_ids)
        close(weights.sort(-1).values, expected_weights.sort(-1).values, "routing weights", rtol=1e-6)
    for tokens, num_experts, top_k, hidden, inter in ((1, 8, 2, 64, 48), (5, 8, 2, 40, 24), (33, 6, 3, 32, 80)):
        x = torch.randn(tokens, hidden, generator=generator)
        gate_up = torch.randn(num_experts, 2 * inter, hidden, generator=generator) / hidden ** 0.5
        down = torch.randn(num_experts, hidden, inter, generator=generator) / inter ** 0.5
        weights, ids = moe.select_experts(torch.randn(tokens, num_experts, generator=generator), top_k, True, False)
        expected = moe.fused_experts_torch(x, gate_up, down, weights, ids)
        for gemv_path in (True, False) if tokens < 8 else (False,):  # (the interpreter runs many GEMV programs slowly)
            got = fused_moe.fused_experts(x, gate_up, down, weights, ids, gemv=gemv_path)
            close(got, expected, f"experts, {tokens} tokens, gemv {gemv_path}", rtol=1e-5)
    # the sort: every pair once, each expert's run in pair order, padded to BLOCK_M; 24 chunks: over 16 (a step)
    for num_experts, num_pairs in ((5, 300), (64, 3000)):
        ids = torch.randint(0, num_experts, (num_pairs,), generator=generator, dtype=torch.int32)
        ids[:200] = 2  # one expert's run across chunks
        ids[ids == 3] = 4  # an expert that no pair chose
        sorted_pairs, ends, counts = fused_moe.align(ids, num_experts, 16)
        assert counts.tolist() == torch.bincount(ids.long(), minlength=num_experts).tolist()
        assert ends.tolist() == (-(-counts // 16) * 16).cumsum(0).tolist()
        for expert in range(num_experts):
            start = ends[expert].item() - -(-counts[expert].item() // 16) * 16
            run = sorted_pairs[start: start + counts[expert].item()].tolist()
            assert run == (ids == expert).nonzero().flatten().tolist(), expert


def paged_decode_splits() -> None:
    generator = torch.Generator().manual_seed(2)
    heads, kv_heads, head_dim, block_size = 8, 2, 32, 16
    k_cache = torch.randn(40, block_size, kv_heads, head_dim, generator=generator)
    v_cache = torch.randn(40, block_size, kv_heads, head_dim, generator=generator)
    context_lens = torch.tensor([1, 16, 17, 150, 63])  # one token, one full block, one past it, several tiles
    block_tables = torch.full((5, 12), -1, dtype=torch.long)
    free = torch.randperm(40, generator=generator).tolist()
    for i, length in enumerate(context_lens.tolist()):
        n = -(-length // block_size)
        block_tables[i, :n] = torch.tensor(free[:n])
        free = free[n:]
    q = torch.randn(5, heads, head_dim, generator=generator)
    expected = reference_decode(q, k_cache, v_cache, block_tables, context_lens, head_dim ** -0.5)
    for splits in (1, 4, 16):  # 16: most programs of the short contexts get no tile
        out = paged_attention.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                     head_dim ** -0.5, splits)
        close(out, expected, f"paged decode, {splits} splits", rtol=1e-5)
    # How many splits a batch gets on a 132-SM H100/H200: enough programs for the SMs, at most 16.
    paged_attention._SM_COUNTS[0] = 132
    cuda0 = torch.device("cuda", 0)
    assert [paged_attention.num_splits(b, 8, cuda0) for b in (1, 2, 4, 8, 16, 64)] == [16, 8, 4, 2, 1, 1]


def gemv_and_bias() -> None:
    generator = torch.Generator().manual_seed(3)
    for n, k in ((24, 40), (16, 2048), (13, 1500), (5, 8)):  # partial blocks along n and k; k under one block
        weight, bias = torch.randn(n, k, generator=generator), torch.randn(n, generator=generator)
        x = torch.randn(1, k, generator=generator)
        close(gemv.gemv(x, weight), x.double() @ weight.double().T, f"gemv {k} @ {k}x{n}", rtol=1e-5)
        close(gemv.gemv(x, weight, bias), x.double() @ weight.double().T + bias.double(), "gemv + bias", 1e-5)
    try:
        gemv.gemv(torch.randn(2, 40), torch.randn(24, 40))
    except ValueError as err:
        assert "one contiguous row" in str(err)
    else:
        raise AssertionError("gemv took two rows")


def planted_logits(rows: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Random rows with equal maxima planted across chunk and rank boundaries: the first must win."""
    logits = torch.randn(rows, vocab, generator=generator)
    logits[0, [5, 3000, 4500]] = 9.0  # ties in two chunks of rank 0 and in rank 1's slice: index 5
    logits[1, [4500, 2500]] = 9.0  # a tie within rank 1 (slice from 2500): 2500
    logits[2, vocab - 1] = 9.0  # the last column of the last rank (next to its padding)
    logits[3] = float("-inf")  # all equal: index 0
    return logits


def greedy_argmax() -> None:
    """Two ranks' slices of a 4999-wide vocabulary (slices of 2500, the last padded with one zero column that
    must never win), each cut into chunks: selection equals torch.argmax of the whole rows, ties included."""
    generator = torch.Generator().manual_seed(4)
    vocab, world = 4999, 2
    per_rank = -(-vocab // world)
    logits = planted_logits(5, vocab, generator)
    logits[4] = -1.0  # every logit below the padding's zero
    padded = torch.cat([logits, torch.zeros(5, per_rank * world - vocab)], dim=1)
    candidates = sum(
        greedy.chunk_candidates(padded[:, rank * per_rank:(rank + 1) * per_rank].contiguous(),
                                min(per_rank, vocab - rank * per_rank), rank * per_rank, rank, world)
        for rank in range(world))
    assert candidates.shape == (world, 5, 2, 2)
    out = torch.full((5,), -7, dtype=torch.long)
    greedy.select(candidates, out)
    assert out.tolist() == logits.argmax(dim=-1).tolist() == [5, 2500, vocab - 1, 0, 0], out.tolist()


def stage_decode_inputs() -> None:
    """The decode graphs' one input launch: fields copied into the static buffers, pending inputs taken from the
    previous step's tokens, padding rows with slot -1 and context length 0."""
    n, size, width = 3, 8, 130  # block tables wider than one BLOCK of 128
    ids = torch.tensor([-2, 17, -1])  # rows 1 and 0 of the previous step
    positions, slots, context_lens = torch.tensor([4, 9, 2]), torch.tensor([40, 91, 22]), torch.tensor([5, 10, 3])
    tables = torch.arange(n * width).view(n, width)
    previous = torch.tensor([100, 200])
    static = dict(ids=torch.full((size,), 9), positions=torch.full((size,), 9), slots=torch.full((size,), 9),
                  context_lens=torch.full((size,), 9), tables=torch.full((size, 200), -5))
    for has_previous in (True, False):
        cuda_graphs._stage_inputs_kernel[(size,)](
            ids, positions, slots, context_lens, tables, previous if has_previous else ids, static["ids"],
            static["positions"], static["slots"], static["context_lens"], static["tables"], n, width, 200,
            HAS_PREVIOUS=has_previous, BLOCK=128)
        expected_ids = [200, 17, 100] if has_previous else [-2, 17, -1]
        assert static["ids"].tolist() == expected_ids + [0] * 5, static["ids"].tolist()
        assert static["positions"].tolist() == [4, 9, 2] + [0] * 5
        assert static["slots"].tolist() == [40, 91, 22] + [-1] * 5
        assert static["context_lens"].tolist() == [5, 10, 3] + [0] * 5
        assert torch.equal(static["tables"][:n, :width], tables) and (static["tables"][:, width:] == -5).all()




def lines_all_reduce_norm() -> None:
    """The fused all-reduce + norm's line protocol, as rank 0 of 2 (the interpreter runs one process): rank 1's
    rows already sit in rank 0's buffer as flagged lines; rank 0's call must sum them with its own, reset them,
    send its own rows into rank 1's buffer with this call's flag and advance its counters. Values are small
    integers, so bf16 sums are exact whatever the rounding."""
    world, rows, n, programs, slot_words = 2, 3, 64, 2, 1024
    generator = torch.Generator().manual_seed(5)
    for dtype, calls in ((torch.float32, 6), (torch.bfloat16, 2**31 - 1)):  # the second: the counter wraps
        x = [torch.randint(-8, 8, (rows, n), generator=generator).to(dtype) for _ in range(world)]
        residual = torch.randint(-8, 8, (rows, n), generator=generator).to(dtype)
        weight = torch.rand(n, generator=generator).to(dtype)
        buffers = [torch.zeros(2 * world * slot_words, dtype=torch.int64) for _ in range(world)]
        epoch = (2 * calls + 1) & 0xFFFFFFFF
        half = (calls & 1) * world * slot_words

        def lines(t):  # 4 data bytes, then the flag: one int64 each
            data = t.contiguous().view(torch.int32).reshape(-1).to(torch.int64) & 0xFFFFFFFF
            return data | (epoch << 32)

        peer_lines = lines(x[1])
        buffers[0][half + slot_words: half + slot_words + peer_lines.numel()] = peer_lines
        counters = torch.full((programs,), calls, dtype=torch.int32)
        normed, summed = fused_ops.all_reduce_rms_norm(
            x[0], residual, weight, 1e-5, (torch.tensor([b.data_ptr() for b in buffers]), counters, slot_words, 0,
                                           world))
        expected_summed = (x[0].double() + x[1].double() + residual.double()).to(dtype)
        assert torch.equal(summed, expected_summed), (dtype, (summed - expected_summed).abs().max())
        close(normed, fused_ops_reference_norm(expected_summed, weight), f"norm {dtype}", rtol=1e-2)
        assert (buffers[0] == 0).all(), "the lines read were not reset"
        sent = buffers[1][half: half + peer_lines.numel()]
        assert torch.equal(sent, lines(x[0])), "rank 0's lines in rank 1's buffer"
        assert (buffers[1][:half] == 0).all() and (buffers[1][half + peer_lines.numel():] == 0).all()
        assert (counters == torch.tensor(calls, dtype=torch.int32) + 1).all()


def gemv_sends_lines() -> None:
    """At batch 1 a row-parallel GEMV sends its outputs as the next call's lines itself (comm.row_parallel_linear):
    rank 0's GEMV must put exactly the lines the all-reduce would send into rank 1's buffer, and the all-reduce
    told so (sent) must send nothing more, still sum rank 1's lines and reset them."""
    world, n, k, slot_words, calls = 2, 64, 40, 512, 3
    generator = torch.Generator().manual_seed(6)
    weight = torch.randint(-3, 4, (n, k), generator=generator).float()
    x = torch.randint(-3, 4, (1, k), generator=generator).float()
    peer = torch.randint(-8, 8, (1, n), generator=generator).float()
    residual, norm_weight = torch.zeros(1, n), torch.ones(n)
    buffers = [torch.zeros(2 * world * slot_words, dtype=torch.int64) for _ in range(world)]
    half = (calls & 1) * world * slot_words
    flag = (2 * calls + 1) << 32
    buffers[0][half + slot_words: half + slot_words + n] = (peer.view(torch.int32).reshape(-1).to(torch.int64)
                                                            & 0xFFFFFFFF) | flag
    lines = (torch.tensor([b.data_ptr() for b in buffers]), torch.full((4,), calls, dtype=torch.int32), slot_words,
             0, world)
    out = gemv.gemv(x, weight, lines=lines)
    close(out, x.double() @ weight.double().T, "gemv that sends")
    sent = buffers[1][half: half + n]
    assert torch.equal(sent, (out.view(torch.int32).reshape(-1).to(torch.int64) & 0xFFFFFFFF) | flag)
    buffers[1].zero_()
    _, summed = fused_ops.all_reduce_rms_norm(out, residual, norm_weight, 1e-5, lines, sent=True)
    assert torch.equal(summed, out + peer) and (buffers[0] == 0).all() and (buffers[1] == 0).all()


def fused_ops_reference_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x32 = x.double()
    return weight.double() * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5))


CHECKS = {fn.__name__: fn for fn in (norm_and_silu, rotary_and_cache_write, rotary_with_qk_norm, paged_decode_splits,
                                     gemv_and_bias, greedy_argmax, stage_decode_inputs, lines_all_reduce_norm,
                                     gemv_sends_lines, moe_routing_and_experts)}

if __name__ == "__main__":
    CHECKS[sys.argv[1]]()
