"""Compile each requirements.txt into a hash-locked requirements.lock, or check that none is stale.

    python tools/lock.py            # make lock: every lock, with uv, from PyPI
    python tools/lock.py --check    # offline: every lock still satisfies its inputs

Each image lock (components, worker) covers its requirements.txt plus the Prefect pin of .env,
and a component's also the step kit's requirements (stepkit/requirements.txt), so the whole
environment of an image is locked, not only what it adds to the base image. The step kit's own
lock (stepkit/requirements.lock) is locked first, and every component's within its pins: the
recipe installs it in a layer of its own that every component image shares, built and pushed
once, and a component's own layer holds only what it adds. The
dev lock (requirements-dev.lock, the host's tests and CLI) covers pyproject.toml's dev extra and
every image's requirements.txt, so unit tests import exactly what the images run.
"""

import argparse
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from dotenv import dotenv_values
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DEV_LOCK = ROOT / "requirements-dev.lock"
S3_TEST = ROOT / "tests" / "s3" / "requirements.txt"
KIT = ROOT / "stepkit" / "requirements.txt"  # not an image: part of every component's
KIT_LOCK = KIT.with_suffix(".lock")  # the layer every component image shares (component.Dockerfile)
PYTHON = "3.11"  # the Python of the images and of CI


def prefect_pin() -> str:
    return f"prefect=={dotenv_values(ROOT / '.env')['PREFECT_VERSION']}"


def image_inputs() -> dict[Path, list[str]]:
    """Each image's lock file and the requirements it must satisfy."""
    # Components and the worker are built FROM the Prefect image; the S3 test endpoint is not.
    kit = read_requirements(KIT) if KIT.is_file() else []
    locks = {KIT_LOCK: [prefect_pin(), *kit]} if kit else {}
    locks |= {
        txt.with_suffix(".lock"): [
            prefect_pin(),
            *read_requirements(txt),
            *([] if txt.parent.name == "worker" else kit),
        ]
        for txt in sorted(ROOT.glob("*/requirements.txt"))
        if txt != KIT
    }
    if S3_TEST.is_file():  # not in a copy of the deployable part (tests/harness.py)
        locks[S3_TEST.with_suffix(".lock")] = read_requirements(S3_TEST)
    return locks


def dev_inputs() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    images = [r for reqs in image_inputs().values() for r in reqs]
    return [*project["dependencies"], *project["optional-dependencies"]["dev"], *images]


def read_requirements(path: Path) -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def compile_lock(inputs: list[str], lock: Path) -> None:
    """`uv pip compile` the inputs (given on stdin) into `lock`, with every file's hash; a
    component's within the step kit's pins."""
    command = [
        sys.executable, "-m", "uv", "pip", "compile", "-", "--quiet", "--generate-hashes",
        "--universal", "--python-version", PYTHON, "--output-file", str(lock.relative_to(ROOT)),
        "--custom-compile-command", "make lock",  # not the temporary constraints file's path
    ]  # fmt: skip
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        if is_component(lock):
            constraints.write("".join(f"{name}=={version}\n" for name, (version, _) in pins(KIT_LOCK).items()))
            constraints.flush()
            command += ["--constraint", constraints.name]
        subprocess.run(command, input="\n".join(inputs) + "\n", text=True, cwd=ROOT, check=True)
    print(f"locked {lock.relative_to(ROOT)}")


def is_component(lock: Path) -> bool:
    """Whether `lock` is a component image's: built on the step kit's layer."""
    not_components = ("worker", "stepkit")
    return lock.name == "requirements.lock" and lock.parent.parent == ROOT and lock.parent.name not in not_components


def pins(lock: Path) -> dict[str, tuple[str, int]]:
    """Package -> (pinned version, number of hashes) of a lock file."""
    found: dict[str, tuple[str, int]] = {}
    name = None
    for line in lock.read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            spec = line.split(" ;")[0].split(" \\")[0].strip()
            name, version = spec.split("==")
            found[canonicalize_name(name)] = (version, 0)
        elif "--hash=sha256:" in line and name:
            version, hashes = found[canonicalize_name(name)]
            found[canonicalize_name(name)] = (version, hashes + 1)
    return found


def stale(inputs: list[str], lock: Path) -> list[str]:
    """Why `lock` no longer fits `inputs`; empty if it does."""
    if not lock.is_file():
        return [f"{lock.relative_to(ROOT)} is missing"]
    locked = pins(lock)
    problems = []
    for text in inputs:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name not in locked:
            problems.append(f"{requirement} is not in the lock")
        elif not requirement.specifier.contains(locked[name][0], prereleases=True):
            problems.append(f"{requirement} does not admit the locked {name}=={locked[name][0]}")
    problems += [f"{name} has no hash" for name, (_, hashes) in locked.items() if hashes == 0]
    if is_component(lock) and KIT_LOCK.is_file():  # else its layer reinstalls what the kit's holds
        kit = {name: version for name, (version, _) in pins(KIT_LOCK).items()}
        problems += [
            f"{name}=={locked[name][0]} is not the step kit's {name}=={version}"
            for name, version in kit.items()
            if name in locked and locked[name][0] != version
        ]
    return [f"{lock.relative_to(ROOT)}: {p}" for p in problems]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale locks, change nothing")
    parser.add_argument("--only", metavar="DIRECTORY", help="lock one image, e.g. a new component")
    args = parser.parse_args()
    if args.only:
        lock = ROOT / args.only / "requirements.lock"
        compile_lock(image_inputs()[lock], lock)
        return
    locks = {**image_inputs(), DEV_LOCK: dev_inputs()}
    if args.check:
        problems = [p for lock, inputs in locks.items() for p in stale(inputs, lock)]
        sys.exit("\n".join([*problems, "run `make lock`"]) if problems else 0)
    for lock, inputs in locks.items():
        compile_lock(inputs, lock)


if __name__ == "__main__":
    main()
