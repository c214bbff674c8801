"""The batch-1 linear layers of the 8B model: cuBLAS (F.linear) against rayprism's GEMV kernel (gemv.py), per
weight shape of tensor parallel 1 and 2, and a sweep of the kernel's launch configs (the data behind
gemv.launch_config). gemv_20261127T054216.json, from the bench at 2a039ca, also has batches of 2-8 rows, where
cuBLAS was as fast or faster.

    python3 bench/gemv_bench.py                      # on a GPU host; writes bench/results/gemv_<date>.json

Each figure is a CUDA graph of back-to-back launches over enough copies of the weight that none is in L2 when
read (as in a decode step, where every layer has its own weights), so it includes the gaps between kernels.
Launched back to back, the GEMV's programmatic dependent launch (fused_ops.pdl) lets each launch start streaming
its weights during the previous one, so these figures are the best case; decode_profile.py measures the kernels
as the model runs them. (At 2a039ca the down projection's GEMV also took in the SiLU: fast here, 30-47% slower
than the unfused pair in the model, decode_profile_20261127T055830/055945 and T055310.)
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_bench import LLAMA_8B, new_record, write_record  # noqa: E402

from rayprism.engine import gemv  # noqa: E402

COLD_BYTES = 512 << 20  # weight copies per graph: at least this many bytes, ~10x an H100's or H200's L2
CONFIGS = [(block_n, block_k, warps, stages) for block_n, block_k, warps, stages in
           itertools.product((4, 8, 16), (512, 1024, 2048), (4, 8), (1, 3))]


def shapes(tp: int) -> dict[str, tuple[int, int]]:
    """name -> (out features, in features) of one rank's weights."""
    h, i, heads, kv = (LLAMA_8B[key] for key in
                       ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"))
    head_dim = h // heads
    return {"qkv_proj": ((heads + 2 * kv) * head_dim // tp, h), "o_proj": (h, h // tp),
            "gate_up_proj": (2 * i // tp, h), "down_proj": (h, i // tp), "lm_head": (LLAMA_8B["vocab_size"] // tp, h)}


def graph_us(launch, copies: int, repeats: int = 20) -> float:
    """Microseconds per launch: `launch(c)` for every copy c, captured in one graph, replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in range(copies):
            launch(c)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in range(copies):
            launch(c)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (repeats * copies)


def measure_shape(n: int, k: int, sweep: bool) -> dict:
    weight_bytes = n * k * 2
    copies = max(2, -(-COLD_BYTES // weight_bytes))
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(copies)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)

    def cublas(c):
        F.linear(x, weights[c])

    def ours(config):
        return lambda c: gemv.launch(x, weights[c], None, out, config)

    reference = F.linear(x, weights[0]).float()
    gemv.launch(x, weights[0], None, out, gemv.launch_config(n, k))
    result = {"n": n, "k": k, "weight_mib": weight_bytes / 2**20,
              "max_abs_error_vs_cublas": (out.float() - reference).abs().max().item(),
              "cublas_us": graph_us(cublas, copies), "gemv_us": graph_us(ours(gemv.launch_config(n, k)), copies)}
    if sweep:
        timings = {}
        for config in CONFIGS:
            try:
                timings[config] = graph_us(ours(config), copies)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory / registers: skip it
                print(f"  {n}x{k} {config}: {type(exc).__name__}", flush=True)
        best = min(timings, key=timings.get)
        result["sweep_best"], result["sweep_best_us"] = list(best), timings[best]
        result["sweep"] = {",".join(map(str, c)): round(t, 2) for c, t in sorted(timings.items(), key=lambda i: i[1])}
    for key in ("cublas_us", "gemv_us", "sweep_best_us"):
        if key in result:
            result[key.replace("_us", "_tb_s")] = weight_bytes / result[key] / 1e6
    print(f"{n:6d}x{k:5d}: cublas {result['cublas_us']:6.2f} us "
          f"({result['cublas_tb_s']:.2f} TB/s), gemv {result['gemv_us']:6.2f} us ({result['gemv_tb_s']:.2f} TB/s)"
          + (f", sweep best {result['sweep_best']} {result['sweep_best_us']:.2f} us" if sweep else ""), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sweep", action="store_true", help="also every launch config in CONFIGS")
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--label", default="")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    results = new_record("gemv_bench.py", sys.argv[1:], args.commit, args.label, torch.device("cuda"))
    results["shapes"] = {}
    for tp in args.tp:
        for name, (n, k) in shapes(tp).items():
            results["shapes"][f"tp{tp}_{name}"] = measure_shape(n, k, args.sweep)
            torch.cuda.empty_cache()  # that shape's weight copies
    write_record(results, args.output_dir, "gemv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
