"""`prefect deploy` steps: the image name and content tag of one component (build), and the
digest the registry gave the pushed image (push), which the deployment then runs.

    build:
      - tools/deploy/image_tag.py:image_tag: {id: component, directory: subflow}
    push:
      - tools/deploy/image_tag.py:image_digest: {id: pinned, image: "{{ build-image.image }}"}

The tag is a hash of what the image is made of: the component's files and the step kit's
(stepkit/) that the build context really holds (docker-py's own reading of .dockerignore), the
shared recipe and its build args (the base-image pin and the flows' user). So a kit change
retags every component, and each is rebuilt when it is next deployed.
Same content, same tag, nothing to rebuild; any change, a new tag, so no worker ever runs a stale
image. Pure Python, so it gives the same tag on Linux, macOS and Windows.
"""

import hashlib
import os
import sys
from pathlib import Path
from typing import TypedDict

import docker
from docker.utils.build import exclude_paths

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "component.Dockerfile"
KIT = "stepkit"  # copied into every component image by the recipe
BUILD_ARGS = ("PREFECT_IMAGE", "FLOW_UID")  # what prefect.yaml passes the recipe from .env


class ImageTag(TypedDict):
    directory: str
    image_name: str
    tag: str


def image_tag(directory: str) -> ImageTag:
    """The image name and content tag of the component in `directory` (of the project)."""
    missing = [name for name in ("REGISTRY", *BUILD_ARGS) if not os.environ.get(name)]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: load .env first (see README, host CLI)")
    return ImageTag(
        directory=directory,
        image_name=f"{os.environ['REGISTRY']}/{directory}",
        tag=content_hash(ROOT / directory, [os.environ[name] for name in BUILD_ARGS]),
    )


def content_hash(directory: Path, build_args: list[str]) -> str:
    """12 hex digits of sha256 over the component's and the kit's context files, the recipe and its
    build args."""
    if not (directory / "requirements.lock").is_file():
        raise FileNotFoundError(f"{directory} is not a component: it has no requirements.lock")
    patterns = (ROOT / ".dockerignore").read_text().splitlines()
    prefixes = (f"{directory.relative_to(ROOT).as_posix()}/", f"{KIT}/")
    files = sorted(
        Path(f).as_posix() for f in exclude_paths(str(ROOT), patterns) if Path(f).as_posix().startswith(prefixes)
    )
    digest = hashlib.sha256("\0".join(build_args).encode() + b"\0" + RECIPE.read_bytes())
    for name in files:
        path = ROOT / name
        if path.is_file():
            # Names with forward slashes and file bytes as they are: the same on every OS.
            digest.update(b"\0" + name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


class PinnedImage(TypedDict):
    image: str


def image_digest(image: str) -> PinnedImage:
    """`image` (repository:tag, just pushed) as repository@sha256:..., the registry's digest: what
    runs can never change under the deployment, whatever is pushed to the tag later."""
    repository = image.rsplit(":", 1)[0]
    digests = docker.from_env().images.get(image).attrs.get("RepoDigests") or []
    pinned = [d for d in digests if d.startswith(f"{repository}@sha256:")]
    if not pinned:
        raise RuntimeError(f"{image} has no digest from {repository.split('/')[0]}: push it first")
    return PinnedImage(image=pinned[0])


if __name__ == "__main__":
    print(image_tag(sys.argv[1])["tag"])
