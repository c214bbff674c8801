"""The correctness RL users care about (issue #19): a trainer holding SmolLM2-135M in transformers (float32)
takes gradient steps on a toy reward and pushes its weights into rayprism after each, in process
(update_weights with its parameters) and over a gloo weight-update group; after every push the logprobs
rayprism reports for the tokens it sampled are the trainer's own logprobs of those tokens (to 1e-4), and
greedy outputs are transformers'."""
from __future__ import annotations

import socket
import tempfile
import threading

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from rayprism import LLM, SamplingParams
from rayprism.executor.weight_sync import weight_update_group
from tests.serving.helpers import smollm2_folder

pytestmark = pytest.mark.slow

PROMPT_IDS = [[1, 504, 3458, 282, 4649, 314], [1, 33, 28, 216, 34, 28, 216, 35, 28]]
TEMPERATURE = 0.8
ROLLOUT = SamplingParams(max_tokens=8, temperature=TEMPERATURE, n=3, logprobs=0, ignore_eos=True)
GREEDY_TOKENS = 8


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="/tmp/rp"))
    yield
    ray.shutdown()


def trainer_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The trainer's logprobs of `tokens` after `prompt` under its sampling distribution (logits / T)."""
    logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1: -1].float() / TEMPERATURE
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def toy_reward(tokens: list[int]) -> float:
    """Even token ids are rewarded: any policy-gradient step moves the policy, which is all the test needs."""
    return sum(token % 2 == 0 for token in tokens) / len(tokens)


def reinforce_step(model, optimizer, rollouts) -> None:
    """One REINFORCE step with the group mean as baseline, over (prompt, outputs of it) pairs."""
    optimizer.zero_grad()
    loss = 0.0
    for prompt, outputs in rollouts:
        rewards = torch.tensor([toy_reward(out.token_ids) for out in outputs])
        for out, advantage in zip(outputs, rewards - rewards.mean()):
            loss = loss - advantage * trainer_logprobs(model, prompt, out.token_ids).sum()
    loss.backward()
    optimizer.step()


def check_on_policy(llm, model, seed: int) -> tuple[list, float]:
    """rayprism's sampled tokens and their logprobs against the trainer's; returns the rollouts and the largest
    gap between rayprism's logprobs and the model's at tensor-parallel-free float32."""
    rollouts, gap = [], 0.0
    outputs = llm.generate(PROMPT_IDS, SamplingParams(**{**vars(ROLLOUT), "seed": seed}))
    with torch.no_grad():
        for i, prompt in enumerate(PROMPT_IDS):
            group = outputs[i * ROLLOUT.n: (i + 1) * ROLLOUT.n]
            for out in group:
                expected = trainer_logprobs(model, prompt, out.token_ids)
                gap = max(gap, (torch.tensor(out.sampling_logprobs) - expected).abs().max().item())
            rollouts.append((prompt, group))
        for prompt, out in zip(PROMPT_IDS, llm.generate(PROMPT_IDS, SamplingParams(
                max_tokens=GREEDY_TOKENS, temperature=0, ignore_eos=True))):
            reference = model.generate(torch.tensor([prompt]), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                       min_new_tokens=GREEDY_TOKENS)[0, len(prompt):].tolist()
            assert out.token_ids == reference
    return rollouts, gap


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_logprobs_stay_on_policy_across_weight_pushes(local_ray):
    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-5)
    llm = LLM(folder, device="cpu", dtype="float32")
    try:
        port = free_port()
        joined = {}
        trainer = threading.Thread(target=lambda: joined.update(
            group=weight_update_group("127.0.0.1", port, 0, 2, "gloo", "on-policy")))
        trainer.start()
        llm.init_weight_update_group("127.0.0.1", port, rank_offset=1, world_size=2, backend="gloo",
                                     group_name="on-policy")
        trainer.join()

        def push_over_gloo():
            named = [(name, param.detach()) for name, param in model.named_parameters()]
            sender = threading.Thread(target=lambda: [joined["group"].broadcast(t, 0).wait() for _, t in named])
            sender.start()
            llm.update_weights_from_distributed([n for n, _ in named], [t.dtype for _, t in named],
                                                [t.shape for _, t in named])
            sender.join()

        pushes = [lambda: llm.update_weights(model.named_parameters()), push_over_gloo,
                  lambda: llm.update_weights(model.named_parameters(), bucket_bytes=64 << 20)]
        rollouts, gap = check_on_policy(llm, model, seed=0)
        assert gap < 1e-4
        for step, push in enumerate(pushes, start=1):
            before = [trainer_logprobs(model, prompt, group[0].token_ids).detach() for prompt, group in rollouts]
            reinforce_step(model, optimizer, rollouts)
            with torch.no_grad():   # the step moved the policy by far more than the tolerance
                moved = max((trainer_logprobs(model, prompt, group[0].token_ids) - old).abs().max().item()
                            for (prompt, group), old in zip(rollouts, before))
            assert moved > 1e-3, moved
            push()
            rollouts, gap = check_on_policy(llm, model, seed=step)
            print(f"step {step}: policy moved {moved:.2e}, rayprism vs trainer logprob gap {gap:.2e}")
            assert gap < 1e-4, (step, gap)
    finally:
        llm.shutdown()
