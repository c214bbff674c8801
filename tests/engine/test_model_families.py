"""Qwen3 and the mixtures of experts (Mixtral, Qwen3-MoE) on the CPU: greedy outputs equal to transformers' (float32),
the experts' weights loaded from either name layout, and tensor-parallel slicing of the stacked experts.
(Prefill logits against transformers and tensor parallel 2: test_tensor_parallel.py; the Triton kernels:
test_kernels_interpreted.py and test_gpu.py.)"""
from types import SimpleNamespace

import pytest
import torch

from rayprism.engine import EngineConfig, LLMEngine, SamplingParams
from rayprism.engine import moe
from rayprism.engine.model import is_moe_layer

from .helpers import generate, prefill_logits, save_random_model
from .test_tensor_parallel import PROBE_IDS, PROMPTS

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("name", ["qwen3", "mixtral", "qwen3_moe"])
def test_greedy_tokens_match_transformers(name, tiny_qwen3_dir, tiny_mixtral_dir, tiny_qwen3_moe_dir):
    from transformers import AutoModelForCausalLM

    folder = {"qwen3": tiny_qwen3_dir, "mixtral": tiny_mixtral_dir, "qwen3_moe": tiny_qwen3_moe_dir}[name]
    engine = LLMEngine(EngineConfig(model=folder, num_kv_blocks=32))
    ours = generate(engine, PROMPTS, GREEDY, staggered=True)  # prefills joining decodes: mixed steps
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    for i, prompt in enumerate(PROMPTS):
        ids = engine.tokenizer(prompt, return_tensors="pt").input_ids
        expected = reference.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
        assert ours[str(i)]["token_ids"] == expected[0, ids.shape[1]:].tolist(), prompt


def test_experts_load_from_transformers_stacked_names(tiny_qwen3_moe_dir, tiny_mixtral_dir, smollm2_dir, tmp_path):
    """A trainer's state dict names the experts as transformers stacks them in memory (mlp.experts.gate_up_proj
    [experts, 2 * intermediate, hidden]; Mixtral's block as mlp): an in-place update from it gives that model's
    logits, for the checkpoints' per-expert names and these alike."""
    from transformers import AutoModelForCausalLM

    for folder, architecture, fields in (
            (tiny_qwen3_moe_dir, "qwen3_moe", dict(head_dim=16, num_experts=8, num_experts_per_tok=3,
                                                   moe_intermediate_size=32, norm_topk_prob=True, mlp_only_layers=[1])),
            (tiny_mixtral_dir, "mixtral", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2))):
        other = save_random_model(str(tmp_path / architecture), smollm2_dir, architecture, initializer_range=0.2,
                                  **fields)
        reference = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
        state = reference.state_dict()
        assert any(name.endswith("mlp.experts.gate_up_proj") for name in state)
        engine = LLMEngine(EngineConfig(model=folder, num_kv_blocks=32))
        engine.update_weights_from_tensors(state.items())
        expected = reference(torch.tensor([PROBE_IDS])).logits[0, -1]
        torch.testing.assert_close(prefill_logits(engine, PROBE_IDS)[0], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [0, 1])
def test_stacked_experts_slice_for_each_rank(rank, monkeypatch):
    """Tensor parallel 2: each rank keeps its half of every expert's gate, up (rows) and down (columns), whether
    the tensors come one per expert or stacked."""
    monkeypatch.setattr(moe, "tp_size", lambda: 2)
    monkeypatch.setattr(moe, "tp_rank", lambda: rank)
    experts, hidden, inter = 3, 4, 6
    layer = moe.FusedMoE(experts, hidden, inter, top_k=2, renormalize=True, weights_in_model_dtype=False)
    gate, up = torch.randn(experts, inter, hidden), torch.randn(experts, inter, hidden)
    down = torch.randn(experts, hidden, inter)
    mine = slice(rank * 3, rank * 3 + 3)
    expected_gate_up, expected_down = torch.cat([gate[:, mine], up[:, mine]], dim=1), down[:, :, mine]
    for e in range(experts):
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, gate[e], (e, 0))
        layer.gate_up_proj.weight_loader(layer.gate_up_proj, up[e], (e, 1))
        layer.down_proj.weight_loader(layer.down_proj, down[e], (e, None))
    assert torch.equal(layer.gate_up_proj, expected_gate_up) and torch.equal(layer.down_proj, expected_down)
    layer.gate_up_proj.data.zero_()
    layer.down_proj.data.zero_()
    layer.gate_up_proj.weight_loader(layer.gate_up_proj, torch.cat([gate, up], dim=1), None)
    layer.down_proj.weight_loader(layer.down_proj, down, None)
    assert torch.equal(layer.gate_up_proj, expected_gate_up) and torch.equal(layer.down_proj, expected_down)


def test_which_layers_are_sparse():
    mixtral = SimpleNamespace(num_local_experts=8)
    assert all(is_moe_layer(mixtral, i) for i in range(4))
    qwen3_moe = SimpleNamespace(num_local_experts=128, decoder_sparse_step=2, mlp_only_layers=[3])
    assert [is_moe_layer(qwen3_moe, i) for i in range(6)] == [False, True, False, False, False, True]
    assert not is_moe_layer(SimpleNamespace(), 0)  # dense families


def test_routing_renormalises_and_rounds():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]]).bfloat16()
    weights, ids = moe.select_experts(logits, 2, renormalize=True, weights_in_model_dtype=False)
    assert ids.tolist() == [[0, 1]] and weights.dtype == torch.float32
    assert weights.sum().item() == pytest.approx(1.0) and weights[0, 0].item() == pytest.approx(1 / (1 + 1 / 2.718281828),
                                                                                               rel=1e-3)
    raw, _ = moe.select_experts(logits, 2, renormalize=False, weights_in_model_dtype=True)
    assert raw.sum().item() < 0.95 and torch.equal(raw, raw.bfloat16().float())  # Qwen3-MoE without norm_topk_prob
