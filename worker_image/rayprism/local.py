"""`rayprism run FILE`: serve an InferenceDeployment on this machine with the flags its head pod would get."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile

from rayprism_operator.api import load_inference_deployment
from rayprism_operator.render import serve_args


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", metavar="FILE", help="an InferenceDeployment manifest (YAML)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")


def serve_namespace(file: str, host: str, port: int) -> argparse.Namespace:
    """The parsed `rayprism serve` flags for the manifest (as the operator renders them), host/port overridden,
    and no admin API (no operator talks to a local run)."""
    from rayprism.server.cli import add_serve_arguments

    spec = load_inference_deployment(file).spec
    parser = argparse.ArgumentParser(prog="rayprism serve")
    add_serve_arguments(parser)
    return parser.parse_args([*serve_args(spec), "--host", host, "--port", str(port), "--admin-port", "0"])


def run(args: argparse.Namespace) -> int:
    import ray
    import torch

    from rayprism.server.cli import serve

    flags = serve_namespace(args.file, args.host, args.port)
    if flags.device == "cuda" and not torch.cuda.is_available():
        print(f"rayprism run: {args.file} asks for GPUs (spec.resources), but this machine has no CUDA device; "
              "set gpusPerNode: 0 to run it on the CPU")
        return 2
    world_size = flags.tensor_parallel_size * flags.pipeline_parallel_size
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rp")   # Ray's socket paths must stay short
    os.environ.setdefault("RAY_worker_niceness", "0")  # Ray would start the model workers at nice 15
    print(f"starting a local Ray cluster for {world_size} worker(s) ...", flush=True)
    ray.init(address="local", _temp_dir=temp_dir, include_dashboard=False,
             num_cpus=max(os.cpu_count() or 1, world_size), namespace="rayprism-local")
    try:
        print(f"loading {flags.model} (Ctrl-C stops) ...", flush=True)
        return serve(flags, on_ready=lambda url: _print_endpoint(url, flags.served_model_name))
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        print("stopped", flush=True)


def _print_endpoint(url: str, model: str) -> None:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello! Who are you?"}],
                       "max_tokens": 64})
    print(f"\nready: {url}/v1 (model '{model}')\n"
          f"try:   curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'\n", flush=True)
