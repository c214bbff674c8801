"""What running the engine behind Ray actors costs: tokens/s of the bare LLMEngine in this process vs the same
workload through LLM (one Ray worker actor, outputs long-polled in batches).

    .venv/bin/python bench/executor_overhead.py [--model builtin://smollm2-135m-instruct] [--device cpu]

Both sides use the same number of torch threads (--threads; the Ray worker gets that many CPUs); each batch
size runs --rounds times on each side, alternating, and the best round of each side is compared. Writes
bench/results/executor_overhead-<device>-<date>.json with machine, command, commit and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rayprism.engine import EngineConfig, LLMEngine, SamplingParams

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def bare_round(engine: LLMEngine, batch: int, params: SamplingParams) -> float:
    """Tokens/s of one batch on the bare engine."""
    started = time.perf_counter()
    for i in range(batch):
        engine.add_request(f"r{time.perf_counter_ns()}-{i}", PROMPT, params)
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.new_token_ids) for o in engine.step())
    return tokens / (time.perf_counter() - started)


def ray_round(llm, batch: int, params: SamplingParams) -> float:
    """Tokens/s of one batch through LLM (Ray worker actor)."""
    started = time.perf_counter()
    tokens = sum(len(r.token_ids) for r in llm.generate([PROMPT] * batch, params))
    return tokens / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin://smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")   # Ray starts workers at nice 15; compare like with like
    torch.set_num_threads(args.threads)
    config = EngineConfig(model=args.model, device=args.device)
    import ray

    from rayprism.llm import LLM

    # Both stay loaded and take turns, so load from other processes on the machine hits both alike.
    engine = LLMEngine(config)
    ray.init(num_cpus=args.threads, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="/tmp/rp"))
    llm = LLM(args.model, device=args.device, cpus_per_worker=args.threads)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    bare_round(engine, 1, params), ray_round(llm, 1, params)          # warm-up
    rows = []
    for batch in args.batches:
        bare, via_ray = [], []
        for _ in range(args.rounds):
            bare.append(bare_round(engine, batch, params))
            via_ray.append(ray_round(llm, batch, params))
        best_bare, best_ray = max(bare), max(via_ray)
        rows.append({"batch": batch, "max_tokens": args.max_tokens, "rounds": args.rounds,
                     "bare_tokens_per_s_best": round(best_bare, 2), "ray_tokens_per_s_best": round(best_ray, 2),
                     "overhead_pct_best": round(100 * (1 - best_ray / best_bare), 1),
                     "bare_tokens_per_s_all": [round(x, 2) for x in bare],
                     "ray_tokens_per_s_all": [round(x, 2) for x in via_ray]})
        print(json.dumps(rows[-1]), flush=True)
    llm.shutdown()
    engine.shutdown()
    ray.shutdown()

    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "benchmark": "executor_overhead",
        "machine": {"platform": platform.platform(), "processor": _cpu_name(), "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": os.environ.get("GIT_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                                  text=True).stdout.strip(),
        "date": now.isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
        "model": args.model, "device": args.device, "threads": args.threads,
        "results": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" /
               f"executor_overhead-{args.device}-{now:%Y%m%dT%H%M}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
