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
