"""Spawn and reconnect (issue #19): one driver spawns rollout engines with different tensor-parallel sizes as
named, detached Ray actors and exits; another driver (a trainer, later, in another process) reconnects to them,
pushes new weights, generates, and shuts one engine down without disturbing the other.

    ray start --head                                  # or any Ray cluster
    python examples/rlhf_spawn_reconnect.py spawn     # engines rollout-tp1 and rollout-tp3 (SmolLM2 on the CPU)
    python examples/rlhf_spawn_reconnect.py train     # reconnect, update weights, generate, shut rollout-tp1 down
    python examples/rlhf_spawn_reconnect.py generate rollout-tp3
    python examples/rlhf_spawn_reconnect.py shutdown rollout-tp3

Each command prints one JSON line, "RESULT {...}", for scripts (tests/rlhf/test_spawn_reconnect.py reads it).
"""
from __future__ import annotations

import argparse
import json

import torch

from rayprism import LLM, SamplingParams

NAMESPACE = "rlhf-example"
ENGINES = {"rollout-tp1": 1, "rollout-tp3": 3}   # SmolLM2's 3 KV heads split over 3 ranks
PROMPT_IDS = [[1, 504, 3458, 282, 4649, 314], [1, 33, 28, 216, 34, 28, 216, 35, 28]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


def spawn(args) -> dict:
    """Returns each engine's greedy tokens on the weights it loaded."""
    tokens = {}
    for name, tp in ENGINES.items():
        llm = LLM(args.model, tensor_parallel_size=tp, device=args.device, dtype="float32", name=name,
                  namespace=NAMESPACE, detached=True, ray_address=args.ray_address)
        tokens[name] = [out.token_ids for out in llm.generate(PROMPT_IDS, GREEDY)]
        llm.disconnect()   # the workers stay; this driver may exit
    return tokens


def trainer_weights(model_uri: str):
    """A stand-in for a training step: the HF model without its first layer's MLP (so outputs change)."""
    from transformers import AutoModelForCausalLM

    from rayprism.engine.loader import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(model_uri), dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.zero_()
    return model


def train(args) -> dict:
    model = trainer_weights(args.model)
    engines = {name: LLM.connect(name, NAMESPACE, ray_address=args.ray_address) for name in ENGINES}
    tokens = {}
    for name, llm in engines.items():
        llm.update_weights(model.named_parameters())   # resharded for each engine's tensor-parallel size
        tokens[name] = [out.token_ids for out in llm.generate(PROMPT_IDS, GREEDY)]
    with torch.no_grad():
        tokens["transformers"] = [model.generate(torch.tensor([ids]), max_new_tokens=8, min_new_tokens=8,
                                                 do_sample=False)[0, len(ids):].tolist() for ids in PROMPT_IDS]
    engines["rollout-tp1"].shutdown()
    engines["rollout-tp3"].disconnect()
    return tokens


def generate(args) -> dict:
    llm = LLM.connect(args.engine, NAMESPACE, ray_address=args.ray_address)
    tokens = [out.token_ids for out in llm.generate(PROMPT_IDS, GREEDY)]
    llm.disconnect()
    return {args.engine: tokens}


def shutdown(args) -> dict:
    LLM.connect(args.engine, NAMESPACE, ray_address=args.ray_address).shutdown()
    return {"shut_down": args.engine}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["spawn", "train", "generate", "shutdown"])
    parser.add_argument("engine", nargs="?", choices=list(ENGINES), help="generate/shutdown: which engine")
    parser.add_argument("--ray-address", default="auto")
    parser.add_argument("--model", default="builtin://smollm2-135m-instruct")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.command in ("generate", "shutdown") and not args.engine:
        parser.error(f"{args.command} needs an engine name: {', '.join(ENGINES)}")
    result = {"spawn": spawn, "train": train, "generate": generate, "shutdown": shutdown}[args.command](args)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
