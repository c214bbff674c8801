"""bench/engine_bench.py --cpu-smoke: every measurement of the GPU benchmark runs end to end on a tiny model."""
import importlib
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_bench():
    # Imported by name (not from a file spec): the tensor-parallel workers it spawns unpickle its functions.
    if os.path.join(REPO, "bench") not in sys.path:
        sys.path.insert(0, os.path.join(REPO, "bench"))
    return importlib.import_module("engine_bench")


def test_cpu_smoke_writes_every_figure(tmp_path, capsys):
    bench = load_bench()
    assert bench.main(["--cpu-smoke", "--tp", "2", "--prefix-shared", "--chunked", "--output-dir", str(tmp_path),
                       "--model-dir", str(tmp_path / "model")]) == 0
    (path,) = tmp_path.glob("engine_cpu-smoke_*.json")
    results = json.loads(path.read_text())
    assert "errors" not in results, results["errors"]
    for key in ("gpu", "torch", "commit", "date"):
        assert results[key]
    for key in ("roofline_tok_s", "hf_bs1_tok_s", "decode_bs1_tok_s", "throughput_128_128_tok_s",
                "throughput_1k_1k_tok_s", "tp2_bs1_tok_s", "tp2_bs1_speedup", "tp2_throughput_128_128_tok_s",
                "tp2_throughput_1k_1k_tok_s", "prefix_shared_tok_s", "prefix_speedup",
                "throughput_128_128_prefix_caching_off_tok_s", "chunked_itl_p99_ms"):
        assert results[key] > 0, key
    assert results["prefix_shared"]["on"]["hit_tokens"] > 0 == results["prefix_shared"]["off"]["hit_tokens"]
    assert set(results["ttft_ms"]) == {"16", "64"} and all(ms > 0 for ms in results["ttft_ms"].values())
    # 6 prompts x 8 tokens each: the output-token count is exact, so the throughput divides the right total
    assert results["throughput_128_128"]["output_tokens"] == results["tp2"]["throughput_128_128"]["output_tokens"] == 48
    assert set(results["tp2"]["ttft_ms"]) == {"16", "64"}
    assert "x roofline" in capsys.readouterr().out


def test_roofline_bytes_match_llama_8b():
    bench = load_bench()
    # 8.03e9 parameters less the 0.525e9 of the input embedding, two bytes each (the 223 tok/s at 3.35 TB/s)
    assert abs(bench.roofline_bytes(bench.LLAMA_8B) / 2 - 7.50e9) < 0.01e9


@pytest.mark.parametrize("name,active", [("qwen3-8b", 7.56e9), ("qwen3-30b-a3b", 3.04e9), ("mixtral-8x7b", 12.75e9)])
def test_roofline_bytes_count_the_active_experts(name, active):
    """Every parameter of transformers' model of that shape (built on the meta device) but the input embedding and,
    of each MoE layer, the experts a token does not use: two bytes each."""
    import torch
    import transformers

    bench = load_bench()
    architecture, fields, _ = bench.MODELS[name]
    config = getattr(transformers, architecture.replace("ForCausalLM", "Config"))(**fields)
    with torch.device("meta"):
        model = getattr(transformers, architecture)(config)
    unused = 0
    for module_name, module in model.named_modules():
        if module_name.endswith(".experts"):
            per_expert = sum(p.numel() for p in module.parameters()) // config.num_local_experts
            unused += per_expert * (config.num_local_experts - config.num_experts_per_tok)
    expected = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel() - unused
    assert bench.roofline_bytes(fields, architecture) == 2 * expected
    assert abs(expected - active) < 0.01e9


@pytest.mark.parametrize("name", ["qwen3-8b", "qwen3-30b-a3b", "mixtral-8x7b"])
def test_cpu_smoke_of_each_family(name, tmp_path):
    """--cpu-smoke --model NAME: every single-process figure of a tiny model of that family."""
    bench = load_bench()
    assert bench.main(["--cpu-smoke", "--model", name, "--skip-1k", "--output-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("engine_cpu-smoke_*.json")
    results = json.loads(path.read_text())
    assert "errors" not in results, results["errors"]
    assert results["model"] == f"{name} tiny, random weights"
    for key in ("roofline_tok_s", "hf_bs1_tok_s", "decode_bs1_tok_s", "throughput_128_128_tok_s"):
        assert results[key] > 0, key


def test_decode_profile_summarises_a_trace(tmp_path):
    """bench/decode_profile.py needs CUDA to record; its summary of a trace is plain arithmetic, checked here on a
    hand-made trace of 2 steps (kernels by kind, busy time, span, kernels per step; CPU events ignored)."""
    load_bench()  # decode_profile imports engine_bench by name
    profile = importlib.import_module("decode_profile")
    kernels = [("nvjet_sm90_tst_64x8_64x16_2x1_v_bz_TNT", 0, 30), ("_all_reduce_rms_norm_kernel", 31, 8),
               ("_paged_decode_kernel", 40, 4), ("_combine_splits_kernel", 45, 2), ("Memcpy HtoD", 50, 3),
               ("triton_poi_something", 60, 2)]
    events = [{"cat": "kernel" if "Memcpy" not in name else "gpu_memcpy", "name": name, "ts": ts, "dur": dur}
              for name, ts, dur in kernels] + [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 500}]
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps({"traceEvents": events}))
    summary = profile.summarise(str(trace), num_steps=2, wall_s=0.002)
    assert summary["wall_ms_per_step"] == 1.0
    assert summary["kernels_per_step"] == 3.0
    assert abs(summary["gpu_busy_ms_per_step"] - 49 / 2e3) < 1e-9
    assert abs(summary["gpu_span_ms_per_step"] - 62 / 2e3) < 1e-9
    assert summary["ms_per_step_by_kind"] == {"gemm": 0.015, "all-reduce": 0.004, "attention": 0.003,
                                              "copy/fill": 0.0015, "other": 0.001}
