"""MoE layer kernels alone on one GPU: fused_moe.py's routing + experts at the Qwen3-30B-A3B and Mixtral-8x7B layer
shapes, per number of tokens, against the copy bandwidth over the bytes they must read (the chosen experts'
weights: at batch 1 the decode roofline's share of a MoE layer).

Each figure is a CUDA graph of LAYERS layers, each with its own weights (no layer's experts stay in L2 for the
next) and its own router, replayed; the inputs are fixed, so the same experts are chosen at every replay.

    python bench/moe_bench.py [--tokens 1 4 16 64 256] [--shapes qwen3-30b-a3b mixtral-8x7b]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path += [os.path.join(REPO, "worker_image"), os.path.join(REPO, "bench")]

# (experts, top k, hidden, expert intermediate, renormalize, round weights, layers in the graph)
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768, True, True, 24), "mixtral-8x7b": (8, 2, 4096, 14336, True, False, 6)}


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times[2:])


def measure(shape: str, tokens: int, gemv: bool | None) -> dict:
    from rayprism.engine import fused_moe

    experts, top_k, hidden, inter, renormalize, round_weights, layers = SHAPES[shape]
    generator = torch.Generator(device="cuda").manual_seed(0)
    weights = [((torch.randn(experts, 2 * inter, hidden, device="cuda", generator=generator) * 0.02).bfloat16(),
                (torch.randn(experts, hidden, inter, device="cuda", generator=generator) * 0.02).bfloat16(),
                (torch.randn(experts, hidden, device="cuda", generator=generator) * 0.02).bfloat16())
               for _ in range(layers)]
    x = torch.randn(tokens, hidden, device="cuda", generator=generator).bfloat16()
    chosen = []

    def run():
        h = x
        for gate_up, down, router in weights:
            logits = h @ router.T
            if gemv is None:
                h = fused_moe.fused_moe(h, gate_up, down, logits, top_k, renormalize, round_weights)
            else:
                w, ids = fused_moe.route(logits, top_k, renormalize, round_weights)
                h = fused_moe.fused_experts(h, gate_up, down, w, ids, gemv=gemv)
            h = h * (1.0 / h.float().pow(2).mean().sqrt()).bfloat16()  # keep the scale (and the routing varied)
        return h

    run()
    with torch.no_grad():  # the distinct experts each layer reads, for the byte count
        h = x
        for gate_up, down, router in weights:
            w, ids = fused_moe.route(h @ router.T, top_k, renormalize, round_weights)
            chosen.append(ids.unique().numel() if not (gemv or (gemv is None and fused_moe.use_gemv(
                tokens, top_k, experts))) else ids.numel())
            h = fused_moe.fused_experts(h, gate_up, down, w, ids)
            h = h * (1.0 / h.float().pow(2).mean().sqrt()).bfloat16()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    seconds = statistics.median(times[3:]) / layers
    bytes_read = 2 * 3 * hidden * inter * statistics.mean(chosen)  # experts' weights; activations are small
    return {"us_per_layer": 1e6 * seconds, "weight_gb_s": bytes_read / seconds / 1e9,
            "experts_read_per_layer": statistics.mean(chosen)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--output", default=None, help="JSON file to write")
    args = parser.parse_args()
    bandwidth = copy_bandwidth()
    results = {"gpu": torch.cuda.get_device_name(), "copy_bandwidth_gb_s": bandwidth / 1e9}
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    for shape in args.shapes:
        for tokens in args.tokens:
            for gemv in (None, True, False) if tokens <= 16 else (None,):
                key = f"{shape} tokens={tokens} path={'auto' if gemv is None else 'gemv' if gemv else 'sorted'}"
                result = measure(shape, tokens, gemv)
                result["fraction_of_copy"] = result["weight_gb_s"] * 1e9 / bandwidth
                results[key] = result
                print(f"{key:45} {result['us_per_layer']:8.1f} us/layer  {result['weight_gb_s']:7.0f} GB/s "
                      f"({result['fraction_of_copy']:.2f} of copy), {result['experts_read_per_layer']:.1f} "
                      "expert reads/layer", flush=True)
            torch.cuda.empty_cache()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
