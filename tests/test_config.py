"""Static checks of the platform's configuration: pins, ports, tags."""

import re
import tomllib

import yaml
from e2e import ROOT, dotenv


def test_one_prefect_version_everywhere():
    env = dotenv()
    version = re.fullmatch(r"prefecthq/prefect:(\d+\.\d+\.\d+)-python3\.11", env["PREFECT_IMAGE"])
    assert version, env["PREFECT_IMAGE"]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"prefect=={version.group(1)}" in deps
    assert f"prefect-docker=={env['PREFECT_DOCKER_VERSION']}" in deps
    prefect_yaml = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert prefect_yaml["prefect-version"] == version.group(1)
    # Every image is FROM the pin in .env, never a version of its own.
    for dockerfile in ROOT.glob("*/Dockerfile"):
        assert "FROM ${PREFECT_IMAGE}" in dockerfile.read_text(), dockerfile


def test_published_ports_bind_to_loopback():
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    ports = [p for s in services.values() for p in s.get("ports", [])]
    assert ports and all(p.startswith("127.0.0.1:") for p in ports), ports


def test_every_deployment_builds_pushes_and_tags_by_content():
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert "push_docker_image" in str(config["push"])
    for deployment in config["deployments"]:
        steps = {
            name.rsplit(".", 1)[1]: args for s in deployment["build"] for name, args in s.items()
        }
        image = steps["build_docker_image"]
        assert image["tag"] == "{{ content-hash.stdout }}", deployment["name"]
        assert (ROOT / image["path"] / image["dockerfile"]).is_file(), deployment["name"]
        assert deployment["work_pool"]["job_variables"]["image"] == "{{ build-image.image }}"
