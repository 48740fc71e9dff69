"""The platform's worker type, `pipeline-docker`, as a Prefect collection (worker/pyproject.toml):
`prefect worker start --type pipeline-docker` finds it by importing this package."""

from pipeline_worker.policy import (
    RESULTS_BLOCK,
    Policy,
    PolicyViolation,
    memory_bytes,
    render,
    results_block,
    results_storage,
)
from pipeline_worker.worker import PolicyDockerWorker

__all__ = [
    "RESULTS_BLOCK", "Policy", "PolicyDockerWorker", "PolicyViolation", "memory_bytes", "render", "results_block",
    "results_storage",
]  # fmt: skip
