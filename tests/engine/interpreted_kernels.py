"""Checks of the Triton kernels run on the CPU by Triton's interpreter; test_kernels_interpreted.py runs each in
a subprocess with TRITON_INTERPRET=1 (the interpreter is chosen when a kernel module is imported):

    TRITON_INTERPRET=1 python -m tests.engine.interpreted_kernels CHECK

float32 only: the interpreter rounds to bf16 by truncation, where the GPU rounds to nearest (the GPU tests check
bf16 bit for bit). References are the engine's own CPU paths or float64.
"""
from __future__ import annotations

import sys

import torch

from rayprism.engine import fused_ops, gemv, paged_attention
from rayprism.engine.attention import store_kv
from rayprism.engine.layers import rotate_half

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


CHECKS = {fn.__name__: fn for fn in (norm_and_silu, rotary_and_cache_write, paged_decode_splits,
                                     gemv_and_bias)}

if __name__ == "__main__":
    CHECKS[sys.argv[1]]()
