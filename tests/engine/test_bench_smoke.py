"""bench/engine_bench.py --cpu-smoke: every measurement of the GPU benchmark runs end to end on a tiny model."""
import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_bench():
    spec = importlib.util.spec_from_file_location("engine_bench", os.path.join(REPO, "bench", "engine_bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_writes_every_figure(tmp_path, capsys):
    bench = load_bench()
    assert bench.main(["--cpu-smoke", "--output-dir", str(tmp_path), "--model-dir", str(tmp_path / "model")]) == 0
    (path,) = tmp_path.glob("engine_cpu-smoke_*.json")
    results = json.loads(path.read_text())
    assert "errors" not in results, results["errors"]
    for key in ("gpu", "torch", "commit", "date"):
        assert results[key]
    for key in ("roofline_tok_s", "hf_bs1_tok_s", "decode_bs1_tok_s", "throughput_128_128_tok_s",
                "throughput_1k_1k_tok_s"):
        assert results[key] > 0, key
    assert set(results["ttft_ms"]) == {"16", "64"} and all(ms > 0 for ms in results["ttft_ms"].values())
    # 6 prompts x 8 tokens each: the output-token count is exact, so the throughput divides the right total
    assert results["throughput_128_128"]["output_tokens"] == 48
    assert "x roofline" in capsys.readouterr().out


def test_roofline_bytes_match_llama_8b():
    bench = load_bench()
    # 8.03e9 parameters less the 0.525e9 of the input embedding, two bytes each (the 223 tok/s at 3.35 TB/s)
    assert abs(bench.roofline_bytes(bench.LLAMA_8B) / 2 - 7.50e9) < 0.01e9
