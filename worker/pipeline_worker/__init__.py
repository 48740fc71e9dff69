"""The platform's worker type, `pipeline-docker`, as a Prefect collection (worker/pyproject.toml):
`prefect worker start --type pipeline-docker` finds it by importing this package."""

from pipeline_worker.policy import Policy, PolicyViolation, credential, memory_bytes, render
from pipeline_worker.worker import PolicyDockerWorker

__all__ = ["Policy", "PolicyDockerWorker", "PolicyViolation", "credential", "memory_bytes", "render"]
