"""The same prefect.yaml deploys to a Kubernetes work pool (README, "Scaling out"): its deployments
carry only their image and parameters, and a kubernetes pool whose template sets the docker
template's command and environment renders each as a Job. No cluster: against a real Prefect API,
the Job is rendered as the kubernetes worker would submit it."""

import asyncio
import json
import uuid

import yaml
from prefect import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import FlowRun
from prefect.utilities.templating import apply_values
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from tests.harness import ROOT

POOL = "kubernetes-unit"
DOCKER = json.loads((ROOT / "pools" / "docker.json").read_text())["job_configuration"]
STORE = {"PIPELINE_DATA_URL": "s3://pipeline/data"}


def deployments(monkeypatch) -> list[dict]:
    """prefect.yaml's deployments as `FLOW_POOL=<it> SUBFLOW_POOL=<it> prefect deploy --all` reads them."""
    for name in ("FLOW_POOL", "SUBFLOW_POOL", "REMOTE_POOL"):
        monkeypatch.setenv(name, POOL)
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    return [
        apply_values(d, {"pinned": {"image": f"registry.example/{d['name']}@sha256:{'0' * 64}"}})
        for d in config["deployments"]
    ]


def test_every_deployment_goes_to_the_pool_the_environment_names_with_only_its_image(monkeypatch):
    found = deployments(monkeypatch)
    assert found and all(d["work_pool"]["name"] == POOL for d in found), [d["work_pool"] for d in found]
    assert all(set(d["work_pool"].get("job_variables", {})) == {"image"} for d in found)


def test_each_deployment_renders_as_a_kubernetes_job(prefect_api, monkeypatch):
    template = KubernetesWorker.get_default_base_job_template()
    defaults = template["variables"]["properties"]
    defaults["command"]["default"] = DOCKER["command"]
    defaults["env"]["default"] = STORE
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(name=POOL, type="kubernetes", base_job_template=template), overwrite=True
        )
        for spec in deployments(monkeypatch):
            flow_id = client.create_flow_from_name(spec["entrypoint"].rsplit(":", 1)[1])
            deployment_id = client.create_deployment(
                flow_id, spec["name"], work_pool_name=spec["work_pool"]["name"],
                job_variables=spec["work_pool"]["job_variables"], parameters=spec.get("parameters", {}),
            )  # fmt: skip
            deployment = client.read_deployment(deployment_id)
            run = FlowRun(id=uuid.uuid4(), name="rendered", flow_id=flow_id, deployment_id=deployment_id)
            container = asyncio.run(job(template, deployment, run))["spec"]["template"]["spec"]["containers"][0]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert container["image"] == spec["work_pool"]["job_variables"]["image"], spec["name"]
            assert container["args"] == DOCKER["command"].split()
            assert env["PIPELINE_DATA_URL"] == STORE["PIPELINE_DATA_URL"] and env["PREFECT__FLOW_RUN_ID"] == str(run.id)


async def job(template: dict, deployment, run: FlowRun) -> dict:
    """The Kubernetes Job a kubernetes worker would submit for `run`."""
    configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(template, deployment.job_variables)
    configuration.prepare_for_flow_run(run, deployment=deployment)
    return configuration.job_manifest
