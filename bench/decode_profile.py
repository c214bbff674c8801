"""Where a batch-1 decode step's time goes on each tensor-parallel rank: GPU kernel time by kind, kernels per
step, and how much of the step the GPU is busy (a torch.profiler trace of decode steps, CUDA graphs included).

    python bench/decode_profile.py --model-dir /tmp/m8b --tp 1 2     # on a GPU host (2 GPUs for --tp 2)

The model is engine_bench's 8B-shaped Llama (the checkpoint in --model-dir is written first if missing). One
JSON per run goes to bench/results/ (decode_profile_<date>.json); a table per rank is printed.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import gzip
import json
import os
import shutil
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_bench import (LLAMA_8B, free_port, greedy, make_model_dir, new_record,  # noqa: E402
                          random_prompt, write_record)

from rayprism.engine import EngineConfig, LLMEngine, ModelRunner  # noqa: E402

# Kernel name fragments -> kind (first match wins); everything else is "other".
KINDS = [
    ("all-reduce", ("all_reduce", "allreduce", "nccl")),
    ("rotary+kv store", ("_rotary_store_kv",)),
    ("attention", ("_paged_decode", "_combine_splits", "flash")),
    ("norm(+residual)", ("_rms_norm",)),
    ("silu*mul", ("_silu_and_mul",)),
    ("gemm", ("gemm", "gemv", "cutlass", "sm90_", "nvjet", "splitk", "cublas")),
    ("copy/fill", ("memcpy", "memset", "copy", "fill", "elementwise")),
]
FIRST_STEP, NUM_STEPS, NUM_TOKENS = 16, 32, 64  # profile decode steps 16..47 of a 64-token generation


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, parts in KINDS if any(p in lowered for p in parts)), "other")


def summarise(trace_file: str, num_steps: int, wall_s: float) -> dict:
    with open(trace_file) as f:
        events = [e for e in json.load(f)["traceEvents"]
                  if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    by_kind, by_name = collections.Counter(), collections.Counter()
    counts = collections.Counter()
    for e in events:
        by_kind[kind_of(e["name"])] += e["dur"]
        # one kernel on several shapes (the GEMV on every weight) is told apart by its grid
        name = f"{e['name'][:90]} grid={e.get('args', {}).get('grid')}"
        by_name[name] += e["dur"]
        counts[name] += 1
    busy_us = sum(by_kind.values())
    span_us = max(e["ts"] + e["dur"] for e in events) - min(e["ts"] for e in events) if events else 0.0
    per_step = lambda us: us / 1e3 / num_steps  # noqa: E731 - ms per step
    return {
        "steps": num_steps,
        "wall_ms_per_step": 1e3 * wall_s / num_steps,
        "gpu_busy_ms_per_step": per_step(busy_us),
        "gpu_span_ms_per_step": per_step(span_us),
        "kernels_per_step": len(events) / num_steps,
        "ms_per_step_by_kind": {kind: per_step(us) for kind, us in by_kind.most_common()},
        "top_kernels": [{"name": name, "ms_per_step": per_step(us), "per_step": counts[name] / num_steps}
                        for name, us in by_name.most_common(16)],
    }


def profile_steps(runner: ModelRunner, out_file: str, trace_file: str | None) -> None:
    """Profile execute_model calls FIRST_STEP .. FIRST_STEP + NUM_STEPS on this rank (the same calls on every rank:
    each step runs once everywhere); the summary goes to out_file, the gzipped trace to trace_file if given."""
    original, calls, state = runner.execute_model, itertools.count(), {}

    def execute_model(packed):
        call = next(calls)
        if call == FIRST_STEP:
            torch.cuda.synchronize()
            state["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            state["profiler"].__enter__()
            state["start"] = time.perf_counter()
        elif call == FIRST_STEP + NUM_STEPS:
            wall = time.perf_counter() - state["start"]  # host time of NUM_STEPS launches, pipelined one deep
            torch.cuda.synchronize()
            state["profiler"].__exit__(None, None, None)
            trace = tempfile.mktemp(suffix=".json")
            state["profiler"].export_chrome_trace(trace)
            with open(out_file, "w") as f:
                json.dump(summarise(trace, NUM_STEPS, wall), f)
            if trace_file:
                with open(trace, "rb") as src, gzip.open(trace_file, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        return original(packed)

    runner.execute_model = execute_model


def decode(engine: LLMEngine) -> None:
    prompt = random_prompt(128, LLAMA_8B["vocab_size"], torch.Generator().manual_seed(2))
    engine.add_request("profiled", prompt, greedy(NUM_TOKENS))
    while engine.has_unfinished_requests():
        engine.step()


def rank_main(rank: int, world_size: int, port: int, config: EngineConfig, out_dir: str,
              trace_dir: str | None) -> None:
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    if world_size > 1:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        runner = ModelRunner(config, rank=rank, world_size=world_size)
        trace = os.path.join(trace_dir, f"trace_tp{world_size}_rank{rank}.json.gz") if trace_dir else None
        profile_steps(runner, os.path.join(out_dir, f"rank{rank}.json"), trace)
        if rank > 0:
            runner.serve_forever()
            return
        engine = LLMEngine(config, runner)
        decode(engine)
        engine.shutdown()
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def profile(config: EngineConfig, world_size: int, trace_dir: str | None) -> list[dict]:
    import torch.multiprocessing as mp

    out_dir = tempfile.mkdtemp()
    config = dataclasses.replace(config, tensor_parallel_size=world_size)
    mp.spawn(rank_main, args=(world_size, free_port(), config, out_dir, trace_dir), nprocs=world_size, join=True)
    ranks = []
    for rank in range(world_size):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            ranks.append(json.load(f))
    return ranks


def print_rank(tp: int, rank: int, summary: dict) -> None:
    print(f"\ntp{tp} rank {rank}: wall {summary['wall_ms_per_step']:.3f} ms/step, GPU busy "
          f"{summary['gpu_busy_ms_per_step']:.3f} ms, span {summary['gpu_span_ms_per_step']:.3f} ms, "
          f"{summary['kernels_per_step']:.0f} kernels/step")
    for kind, ms in summary["ms_per_step_by_kind"].items():
        print(f"  {kind:<18} {ms:7.3f} ms")
    for kernel in summary["top_kernels"][:10]:
        print(f"  {kernel['ms_per_step']:7.3f} ms  x{kernel['per_step']:<5.1f} {kernel['name']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--tp", type=int, nargs="+", default=[1], help="tensor-parallel sizes to profile")
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--label", default="")
    parser.add_argument("--traces", default=None, help="also keep each rank's trace here (gzipped Chrome JSON)")
    parser.add_argument("--commit", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        make_model_dir(args.model_dir, LLAMA_8B, torch.device("cuda"))  # returns the HF model: dropped at once
        torch.cuda.empty_cache()
    results = new_record("decode_profile.py", argv or sys.argv[1:], args.commit, args.label, torch.device("cuda"))
    results["steps"] = f"decode steps {FIRST_STEP}..{FIRST_STEP + NUM_STEPS - 1} of a 128-token prompt"
    config = EngineConfig(model=args.model_dir, device="cuda", max_model_len=8192, max_num_seqs=256)
    for tp in args.tp:
        results[f"tp{tp}"] = profile(config, tp, args.traces)
        for rank, summary in enumerate(results[f"tp{tp}"]):
            print_rank(tp, rank, summary)
    write_record(results, args.output_dir, "decode_profile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
