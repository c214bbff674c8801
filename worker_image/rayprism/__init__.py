"""rayprism: LLM inference on Ray, deployed by a Kubernetes operator.

`from rayprism import LLM, SamplingParams` is the library entry point. They load lazily so that the
CLI's manifest commands (`rayprism render`, `rayprism crd`) work without torch or Ray installed.
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from .llm import LLM

        return LLM
    if name == "SamplingParams":
        from .engine import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'rayprism' has no attribute {name!r}")
