"""rayprism's model runtime: tensor-parallel Llama-family models, paged KV cache, continuous batching."""
from .config import EngineConfig
from .llm_engine import LLMEngine, RequestOutput
from .model_runner import ModelRunner
from .sampling import InvalidRequestError, SamplingParams, StructuredOutput

__all__ = ["EngineConfig", "InvalidRequestError", "LLMEngine", "ModelRunner", "RequestOutput", "SamplingParams",
           "StructuredOutput"]
