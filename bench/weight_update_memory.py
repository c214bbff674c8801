"""Memory across ten weight updates in a row: every rank's process RSS (and, on CUDA, allocated/reserved device
memory) after loading, then after each LLM.update_weights from disk, with a request served in between.

    .venv/bin/python bench/weight_update_memory.py [--model builtin://smollm2-135m-instruct] [--device cpu]

Writes bench/results/weight_update_memory-<device>-<date>.json with machine, command, commit and date.
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
from pathlib import Path

import ray
import torch

from rayprism.llm import LLM, SamplingParams

MIB = 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="builtin://smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--updates", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_worker_niceness", "0")   # Ray starts workers at nice 15; compare like with like
    ray.init(include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="/tmp/rp"))
    llm = LLM(args.model, device=args.device, tensor_parallel_size=args.tensor_parallel_size)
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    expected = llm.generate(["Memory check"], params)[0].token_ids

    def snapshot(label: str) -> dict:
        ranks = [{k: round(v / MIB, 1) for k, v in rank.items()} for rank in llm.memory()]
        print(label, ranks, flush=True)
        return {"after": label, "ranks_mib": ranks}

    series = [snapshot("load")]
    for i in range(args.updates):
        llm.update_weights(args.model)
        assert llm.generate(["Memory check"], params)[0].token_ids == expected
        series.append(snapshot(f"update {i + 1}"))
    llm.shutdown()
    ray.shutdown()

    first, last = series[1]["ranks_mib"][0], series[-1]["ranks_mib"][0]
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "benchmark": "weight_update_memory",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": os.environ.get("GIT_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                                  text=True).stdout.strip(),
        "date": now.isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "ray": ray.__version__},
        "model": args.model, "device": args.device, "tensor_parallel_size": args.tensor_parallel_size,
        "rank0_change_from_update_1_to_last_mib": {k: round(last[k] - first[k], 1) for k in last},
        "series": series,
    }
    out = Path(args.out or Path(__file__).parent / "results" /
               f"weight_update_memory-{args.device}-{now:%Y%m%dT%H%M}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
