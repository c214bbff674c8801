"""Engine benchmark: a model of real shape with random bf16 weights on one GPU host: Llama-3.1-8B by default, or
--model qwen3-8b, qwen3-30b-a3b (128 experts, top 8) or mixtral-8x7b (8 experts, top 2; ~93 GB of weights).

The engine starts from random weights (EngineConfig load_format "dummy") and no checkpoint is written, except with
--serve, whose server reads one (Mixtral's 93 GB need that much disk). In one run it measures the copy bandwidth (-> the batch-1 decode roofline), Hugging Face generate() at
batch 1 (the baseline), rayprism batch-1 decode and inter-token latency, time to first token at 128/1k/4k
prompt tokens, offline throughput at 128/128 and 1k/1k with up to 256 sequences in flight, and peak GPU
memory; with --tp 2 the same again with tensor parallel 2 and its batch-1 speed-up, with --serve the 128/128
workload through `rayprism serve` and 64 concurrent HTTP streams. One JSON per run goes to bench/results/.

    python bench/engine_bench.py                     # on a GPU host
    python bench/engine_bench.py --model qwen3-30b-a3b --skip-1k
    python bench/engine_bench.py --tp 2 --serve      # on a 2-GPU host
    python bench/engine_bench.py --prefix-shared --chunked --skip-hf   # prefix caching and chunked prefill figures
    python bench/engine_bench.py --quantization fp8  # also the fp8_* figures: FP8 weights quantized at load
    python bench/engine_bench.py --cpu-smoke [--model NAME]   # a tiny model of that family on the CPU (CI)

The batch-1 roofline is the copy bandwidth over the bytes a decoded token must read: every weight but the input
embedding, and of a mixture of experts only the router's and the top-k experts' (roofline_bytes).
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path += [os.path.join(REPO, "worker_image"), os.path.join(REPO, "operator")]  # PYTHONPATH may name another tree

from rayprism.engine import EngineConfig, LLMEngine, ModelRunner, SamplingParams  # noqa: E402

# Llama-3.1-8B's config.json, less the tokenizer ids (our stand-in tokenizer has no special tokens).
LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
)
TINY = dict(LLAMA_8B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
            rope_scaling=dict(LLAMA_8B["rope_scaling"], original_max_position_embeddings=256))
# The Hugging Face configs of Qwen/Qwen3-8B, Qwen/Qwen3-30B-A3B and mistralai/Mixtral-8x7B-v0.1, same tokenizer ids.
QWEN3_8B = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1,
)
QWEN3_30B_A3B = dict(
    QWEN3_8B, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_key_value_heads=4,
    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[],
)
MIXTRAL_8X7B = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
    rms_norm_eps=1e-5, rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False, bos_token_id=0,
    eos_token_id=1,
)
TINY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                  num_key_value_heads=2, max_position_embeddings=1024)
# --model NAME: (architecture, real shape, tiny shape of --cpu-smoke)
MODELS = {
    "llama-3.1-8b": ("LlamaForCausalLM", LLAMA_8B, TINY),
    "qwen3-8b": ("Qwen3ForCausalLM", QWEN3_8B, dict(QWEN3_8B, **TINY_SHAPE, head_dim=16)),
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", QWEN3_30B_A3B,
                      dict(QWEN3_30B_A3B, **TINY_SHAPE, head_dim=16, num_experts=8, num_experts_per_tok=3,
                           moe_intermediate_size=32)),
    "mixtral-8x7b": ("MixtralForCausalLM", MIXTRAL_8X7B, dict(MIXTRAL_8X7B, **TINY_SHAPE, num_local_experts=4)),
}


class Workload:
    """Sizes of one run: the real-shape run on a GPU, or the tiny CPU smoke run."""

    def __init__(self, smoke: bool, model: str = "llama-3.1-8b"):
        self.name = model
        self.architecture, shape, tiny = MODELS[model]
        self.model = tiny if smoke else shape
        self.max_model_len = 512 if smoke else 8192
        self.copy_bytes = (64 << 20) if smoke else (4 << 30)
        self.hf_tokens = 4 if smoke else 64
        self.decode_prompt, self.decode_tokens = (16, 8) if smoke else (128, 256)
        self.ttft_lengths = [16, 64] if smoke else [128, 1024, 4096]
        self.ttft_repeats = 2 if smoke else 4  # the first of each length warms up (shapes, allocator)
        # (name, prompt tokens, output tokens, number of prompts)
        self.throughput = [("128_128", 16, 8, 6), ("1k_1k", 64, 8, 4)] if smoke else [
            ("128_128", 128, 128, 1024), ("1k_1k", 1024, 1024, 512)]
        self.max_num_seqs = 4 if smoke else 256
        self.serve_prompts, self.serve_concurrency = (8, 4) if smoke else (512, 64)
        # --prefix-shared: (requests, shared prefix tokens, unique tokens after it, output tokens)
        self.prefix = (6, 40, 8, 4) if smoke else (256, 2000, 100, 128)
        # --chunked: (decoding streams, tokens of each arriving prompt, arrivals, prefill tokens per step chunked)
        self.chunked = (3, 200, 2, 32) if smoke else (64, 8000, 4, 512)


# --- environment and model -------------------------------------------------------------------------
def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def new_record(script: str, argv: list[str], commit: str | None, label: str, device: torch.device) -> dict:
    """The fields every bench JSON starts with: card, torch, commit, date, label and the command."""
    return {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "torch": torch.__version__,
            "commit": commit or git_commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "label": label, "command": " ".join([script, *argv])}


def write_record(record: dict, output_dir: str, prefix: str) -> str:
    """Writes output_dir/<prefix>_<date>[_<label>].json; returns its path."""
    os.makedirs(output_dir, exist_ok=True)
    stamp = record["date"].replace(":", "").replace("-", "")[:15]
    path = os.path.join(output_dir, f"{prefix}_{stamp}{'_' + record['label'] if record['label'] else ''}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {path}")
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Achievable device memory bandwidth in bytes/s: a large copy, counting bytes read plus written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times[2:])


def make_model_dir(folder: str, fields: dict, device: torch.device, architecture: str = "LlamaForCausalLM",
                   weights: bool = True, hf_model: bool = True):
    """Config, a stand-in word-level tokenizer over the whole vocabulary, and (weights) random bf16 safetensors;
    without weights the engine must start with load_format "dummy".

    Returns the Hugging Face model (on `device`), kept for the generate() baseline (hf_model: else None)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    os.makedirs(folder, exist_ok=True)
    config = getattr(transformers, architecture.replace("ForCausalLM", "Config"))(**fields)
    config.architectures = [architecture]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = None
    if hf_model or weights:
        torch.manual_seed(0)
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = getattr(transformers, architecture)(config).eval()
        finally:
            torch.set_default_dtype(default_dtype)
    if not os.path.exists(os.path.join(folder, "config.json")):
        if weights:
            model.save_pretrained(folder, safe_serialization=True)
        else:
            config.save_pretrained(folder)
        vocab = {f"<t{i}>": i for i in range(config.vocab_size)}
        word_level = Tokenizer(models.WordLevel(vocab, unk_token="<t0>"))
        word_level.pre_tokenizer = pre_tokenizers.Whitespace()
        PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<t0>", eos_token="<t1>").save_pretrained(
            folder)
    return model


def roofline_bytes(fields: dict, architecture: str = "LlamaForCausalLM") -> int:
    """Weight bytes read per decoded token in bf16: every weight but the input embedding (one row is read); of a
    mixture of experts' layer the router and the top-k experts only (the others are not read at batch 1)."""
    h, i, layers = fields["hidden_size"], fields["intermediate_size"], fields["num_hidden_layers"]
    heads, kv_heads = fields["num_attention_heads"], fields["num_key_value_heads"]
    head_dim = fields.get("head_dim") or h // heads
    attention = h * (heads + 2 * kv_heads) * head_dim + heads * head_dim * h
    norms = 2 * h + (2 * head_dim if architecture.startswith("Qwen3") else 0)  # Qwen3's q/k norms
    experts = fields.get("num_experts") or fields.get("num_local_experts") or 0
    total = 0
    for layer in range(layers):
        sparse = experts and layer not in fields.get("mlp_only_layers", []) and \
            (layer + 1) % fields.get("decoder_sparse_step", 1) == 0
        if sparse:
            mlp = fields["num_experts_per_tok"] * 3 * h * fields.get("moe_intermediate_size", i) + experts * h
        else:
            mlp = 3 * h * i
        total += attention + norms + mlp
    return 2 * (total + h + fields["vocab_size"] * h)


def random_prompt(length: int, vocab: int, generator: torch.Generator) -> list[int]:
    return torch.randint(2, vocab, (length,), generator=generator).tolist()


# --- measurements ----------------------------------------------------------------------------------
@torch.inference_mode()
def hf_generate_bs1(model, work: Workload, vocab: int, device: torch.device) -> float:
    ids = torch.tensor([random_prompt(work.decode_prompt, vocab, torch.Generator().manual_seed(1))], device=device)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
    sync(device)
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=work.hf_tokens, min_new_tokens=work.hf_tokens, **kwargs)
    sync(device)
    return (out.shape[1] - ids.shape[1]) / (time.perf_counter() - start)


def run_to_completion(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict:
    """Add every request, step until all finish. Returns wall time, token counts and per-step times."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    first_token, step_times, output_tokens = {}, [], 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        step_start = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        step_times.append((now - step_start, len(outputs)))
        for out in outputs:
            first_token.setdefault(out.request_id, now - start)
            output_tokens += len(out.new_token_ids)
    return {"seconds": time.perf_counter() - start, "output_tokens": output_tokens, "first_token": first_token,
            "step_times": step_times}


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def decode_bs1(engine: LLMEngine, work: Workload, vocab: int) -> dict:
    prompt = random_prompt(work.decode_prompt, vocab, torch.Generator().manual_seed(2))
    run_to_completion(engine, {"warmup": (prompt, greedy(8))})
    result = run_to_completion(engine, {"bs1": (prompt, greedy(work.decode_tokens))})
    # Every step after the one that returned the first token returns one more (steps are pipelined: that
    # step also waited for the prefill).
    first = next(i for i, (_, num_outputs) in enumerate(result["step_times"]) if num_outputs)
    itl = [seconds for seconds, _ in result["step_times"][first + 1:]]
    return {"decode_bs1_tok_s": len(itl) / sum(itl), "itl_ms_median": 1e3 * statistics.median(itl),
            "itl_ms_p99": 1e3 * sorted(itl)[int(0.99 * (len(itl) - 1))]}


def ttft(engine: LLMEngine, work: Workload, vocab: int) -> dict:
    generator = torch.Generator().manual_seed(3)
    result = {}
    for length in work.ttft_lengths:
        times = []
        for _ in range(work.ttft_repeats):
            prompt = random_prompt(length, vocab, generator)
            times.append(run_to_completion(engine, {"ttft": (prompt, greedy(1))})["first_token"]["ttft"])
        result[str(length)] = 1e3 * statistics.median(times[1:])
    return result


class StepTimer:
    """Splits engine steps into launching the model (runner.call), sampling on the device, waiting for a step's
    tokens (the device's time the host could not overlap) and the rest, the host's own work (scheduling,
    batch building, detokenising), by wrapping the engine's calls."""

    def __init__(self, engine: LLMEngine):
        self.engine, self.seconds = engine, {"runner_call": 0.0, "sampler": 0.0, "wait": 0.0}
        engine.runner.call = self._timed("runner_call", engine.runner.call)
        engine.sampler = self._timed("sampler", engine.sampler)
        # Engines from before pipelined steps (bench/throughput_ab.py runs old trees) have no _read_tokens.
        self.pipelined = hasattr(engine, "_read_tokens")
        if self.pipelined:
            engine._read_tokens = self._timed("wait", engine._read_tokens)

    def _timed(self, key, fn):
        def timed(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds[key] += time.perf_counter() - start
        timed.__wrapped__ = fn
        return timed

    def close(self) -> None:
        del self.engine.runner.call  # back to the class's method
        if self.pipelined:
            del self.engine._read_tokens
        self.engine.sampler = self.engine.sampler.__wrapped__


def throughput(engine: LLMEngine, prompt_len: int, output_len: int, num_prompts: int, vocab: int) -> dict:
    generator = torch.Generator().manual_seed(4)
    requests = {f"r{i}": (random_prompt(prompt_len, vocab, generator), greedy(output_len))
                for i in range(num_prompts)}
    preemptions = engine.stats()["num_preemptions"]
    timer = StepTimer(engine)
    try:
        result = run_to_completion(engine, requests)
    finally:
        timer.close()
    steps = sum(seconds for seconds, _ in result["step_times"])
    host = steps - sum(timer.seconds.values())
    return {"tok_s": result["output_tokens"] / result["seconds"], "seconds": result["seconds"],
            "output_tokens": result["output_tokens"], "steps": len(result["step_times"]),
            "num_preemptions": engine.stats()["num_preemptions"] - preemptions,
            **{f"{key}_s": seconds for key, seconds in timer.seconds.items()}, "host_other_s": host}


def record_variant(results: dict, prefix: str, bs1_key: str, variant: dict, decode: dict | None) -> None:
    """The top-level keys of a variant's run (FP8, tensor parallel 2): its batch-1 decode under bs1_key, its
    throughputs as PREFIX_throughput_*_tok_s, and its batch-1 speed-up over the bf16 run's decode."""
    results[bs1_key] = variant["decode"]["decode_bs1_tok_s"]
    for name in ("128_128", "1k_1k"):
        if f"throughput_{name}" in variant:
            results[f"{prefix}_throughput_{name}_tok_s"] = variant[f"throughput_{name}"]["tok_s"]
    if decode:
        results[f"{prefix}_bs1_speedup"] = results[bs1_key] / decode["decode_bs1_tok_s"]


def measured(results: dict, key: str, fn, *args):
    """Run one measurement; a failure is recorded under errors[key] and the run goes on."""
    try:
        value = fn(*args)
    except Exception as err:  # noqa: BLE001 - a benchmark records what broke and measures the rest
        traceback.print_exc()
        results.setdefault("errors", {})[key] = f"{type(err).__name__}: {err}"[:500]
        return None
    if value is not None:
        results[key] = value
        print(f"{key}: {value}", flush=True)
    return value


def fp8_figures(config: EngineConfig, work: Workload, vocab: int, decode_only: bool, skip_1k: bool) -> dict:
    """Batch-1 decode and offline throughput again with FP8 weights (quantized at load: quant.py)."""
    engine = LLMEngine(dataclasses.replace(config, quantization="fp8"))
    try:
        figures = {"decode": decode_bs1(engine, work, vocab)}
        for name, prompt_len, output_len, num_prompts in work.throughput:
            if not (decode_only or (name == "1k_1k" and skip_1k)):
                figures[f"throughput_{name}"] = throughput(engine, prompt_len, output_len, num_prompts, vocab)
    finally:
        engine.shutdown()
    return figures


def prefix_shared(engine: LLMEngine, work: Workload, vocab: int) -> dict:
    """Requests sharing a long prefix (then a few tokens of their own), all added at once, with prefix caching off
    then on (the block manager's switch flipped on this engine, its cache emptied first); and the 128/128 workload
    with caching off, against the run's caching-on figure."""
    num_prompts, prefix_len, unique_len, output_len = work.prefix
    generator = torch.Generator().manual_seed(7)
    prefix = random_prompt(prefix_len, vocab, generator)
    prompts = [prefix + random_prompt(unique_len, vocab, generator) for _ in range(num_prompts)]
    blocks, figures = engine.scheduler.block_manager, {}
    try:
        for caching in (False, True):
            engine.reset_prefix_cache()
            blocks.enable_prefix_caching = caching
            hits = engine.stats()["prefix_cache_hits"]
            run = run_to_completion(engine, {f"p{i}": (p, greedy(output_len)) for i, p in enumerate(prompts)})
            figures["on" if caching else "off"] = {"tok_s": run["output_tokens"] / run["seconds"],
                                                   "seconds": run["seconds"],
                                                   "hit_tokens": engine.stats()["prefix_cache_hits"] - hits}
            if not caching:
                _, prompt_len, output_len_128, num_128 = work.throughput[0]
                figures["throughput_128_128_off"] = throughput(engine, prompt_len, output_len_128, num_128, vocab)
    finally:
        blocks.enable_prefix_caching = engine.config.enable_prefix_caching
    return figures


def chunked_itl(engine: LLMEngine, work: Workload, vocab: int) -> dict:
    """Inter-token latency p99 of decoding streams: with no arrivals, then while long prompts arrive one after
    another, prefilled in chunks (a token budget of the decodes plus the chunk), then whole (a budget that holds
    a prompt: no chunking)."""
    num_streams, prompt_len, num_arrivals, chunk = work.chunked
    generator = torch.Generator().manual_seed(6)
    scheduler, last_token = engine.scheduler, {}
    budget = scheduler.max_num_batched_tokens
    streams = [f"stream{i}" for i in range(num_streams)]
    for request_id in streams:
        engine.add_request(request_id, random_prompt(16, vocab, generator), greedy(work.max_model_len - 17))

    def step() -> list[float]:
        """One engine step; the gaps between the streams' tokens it returned and their previous ones."""
        outputs, now, gaps = engine.step(), time.perf_counter(), []
        for out in outputs:
            if out.request_id in streams and out.new_token_ids:
                if out.request_id in last_token:
                    gaps.append(now - last_token[out.request_id])
                last_token[out.request_id] = now
        return gaps

    def p99_ms(gaps: list[float]) -> float:
        return 1e3 * sorted(gaps)[int(0.99 * (len(gaps) - 1))]

    def arrivals(step_budget: int) -> float:
        scheduler.max_num_batched_tokens, gaps = step_budget, []
        for i in range(num_arrivals):
            request_id = f"long{i}-{step_budget}"
            engine.add_request(request_id, random_prompt(prompt_len, vocab, generator), greedy(1))
            while request_id in engine.requests:
                gaps += step()
        return p99_ms(gaps)

    try:
        while len(last_token) < num_streams:
            step()
        for _ in range(8):  # warm-up
            step()
        quiet = p99_ms([gap for _ in range(num_arrivals * -(-prompt_len // chunk)) for gap in step()])
        figures = {"no_arrivals_itl_p99_ms": quiet, "chunked_itl_p99_ms": arrivals(num_streams + chunk),
                   "unchunked_itl_p99_ms": arrivals(max(budget, num_streams + prompt_len)), "chunk_tokens": chunk}
    finally:
        scheduler.max_num_batched_tokens = budget
        for request_id in streams:
            engine.abort(request_id)
        while engine.has_unfinished_requests():
            engine.step()
    figures["chunked_itl_ratio"] = figures["chunked_itl_p99_ms"] / quiet
    return figures


# --- tensor parallel 2 -----------------------------------------------------------------------------
def tp_worker(rank: int, port: int, config: EngineConfig, work: Workload, vocab: int, skip_1k: bool,
              decode_only: bool, out_file: str) -> None:
    import torch.distributed as dist

    if config.device == "cuda":
        torch.cuda.set_device(rank)
    backend = "nccl" if config.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        runner = ModelRunner(config, rank=rank, world_size=2)
        if rank > 0:
            runner.serve_forever()
        else:
            engine = LLMEngine(config, runner)
            results = {"decode": decode_bs1(engine, work, vocab)}
            if not decode_only:
                results["ttft_ms"] = ttft(engine, work, vocab)
                for name, prompt_len, output_len, num_prompts in work.throughput:
                    if not (name == "1k_1k" and skip_1k):
                        results[f"throughput_{name}"] = throughput(engine, prompt_len, output_len, num_prompts,
                                                                   vocab)
            with open(out_file, "w") as f:
                json.dump(results, f)
            engine.shutdown()
    finally:
        dist.destroy_process_group()
    exit_without_finalizing()


def exit_without_finalizing() -> None:
    """End a spawned tensor-parallel worker that succeeded (its process group destroyed, its results written)
    without the interpreter's finalization: gloo's worker threads can still be tearing down then, and about one
    CPU run in 10 lost a rank to SIGABRT ("terminate called without an active exception"; see
    pytorch/pytorch#179291). A dist.barrier() before destroy_process_group did not prevent it."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tensor_parallel_2(config: EngineConfig, work: Workload, vocab: int, skip_1k: bool, decode_only: bool) -> dict:
    """The single-GPU measurements again with tensor parallel 2 (two processes: NCCL on CUDA, gloo on the CPU)."""
    import dataclasses

    import torch.multiprocessing as mp

    out_file = tempfile.mktemp(suffix=".json")
    tp_config = dataclasses.replace(config, tensor_parallel_size=2)
    mp.spawn(tp_worker, args=(free_port(), tp_config, work, vocab, skip_1k, decode_only, out_file), nprocs=2,
             join=True)
    with open(out_file) as f:
        return json.load(f)


# --- serving over HTTP -----------------------------------------------------------------------------
def serve_throughput(model_dir: str, work: Workload, vocab: int, prompt_len: int, output_len: int,
                     device: str) -> dict:
    """`rayprism serve` in a subprocess; `concurrency` streaming clients share `serve_prompts` requests."""
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.join(REPO, "worker_image"), os.path.join(REPO, "operator"), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "rayprism.cli", "serve", "--model", model_dir, "--served-model-name", "bench",
               "--ray-address", "local", "--host", "127.0.0.1", "--port", str(port), "--device", device,
               "--max-model-len", str(work.max_model_len), "--max-num-seqs", str(work.max_num_seqs)]
    server = subprocess.Popen(command, env=env)
    try:
        return asyncio.run(_drive_server(f"http://127.0.0.1:{port}", server, work, vocab, prompt_len, output_len))
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


async def _drive_server(url: str, server: subprocess.Popen, work: Workload, vocab: int, prompt_len: int,
                        output_len: int) -> dict:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"rayprism serve exited with {server.returncode}")
            try:
                async with session.get(f"{url}/health") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("rayprism serve did not become healthy in 900 s")
            await asyncio.sleep(1)

        generator = torch.Generator().manual_seed(5)
        queue = asyncio.Queue()
        for _ in range(work.serve_prompts):
            queue.put_nowait(random_prompt(prompt_len, vocab, generator))
        first_token_s = []

        async def client() -> int:
            tokens = 0
            while not queue.empty():
                body = {"model": "bench", "prompt": queue.get_nowait(), "max_tokens": output_len, "temperature": 0,
                        "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                sent, first = time.perf_counter(), True
                async with session.post(f"{url}/v1/completions", json=body) as response:
                    response.raise_for_status()
                    async for line in response.content:
                        line = line.strip()
                        if not line.startswith(b"data: ") or line == b"data: [DONE]":
                            continue
                        chunk = json.loads(line[len(b"data: "):])
                        if chunk.get("choices") and first:
                            first_token_s.append(time.perf_counter() - sent)
                            first = False
                        if chunk.get("usage"):
                            tokens += chunk["usage"]["completion_tokens"]
            return tokens

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(client() for _ in range(work.serve_concurrency))))
        seconds = time.perf_counter() - start
        async with session.get(f"{url}/metrics") as response:  # how many forward passes the run took
            steps = {name: float(value) for name, value in
                     (line.split() for line in (await response.text()).splitlines()
                      if line.startswith(("rayprism_engine_steps ", "rayprism_engine_prefill_steps ")))}
    return {"tok_s": tokens / seconds, "output_tokens": tokens, "seconds": seconds,
            "ttft_ms_median": 1e3 * statistics.median(first_token_s) if first_token_s else None,
            "engine_steps": steps.get("rayprism_engine_steps"),
            "engine_prefill_steps": steps.get("rayprism_engine_prefill_steps")}


# --- the run ---------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-3.1-8b",
                        help="the shape (with --cpu-smoke: a tiny model of that family)")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny random model on the CPU (checks the code)")
    parser.add_argument("--tp", type=int, choices=[1, 2], default=1,
                        help="2: also every engine figure again with tensor parallel 2, and its batch-1 speed-up")
    parser.add_argument("--serve", action="store_true", help="also 128/128 through `rayprism serve` over HTTP")
    parser.add_argument("--skip-hf", action="store_true", help="skip the Hugging Face generate() baseline")
    parser.add_argument("--skip-1k", action="store_true", help="skip the 1k/1k throughput workload")
    parser.add_argument("--decode-only", action="store_true",
                        help="batch-1 decode only (and with --tp 2 its speed-up): a quick A/B of a change")
    parser.add_argument("--prefix-shared", action="store_true",
                        help="also requests sharing a long prefix with prefix caching on and off (prefix_speedup)")
    parser.add_argument("--chunked", action="store_true",
                        help="also inter-token latency while long prompts arrive, chunked or not (chunked_itl_p99_ms)")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    parser.add_argument("--quantization", choices=["fp8"], default=None,
                        help="fp8: also batch-1 decode and offline throughput with FP8 weights (fp8_* figures)")
    parser.add_argument("--model-dir", default=None, help="where the random checkpoint goes (default: a temp dir)")
    parser.add_argument("--output-dir", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--label", default="", help="added to the JSON file name and record")
    parser.add_argument("--commit", default=None, help="commit measured (default: git rev-parse HEAD)")
    args = parser.parse_args(argv)

    work = Workload(args.cpu_smoke, args.model)
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU host, or pass --cpu-smoke")
    vocab = work.model["vocab_size"]
    results = new_record("engine_bench.py", argv or sys.argv[1:], args.commit, args.label, device)
    results["model"] = f"{args.model} {'tiny' if args.cpu_smoke else 'shape'}, random weights"
    model_dir = args.model_dir or tempfile.mkdtemp(prefix="rayprism-bench-")

    bandwidth = copy_bandwidth(device, work.copy_bytes)
    results["copy_bandwidth_gb_s"] = bandwidth / 1e9
    results["roofline_bytes"] = roofline_bytes(work.model, work.architecture)
    results["roofline_tok_s"] = bandwidth / results["roofline_bytes"]
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s -> roofline {results['roofline_tok_s']:.1f} tok/s", flush=True)
    hf_model = make_model_dir(model_dir, work.model, device, work.architecture, weights=args.serve,
                              hf_model=not (args.skip_hf or args.decode_only))
    if not (args.skip_hf or args.decode_only):
        measured(results, "hf_bs1_tok_s", hf_generate_bs1, hf_model, work, vocab, device)
    del hf_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    config = EngineConfig(model=model_dir, device=device.type, max_model_len=work.max_model_len,
                          max_num_seqs=work.max_num_seqs, enforce_eager=args.enforce_eager,
                          num_kv_blocks=256 if args.cpu_smoke else None,
                          load_format="auto" if args.serve else "dummy")
    started = time.perf_counter()
    engine = LLMEngine(config)
    results["engine_start_s"] = time.perf_counter() - started
    results["num_kv_blocks"] = engine.runner.num_kv_blocks
    decode = measured(results, "decode", decode_bs1, engine, work, vocab)
    if decode:
        results["decode_bs1_tok_s"] = decode["decode_bs1_tok_s"]
    if not args.decode_only:
        measured(results, "ttft_ms", ttft, engine, work, vocab)
    for name, prompt_len, output_len, num_prompts in work.throughput:
        if args.decode_only or (name == "1k_1k" and args.skip_1k):
            continue
        detail = measured(results, f"throughput_{name}", throughput, engine, prompt_len, output_len, num_prompts,
                          vocab)
        if detail:
            results[f"throughput_{name}_tok_s"] = detail["tok_s"]
    if args.prefix_shared and not args.decode_only:
        shared = measured(results, "prefix_shared", prefix_shared, engine, work, vocab)
        if shared:
            results["prefix_shared_tok_s"] = shared["on"]["tok_s"]
            results["prefix_speedup"] = shared["on"]["tok_s"] / shared["off"]["tok_s"]
            results["throughput_128_128_prefix_caching_off_tok_s"] = shared["throughput_128_128_off"]["tok_s"]
    if args.chunked and not args.decode_only:
        chunked = measured(results, "chunked_itl", chunked_itl, engine, work, vocab)
        if chunked:
            results["chunked_itl_p99_ms"] = chunked["chunked_itl_p99_ms"]
    if device.type == "cuda":
        results["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.serve:  # the same 128/128 workload offline at the HTTP clients' concurrency, for a like-for-like ratio
        _, prompt_len, output_len, _ = work.throughput[0]
        engine.scheduler.max_num_seqs = work.serve_concurrency
        offline = measured(results, "throughput_128_128_at_serve_concurrency", throughput, engine, prompt_len,
                           output_len, work.serve_prompts, vocab)
    engine.shutdown()
    del engine
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if args.quantization:
        fp8 = measured(results, "fp8", fp8_figures, config, work, vocab, args.decode_only, args.skip_1k)
        if fp8:
            record_variant(results, "fp8", "fp8_decode_bs1_tok_s", fp8, decode)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.tp == 2:
        tp2 = measured(results, "tp2", tensor_parallel_2, config, work, vocab, args.skip_1k, args.decode_only)
        if tp2:
            record_variant(results, "tp2", "tp2_bs1_tok_s", tp2, decode)
    if args.serve:
        _, prompt_len, output_len, _ = work.throughput[0]
        served = measured(results, "serve_128_128", serve_throughput, model_dir, work, vocab, prompt_len,
                          output_len, device.type)
        if served and offline:
            results["serve_128_128_tok_s"] = served["tok_s"]
            results["serve_fraction"] = served["tok_s"] / offline["tok_s"]
            if "throughput_128_128_tok_s" in results:
                results["serve_fraction_of_256_in_flight"] = served["tok_s"] / results["throughput_128_128_tok_s"]

    print_table(results)
    write_record(results, args.output_dir, f"engine_{'cpu-smoke' if args.cpu_smoke else 'gpu'}")
    return 0


def print_table(results: dict) -> None:
    roofline, baseline = results["roofline_tok_s"], results.get("hf_bs1_tok_s")
    rows = [("roofline (copy bandwidth / weight bytes)", roofline), ("HF generate() bs1", baseline),
            ("rayprism decode bs1", results.get("decode_bs1_tok_s")),
            ("rayprism tp2 decode bs1", results.get("tp2_bs1_tok_s")),
            ("tp2 offline 128/128", results.get("tp2_throughput_128_128_tok_s")),
            ("tp2 offline 1k/1k", results.get("tp2_throughput_1k_1k_tok_s")),
            ("offline 128/128 (256 in flight)", results.get("throughput_128_128_tok_s")),
            ("offline 1k/1k (256 in flight)", results.get("throughput_1k_1k_tok_s")),
            ("fp8 decode bs1", results.get("fp8_decode_bs1_tok_s")),
            ("fp8 offline 128/128", results.get("fp8_throughput_128_128_tok_s")),
            ("fp8 offline 1k/1k", results.get("fp8_throughput_1k_1k_tok_s")),
            ("serve 128/128 over HTTP", results.get("serve_128_128_tok_s"))]
    print(f"\n{results['gpu']}  torch {results['torch']}  commit {results['commit']}  {results['date']}")
    print(f"{'figure':42} {'tok/s':>10} {'x roofline':>11} {'x HF bs1':>9}")
    for label, value in rows:
        if value is None:
            continue
        vs_baseline = f"{value / baseline:9.2f}" if baseline else f"{'-':>9}"
        print(f"{label:42} {value:10.1f} {value / roofline:11.2f} {vs_baseline}")
    for length, ms in (results.get("ttft_ms") or {}).items():
        print(f"{'TTFT ' + length + ' prompt tokens (ms)':42} {ms:10.1f}")
    for key in ("decode", "tp2_bs1_speedup", "fp8_bs1_speedup", "prefix_speedup", "chunked_itl", "serve_fraction",
                "peak_gpu_memory_gib", "errors"):
        if key in results:
            print(f"{key}: {results[key]}")


if __name__ == "__main__":
    sys.exit(main())
