"""Your stack is yours: `make clean` asks before it deletes anything, and the suite runs beside your
stack (the `stack` fixture proves, at the end of the session, that it is unchanged)."""

import os
import subprocess

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.e2e

SCRATCH = "modular-pipeline-scratch"  # a project of its own: `make clean` never sees yours here
VOLUME = f"{SCRATCH}_data"


def docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True)


def make(target: str, answer: str = "", **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "COMPOSE_PROJECT_NAME": SCRATCH, **env}
    return subprocess.run(["make", target], cwd=ROOT, input=answer, env=environment, capture_output=True, text=True)


def test_make_down_keeps_volumes_and_make_clean_deletes_nothing_without_a_yes(stack):
    labels = [f"com.docker.compose.project={SCRATCH}", "com.docker.compose.volume=data"]
    assert docker("volume", "create", *(a for label in labels for a in ("--label", label)), VOLUME).returncode == 0
    try:
        assert make("down").returncode == 0 and docker("volume", "inspect", VOLUME).returncode == 0  # down keeps it
        for answer in ("", "n\n", "yes please\n"):
            refused = make("clean", answer)
            assert refused.returncode != 0 and "aborted" in refused.stdout, refused
            assert docker("volume", "inspect", VOLUME).returncode == 0
        assert make("clean", CONFIRM="1").returncode == 0
        assert docker("volume", "inspect", VOLUME).returncode != 0
    finally:
        docker("volume", "rm", "-f", VOLUME)
