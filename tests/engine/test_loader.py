"""Model URIs and checkpoint layouts."""
import os
import shutil

import pytest
import torch

from rayprism.engine import EngineConfig, LLMEngine
from rayprism.engine.loader import BUILTIN_SMOLLM2, resolve_model_path

from .helpers import prefill_logits

PROBE_IDS = [1, 504, 3458, 282, 4649, 314]


def test_plain_path_file_uri_and_revision_placeholder(tiny_llama_dir, tmp_path):
    assert resolve_model_path(tiny_llama_dir) == tiny_llama_dir
    assert resolve_model_path(f"file://{tiny_llama_dir}") == tiny_llama_dir
    versioned = tmp_path / "model-v2"
    shutil.copytree(tiny_llama_dir, versioned)
    assert resolve_model_path(f"file://{tmp_path}/model-{{revision}}", revision="v2") == str(versioned)
    with pytest.raises(ValueError, match=r"model-\{revision\}"):
        resolve_model_path(f"{tmp_path}/model-{{revision}}")


@pytest.mark.parametrize("uri", ["s3://bucket/llama", "pvc://claim/llama", "ftp://host/x"])
def test_unsupported_schemes_name_the_uri(uri):
    with pytest.raises(ValueError, match=uri):
        resolve_model_path(uri)


def test_missing_folder_names_the_uri(tmp_path):
    with pytest.raises(FileNotFoundError, match="file:///nonexistent/model"):
        resolve_model_path("file:///nonexistent/model")


def test_hub_failure_names_the_uri(monkeypatch):
    # No route to the hub here (and in CI): the download fails and the error names the URI.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="hf://rayprism-test/does-not-exist"):
        resolve_model_path("hf://rayprism-test/does-not-exist")


def test_builtin_model_lives_in_the_xdg_cache(monkeypatch, tmp_path, smollm2_dir):
    assert smollm2_dir == resolve_model_path(BUILTIN_SMOLLM2)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(smollm2_dir))
    assert smollm2_dir.endswith(os.path.join("rayprism", "models", "smollm2-135m-instruct"))
    # Pointing XDG_CACHE_HOME at a folder that already holds a converted model uses it as is.
    fake = tmp_path / "rayprism" / "models" / "smollm2-135m-instruct"
    fake.mkdir(parents=True)
    (fake / "model.safetensors").touch()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_model_path(BUILTIN_SMOLLM2) == str(fake)


def test_sharded_checkpoint_with_index_loads_the_same(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    sharded = str(tmp_path / "sharded")
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).save_pretrained(sharded, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_llama_dir, name), sharded)
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json"))
    single = prefill_logits(LLMEngine(EngineConfig(model=tiny_llama_dir, num_kv_blocks=4)), PROBE_IDS)
    torch.testing.assert_close(prefill_logits(LLMEngine(EngineConfig(model=sharded, num_kv_blocks=4)), PROBE_IDS), single)


def test_config_errors_name_the_field(tiny_llama_dir):
    with pytest.raises(ValueError, match="pipeline_parallel_size"):
        EngineConfig(model=tiny_llama_dir, pipeline_parallel_size=2)
    with pytest.raises(ValueError, match="max_model_len"):
        LLMEngine(EngineConfig(model=tiny_llama_dir, num_kv_blocks=2, max_model_len=64))
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(model=tiny_llama_dir, dtype="int8")
