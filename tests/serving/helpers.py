"""Helpers of the serving tests: tiny random-weight checkpoints, a bare-engine reference, Ray clusters started
with `ray start`, a `rayprism serve` subprocess, and a fault to inject into its Ray workers."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

VENV_BIN = Path(sys.executable).parent
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def smollm2_folder() -> str:
    from rayprism.engine.loader import BUILTIN_SMOLLM2, resolve_model_path

    return resolve_model_path(BUILTIN_SMOLLM2)


def make_checkpoint(folder: Path, seed: int) -> Path:
    """A 2-layer random-weight Llama with SmolLM2's tokenizer (chat template included); different seeds give
    different greedy tokens."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    source = Path(smollm2_folder())
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():   # larger logits so greedy choices are far apart and stable across TP layouts
        model.lm_head.weight.mul_(20)
    model.save_pretrained(folder, safe_serialization=True)
    for name in _TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    return folder


def reference_outputs(folder, prompts, params) -> list[tuple[list[int], str]]:
    """(token ids, text) per prompt from the bare engine in this process (tp 1, no Ray)."""
    from rayprism.engine import EngineConfig, LLMEngine

    engine = LLMEngine(EngineConfig(model=str(folder), device="cpu"))
    results = {str(i): ([], "") for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens, text = results[output.request_id]
            results[output.request_id] = (tokens + output.new_token_ids, text + output.new_text)
    engine.shutdown()
    return [results[str(i)] for i in range(len(prompts))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RayNodes:
    """A Ray cluster of `ray start --block` processes (head + workers) in its own temp dir; each node is
    stopped with SIGTERM, which makes `ray start` stop everything it started."""

    def __init__(self, head_cpus: int, worker_cpus: list[int] = (), head_resources: str | None = None):
        import ray

        self.temp_dir = tempfile.mkdtemp(prefix="/tmp/rp")
        self.port = free_port()
        self.ip = ray.util.get_node_ip_address()
        self.address = f"{self.ip}:{self.port}"
        self.processes = []
        self._start("--head", f"--port={self.port}", f"--node-ip-address={self.ip}", f"--num-cpus={head_cpus}",
                    "--include-dashboard=false", f"--temp-dir={self.temp_dir}")
        self._wait_for_head()
        for cpus in worker_cpus:
            self.add_worker(cpus)

    def add_worker(self, cpus: int, env: dict | None = None) -> subprocess.Popen:
        """A worker node; `env` goes to its raylet and so to the actors it runs."""
        return self._start(f"--address={self.address}", f"--node-ip-address={self.ip}", f"--num-cpus={cpus}",
                           env=env)

    def _start(self, *flags: str, env: dict | None = None) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / f"node{len(self.processes)}.log", "w")
        process = subprocess.Popen([str(VENV_BIN / "ray"), "start", "--block", *flags], stdout=log,
                                   stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.processes.append(process)
        return process

    def _wait_for_head(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            check = subprocess.run([str(VENV_BIN / "ray"), "health-check", f"--address={self.address}"],
                                   capture_output=True)
            if check.returncode == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the Ray head at {self.address} was not healthy within {timeout_s}s")

    def wait_for_nodes(self, count: int, timeout_s: float = 90) -> None:
        """Needs ray.init(address=self.address) in this process."""
        import ray

        deadline = time.monotonic() + timeout_s
        while sum(node["Alive"] for node in ray.nodes()) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray cluster at {self.address} did not reach {count} nodes")
            time.sleep(0.2)

    def worker_processes(self) -> list:
        """The RayGPUWorker actor processes of this cluster (children of its raylets)."""
        import psutil

        found = []
        for process in psutil.process_iter(["cmdline"]):
            cmdline = process.info["cmdline"] or []
            if cmdline and cmdline[0].startswith("ray::RayGPUWorker"):
                try:
                    parent = " ".join(process.parent().cmdline())
                except (psutil.Error, AttributeError):
                    continue
                if self.temp_dir in parent:
                    found.append(process)
        return found

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


class ServeProcess:
    """`rayprism serve ...` in a subprocess, waited for until /health answers 200. A port that free_port found
    free can be taken before the server binds it (Ray's processes bind random ports all the time): then the
    server exits at once, and it is started again on other ports."""

    def __init__(self, flags: list[str], env: dict | None = None, timeout_s: float = 180):
        self.log_path = Path(tempfile.mkstemp(prefix="rayprism-serve-", suffix=".log")[1])
        for _ in range(3):
            if self._start(flags, env, timeout_s):
                return
        raise RuntimeError(f"rayprism serve found its ports taken three times:\n{self.log()}")

    def _start(self, flags: list[str], env: dict | None, timeout_s: float) -> bool:
        """True once healthy; False when a port was taken meanwhile."""
        self.port, admin_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "rayprism.cli", "serve", *flags, "--host", "127.0.0.1", "--port", str(self.port),
             "--admin-port", str(admin_port)],
            stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if "address already in use" in self.log():
                    return False
                raise RuntimeError(f"rayprism serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return True
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or someone else's port
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"rayprism serve was not healthy within {timeout_s}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


FAULTY_SEED = 666
# While this file exists, every worker's ping and poll hold their answer (a loaded machine, a hung rank), and a
# new worker does not start its engine (holding an engine restart in its "restarting" state).
STALL_FILE = Path(tempfile.gettempdir()) / f"rayprism-test-stall-{os.getpid()}"


def inject_faults() -> None:
    """Sampling a request seeded FAULTY_SEED raises, as a bug in per-request sampling setup would; and the
    worker does not answer the driver, nor start, while STALL_FILE exists."""
    from rayprism.engine.sampler import Sampler
    from rayprism.executor.worker import RayGPUWorker

    generator_for = Sampler.generator_for

    def failing(self, seq):
        if seq.params.seed == FAULTY_SEED:
            raise RuntimeError("injected sampling fault")
        return generator_for(self, seq)

    Sampler.generator_for = failing
    stall_file = Path(os.environ["RAYPRISM_TEST_STALL_FILE"])

    def stalled(method):
        def answer(self, *args, **kwargs):
            while stall_file.exists():
                time.sleep(0.1)
            return method(self, *args, **kwargs)
        return answer

    for name in ("ping", "poll", "start"):
        setattr(RayGPUWorker, name, stalled(getattr(RayGPUWorker, name)))


# ServeProcess(env=FAULTY_WORKERS_ENV): Ray runs the faults' setup hook in every worker process of the job.
FAULTY_WORKERS_ENV = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"runtime_env": {
    "worker_process_setup_hook": f"{__name__}.{inject_faults.__name__}",
    "env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[2]), "RAYPRISM_TEST_STALL_FILE": str(STALL_FILE)}}})}
