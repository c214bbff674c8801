"""Offline throughput only, for A/B runs of two trees on one GPU (engine_bench.py measures everything else).

The rayprism imported is the one PYTHONPATH names first, so two checkouts compare on the same machine:

    git archive OLD worker_image | tar -x -C /tmp/old
    python3 bench/throughput_ab.py --model-dir /tmp/m8b out-new.json           # this tree
    PYTHONPATH=/tmp/old/worker_image python3 bench/throughput_ab.py --model-dir /tmp/m8b out-old.json

The model dir is made by engine_bench.py (--model-dir) or by this script when it is empty.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import engine_bench as bench  # noqa: E402  (appends this tree's worker_image after PYTHONPATH)

import rayprism  # noqa: E402
from rayprism.engine import EngineConfig, LLMEngine  # noqa: E402

WORKLOADS = [("128_128", 128, 128, 1024), ("128_128_again", 128, 128, 1024), ("1k_256", 1024, 256, 512)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="JSON file to write")
    parser.add_argument("--model-dir", required=True)
    args = parser.parse_args()
    work = bench.Workload(smoke=False)
    if not os.path.exists(os.path.join(args.model_dir, "config.json")):
        bench.make_model_dir(args.model_dir, work.model, torch.device("cuda"))  # returns the HF model: dropped
    engine = LLMEngine(EngineConfig(model=args.model_dir, device="cuda", max_model_len=work.max_model_len,
                                    max_num_seqs=work.max_num_seqs))
    vocab = work.model["vocab_size"]
    bench.throughput(engine, 128, 16, 256, vocab)  # warm-up: allocator, kernel caches
    results = {"code": os.path.dirname(rayprism.__file__), "gpu": torch.cuda.get_device_name()}
    for name, prompt_len, output_len, num_prompts in WORKLOADS:
        results[name] = bench.throughput(engine, prompt_len, output_len, num_prompts, vocab)
        print(name, f"{results[name]['tok_s']:.0f} tok/s", flush=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
