"""Ray orchestration of one model replica: a worker actor per rank, driven from the LLM/server process."""
from rayprism.executor.ray_executor import EngineDeadError, Placement, RayExecutor
from rayprism.executor.worker import RayGPUWorker

__all__ = ["EngineDeadError", "Placement", "RayExecutor", "RayGPUWorker"]
