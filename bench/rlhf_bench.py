"""RLHF measurements of issue #19 on one GPU, engine and trainer colocated (the trainer is this process):

1. GPU memory (device-wide, as nvidia-smi counts it, and the engine rank's own) awake, after sleep(level=1) and
   after sleep(level=2);
2. the time to push every weight of the 8B shape (Llama-3.1-8B, bf16, 16 GB) from the trainer's GPU tensors into
   the engine through CUDA IPC (LLM.update_weights), alone and in verl's sequence (sleep(2), wake_up(["weights"]),
   update_weights, wake_up(["kv_cache"])); target: under 2 s;
3. logprob agreement in bf16: the logprobs the engine reports for its sampled tokens against transformers' of the
   same tokens, in bf16 and in float32, on a real checkpoint (--logprob-model, default SmolLM2-135M).

    .venv/bin/python bench/rlhf_bench.py [--label h200] [--skip-logprobs] [--logprob-model hf://org/name]

Writes bench/results/rlhf_<date>[_<label>].json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from engine_bench import LLAMA_8B, make_model_dir, new_record, write_record  # noqa: E402

GIB = 2**30


def device_used_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return round((total - free) / GIB, 2)


def memory(llm, label: str) -> dict:
    rank0 = llm.memory()[0]
    entry = {"after": label, "device_used_gib": device_used_gib(),
             "engine_allocated_gib": round(rank0["cuda_allocated_bytes"] / GIB, 2),
             "engine_reserved_gib": round(rank0["cuda_reserved_bytes"] / GIB, 2)}
    print(entry, flush=True)
    return entry


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sleep_and_update(args) -> dict:
    from rayprism import LLM, SamplingParams

    folder = tempfile.mkdtemp(prefix="rlhf-8b-")
    trainer = make_model_dir(folder, LLAMA_8B, torch.device("cuda"), weights=False)   # bf16, on this GPU
    weights_gib = sum(p.numel() * p.element_size() for p in trainer.parameters()) / GIB
    llm = LLM(folder, device="cuda", dtype="bfloat16", load_format="dummy", kv_cache_memory_fraction=0.3,
              max_model_len=4096)
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = list(range(2, 66))
    result = {"weights_gib": round(weights_gib, 2), "memory": [memory(llm, "load (trainer's 8B copy included)")]}
    for level in (1, 2):
        llm.sleep(level=level)
        result["memory"].append(memory(llm, f"sleep level {level}"))
        llm.wake_up(["weights"])
        if level == 2:   # the dropped weights come back from the trainer
            llm.update_weights(trainer.named_parameters())
        llm.wake_up(["kv_cache"])
        result["memory"].append(memory(llm, f"wake_up after level {level}"))

    def update():
        llm.update_weights(trainer.named_parameters(), bucket_bytes=args.bucket_mib << 20)

    def verl_sequence():
        llm.sleep(level=2)
        llm.wake_up(["weights"])
        update()
        llm.wake_up(["kv_cache"])

    update()   # warm: the workers' first IPC mappings
    expected = llm.generate(prompt, greedy)[0].token_ids
    update_s = [timed(update) for _ in range(args.repeats)]
    sequence_s = [timed(verl_sequence) for _ in range(args.repeats)]
    assert llm.generate(prompt, greedy)[0].token_ids == expected, "the pushed weights changed the outputs"
    result["update_weights_cuda_ipc_s"] = {"median": statistics.median(update_s), "all": update_s,
                                           "gb_per_s": round(weights_gib * GIB / 1e9 / statistics.median(update_s), 1)}
    result["verl_sleep2_wake_update_wake_s"] = {"median": statistics.median(sequence_s), "all": sequence_s}
    if args.host_update:
        result["update_weights_through_host_s"] = timed(
            lambda: llm.update_weights(trainer.named_parameters(), cuda_ipc=False))
    llm.shutdown()
    return result


def logprob_agreement(args) -> dict:
    from transformers import AutoModelForCausalLM

    from rayprism import LLM, SamplingParams
    from rayprism.engine.loader import resolve_model_path

    torch.cuda.empty_cache()   # the 8B trainer copy of sleep_and_update is gone: its cached blocks too
    folder = resolve_model_path(args.logprob_model)
    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 33, 28, 216, 34, 28, 216, 35, 28]]
    params = SamplingParams(max_tokens=64, temperature=1.0, seed=0, logprobs=0, ignore_eos=True)
    llm = LLM(args.logprob_model, device="cuda", dtype="bfloat16")
    outputs = llm.generate(prompts, params)
    llm.shutdown()
    result = {"model": args.logprob_model, "tokens": sum(len(out.token_ids) for out in outputs)}
    for dtype in (torch.bfloat16, torch.float32):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).cuda().eval()
        gaps = []
        with torch.no_grad():
            for prompt, out in zip(prompts, outputs):
                logits = model(torch.tensor([prompt + out.token_ids], device="cuda")).logits[0, len(prompt) - 1: -1]
                reference = logits.float().log_softmax(-1).gather(
                    -1, torch.tensor(out.token_ids, device="cuda")[:, None]).squeeze(-1)
                gaps += (torch.tensor(out.sampling_logprobs, device="cuda") - reference).abs().tolist()
        result[f"vs_transformers_{str(dtype).removeprefix('torch.')}"] = {
            "max_abs": max(gaps), "mean_abs": statistics.mean(gaps), "p99_abs": sorted(gaps)[int(0.99 * len(gaps))]}
        print(dtype, result[f"vs_transformers_{str(dtype).removeprefix('torch.')}"], flush=True)
        del model
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", default="")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bucket-mib", type=int, default=512)
    parser.add_argument("--host-update", action="store_true", help="also time an update through host memory")
    parser.add_argument("--skip-logprobs", action="store_true")
    parser.add_argument("--logprob-model", default="builtin://smollm2-135m-instruct")
    parser.add_argument("--output-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="/tmp/rp"))
    record = new_record("bench/rlhf_bench.py", sys.argv[1:], None, args.label, torch.device("cuda"))
    try:
        record["sleep_and_update_8b"] = sleep_and_update(args)
        if not args.skip_logprobs:
            record["logprob_agreement_bf16"] = logprob_agreement(args)
    finally:
        ray.shutdown()
    write_record(record, args.output_dir, "rlhf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
