import pytest

from .helpers import save_random_model


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    from rayprism.engine.loader import resolve_model_path

    return resolve_model_path("builtin://smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir) -> str:
    """Random Llama with GQA: 8 query heads, 2 KV heads, untied embeddings."""
    return save_random_model(str(tmp_path_factory.mktemp("tiny-llama")), smollm2_dir)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, smollm2_dir) -> str:
    """Random Qwen2: q/k/v bias, tied embeddings, one KV head (replicated across tensor-parallel ranks)."""
    return save_random_model(
        str(tmp_path_factory.mktemp("tiny-qwen2")), smollm2_dir, "qwen2", num_key_value_heads=1,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory, smollm2_dir) -> str:
    """Random Qwen3: per-head q/k norms, an explicit head_dim (16, not hidden / heads = 8)."""
    return save_random_model(str(tmp_path_factory.mktemp("tiny-qwen3")), smollm2_dir, "qwen3", head_dim=16)


@pytest.fixture(scope="session")
def tiny_mixtral_dir(tmp_path_factory, smollm2_dir) -> str:
    """Random Mixtral: 4 experts, top 2, in every layer; head_dim 16 (hidden / heads would be 8, below what the
    Triton attention takes: the GPU tests would then run eager, without the decode graphs they are about)."""
    return save_random_model(str(tmp_path_factory.mktemp("tiny-mixtral")), smollm2_dir, "mixtral", head_dim=16,
                             num_local_experts=4, num_experts_per_tok=2)


@pytest.fixture(scope="session")
def tiny_qwen3_moe_dir(tmp_path_factory, smollm2_dir) -> str:
    """Random Qwen3-MoE: 8 experts, top 3 renormalised, q/k norms; layer 1 dense (mlp_only_layers)."""
    return save_random_model(str(tmp_path_factory.mktemp("tiny-qwen3-moe")), smollm2_dir, "qwen3_moe", head_dim=16,
                             num_experts=8, num_experts_per_tok=3, moe_intermediate_size=32, norm_topk_prob=True,
                             mlp_only_layers=[1])
