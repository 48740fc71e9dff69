"""Safe by default, on real Docker: least-privilege flow containers, a pool template that runs
cannot widen, an authenticated API, UI and registry, and no secret where it should not be."""

import base64
import json
import shutil
import subprocess
import uuid
from pathlib import PurePosixPath

import httpx
import pytest
from prefect.client.schemas.actions import WorkPoolUpdate

from stepkit import dataset_of
from tests.harness import CI, PREFECT, ROOT, SETTINGS, Stack, wait_for

pytestmark = pytest.mark.e2e
# Headless, and quiet: without the background-networking flags Chromium keeps dialling Google.
CHROMIUM = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--window-size=1400,1000", "--disable-background-networking", "--disable-component-update",
            "--disable-sync")  # fmt: skip


def inspect(stack, run_id) -> dict:
    """`docker inspect` of a flow run's container, caught while it runs."""
    (container,) = wait_for("the run's container", lambda: stack.containers(run_id, running=True), 120)
    return json.loads(stack.sh("docker", "inspect", container).stdout)[0]


def beside(ref: dict, name: str) -> str:
    """A directory in the run directory of `ref`: where a step run by hand on it may write."""
    return f"{ref['uri'].rsplit('/', 1)[0]}/{name}"


@pytest.fixture(scope="module")
def pipelines(stack) -> list:
    """Two pipeline runs: the first computes, the second (the same input) reuses every step."""
    runs = [stack.run("main-flow/main") for _ in range(2)]
    assert all(run.state.is_completed() for run in runs), [run.state for run in runs]
    return runs


@pytest.fixture(scope="module")
def stored_input(stack, pipelines) -> dict:
    return stack.output(pipelines[0])["input"]


def platform(stack, other) -> dict:
    """What an attack on the platform would change: another run, the pipeline, pools, blocks."""
    with stack.api() as client:
        run = client.read_flow_run(other.id)
        return {
            "other run": (run.name, run.state.type, run.state.message, run.infrastructure_pid, run.job_variables),
            "steps": client.read_variable_by_name("pipeline-steps-main").value,
            "variables": sorted(v.name for v in client.read_variables()),
            "pools": {p.name: p.base_job_template for p in client.read_work_pools()},
            "deployments": sorted(str(d.id) for d in client.read_deployments()),
            "automations": len(client.read_automations()),
            "runs named gateway": len([r for r in client.read_flow_runs() if r.name == "gateway"]),
        }


def test_a_compromised_step_touches_only_its_own_run(stack, pipelines, stored_input):
    """A step's container runs with least privilege and its own run's credential; a script with
    only what it holds (tests/attacks.py: its image, network, user, environment and mounts) is
    refused every attack of README's *Security* table, and nothing on the platform changes."""
    first, other = pipelines
    out = beside(stored_input, "priv")
    run = stack.start("subflow/subflow", data=stored_input, out=out)
    info = inspect(stack, run.id)
    host = info["HostConfig"]
    env = dict(item.split("=", 1) for item in info["Config"]["Env"])
    assert stack.secret("api-auth-string") not in json.dumps(info)  # its own run's credential only:
    assert env["PREFECT_API_AUTH_STRING"].startswith(f"{run.id}:") and "PIPELINE_CACHE_KEY" not in env
    assert env["PREFECT_API_URL"].endswith(":4201/api")  # the gateway's flow listener: the authority
    assert env["COMPONENT_IMAGE"] == info["Config"]["Image"]  # what the worker ran, not what a caller said
    assert info["Name"] == f"/flow-{run.id}"  # named by the worker, never by the run
    for network in info["NetworkSettings"]["Networks"].values():
        assert set(network["Aliases"] or []) <= {f"flow-{run.id}", info["Id"][:12]}, network["Aliases"]
    assert info["Config"]["User"] == f"{SETTINGS['FLOW_UID']}:{SETTINGS['FLOW_UID']}"
    assert host["CapDrop"] == ["ALL"] and not host["CapAdd"]
    assert host["SecurityOpt"] == ["no-new-privileges:true"]
    assert host["ReadonlyRootfs"] is True and "/tmp" in host["Tmpfs"]
    assert host["Memory"] == host["MemorySwap"] == 1 << 30  # 1g, and no swap beyond it
    assert host["NanoCpus"] == 10**9 and host["PidsLimit"] == 512
    assert host["Privileged"] is False
    assert host["LogConfig"] == {"Type": "json-file", "Config": {"max-file": "2", "max-size": "10m"}}
    store = stack.data_url().removeprefix("file://")
    mounted = {bind.split(":")[1].removeprefix(f"{store}/"): bind.split(":")[2] for bind in host["Binds"]}
    parts = [part["uri"].removeprefix(f"{stack.data_url()}/") for part in stored_input.get("parts", [stored_input])]
    assert mounted == {out.removeprefix(f"{stack.data_url()}/"): "rw", **{part: "ro" for part in parts}}
    assert stack.wait_final(run.id).state.is_completed()

    before = platform(stack, other)
    binds = [a for bind in host["Binds"] for a in ("-v", bind)]
    user = ("-u", info["Config"]["User"], "--network", host["NetworkMode"], "--read-only", "--tmpfs", "/tmp")
    args = [a for item in info["Config"]["Env"] for a in ("-e", item)]
    their_file = stack.layout(other.id).output.removeprefix("file://")
    attack = (stack.env()["SUBFLOW_POOL"], str(other.id), str(first.deployment_id), their_file)
    script = (ROOT / "tests" / "attacks.py").read_text()
    image = info["Config"]["Image"]
    probe = stack.sh("docker", "run", "--rm", *user, *args, *binds, image, "python", "-c", script, *attack)
    dirs = {"runs", *(str(p) for path in mounted for p in PurePosixPath(path).parents if str(p) != ".")}
    assert json.loads(probe.stdout) == {
        "own run": 200, "another run": 403, "every run's parameters": 403, "rename another run": 403,
        "repoint another run's container": 403, "complete another run": 403, "start a run named gateway": 403,
        "own run's image": 403, "registry password": 403, "write pool": 403, "create work pool": 403,
        "create deployment": 403, "write automation": 403, "rewrite the steps": 403,
        "another run's variable": 403, "a variable of any name": 403,
        "admin listener": 401, "server itself": "ConnectError",
        "worker channel": "refused: HTTP 403", "worker channel, admin listener": "refused: closed 1008",
        "heartbeat with no credential": "refused: closed 1008",
        "heartbeat with no credential, admin listener": "refused: closed 1008",
        "another run's heartbeat": "refused: closed 1008",
        "store": sorted(dirs | {out.removeprefix(f"{stack.data_url()}/")}),
        "read another run's file": False, "forge a cache entry": "FileNotFoundError", "environment": [],
    }, probe.stdout  # fmt: skip
    assert platform(stack, other) == before


@pytest.mark.parametrize(
    "job_variables, violation",
    [
        ({"mem_limit": "0"}, "mem_limit '0' outside"),
        ({"nano_cpus": 64 * 10**9, "pids_limit": 10**6}, "nano_cpus 64000000000 outside"),
        ({"env": {"PYTHONWARNINGS": "ignore", "BROWSER": "sh"}}, "not in the pool's list: BROWSER, PYTHONWARNINGS"),
        ({"image": "evil.example/miner:1"}, "image 'evil.example/miner:1' is not from the registry"),
    ],
)
def test_a_raw_api_run_outside_the_policy_crashes_without_a_container(stack, job_variables, violation):
    """POST /flow_runs/ skips the server's validation of job variables: the worker refuses."""
    deployment = stack.deployment("subflow/subflow")
    with stack.api() as client:
        ids = {
            "flow_id": str(deployment.flow_id),
            "deployment_id": str(deployment.id),
            "work_pool_name": deployment.work_pool_name,
        }
        body = {**ids, "job_variables": job_variables, "parameters": {}, "state": {"type": "SCHEDULED"}}
        created = client.request("POST", "/flow_runs/", json=body).json()
    run = stack.wait_final(created["id"], timeout=120)
    assert run.state.is_crashed() and violation in run.state.message, run.state
    assert not stack.containers(run.id)


def test_steps_and_the_main_flow_refuse_references_and_images_from_elsewhere(stack, stored_input):
    """A step is given nothing outside its pipeline's part of the store (here the API itself, as a
    part of a dataset, or an output in another run's directory): its worker refuses to start it.
    The main flow replays no such input and runs no image of another registry."""
    probe = dataset_of([stored_input, {**stored_input, "uri": "http://gateway:4201/api/health"}])
    read = stack.run("subflow/subflow", data=probe, out=beside(stored_input, "probe"))
    assert read.state.is_crashed() and "'http://gateway:4201/api/health' is not in the data store" in read.state.message
    replay = stack.run("main-flow/main", data=probe)
    assert replay.state.is_failed() and "reference refused: http://gateway:4201/api/health" in replay.state.message
    assert stack.children(replay.id) == []
    other = stack.layout(uuid.uuid4()).step("subflow")
    write = stack.run("subflow/subflow", data=stored_input, out=other)
    assert write.state.is_crashed() and "is not in the directory of its main run" in write.state.message, write.state
    assert not stack.exists(other) and not stack.containers(read.id) and not stack.containers(write.id)
    foreign = stack.run("main-flow/main", images={"subflow/subflow": "evil.example/miner:1"})
    assert (
        foreign.state.is_failed()
        and "['evil.example/miner:1'] are not of this platform's registry" in foreign.state.message
    )


def test_a_pool_template_rewritten_through_the_api_crashes_the_run(stack, stored_input):
    pool = stack.env()["SUBFLOW_POOL"]
    with stack.api() as client:
        template = client.read_work_pool(pool).base_job_template
        hostile = json.loads(json.dumps(template))
        hostile["job_configuration"].update(privileged=True, volumes=["/:/host"])
        client.update_work_pool(pool, WorkPoolUpdate(base_job_template=hostile))
    try:
        run = stack.run("subflow/subflow", data=stored_input, out=beside(stored_input, "tpl"))
    finally:
        with stack.api() as client:
            client.update_work_pool(pool, WorkPoolUpdate(base_job_template=template))
    # Its volumes are the worker's own choice (the run's part of the store): the template's are never used.
    assert run.state.is_crashed() and run.state.message.endswith("refused by pools/policy.json: privileged"), run.state
    assert not stack.containers(run.id)


def test_a_run_cannot_widen_the_pool_template(stack, stored_input):
    """Only what the template exposes as variables is overridable: the rest is ignored."""
    unsafe = {
        "privileged": True,
        "volumes": ["/:/host"],
        "command": "sleep 600",
        "network_mode": "host",
        "container_create_kwargs": {"cap_add": ["SYS_ADMIN"], "user": "root"},
    }
    run = stack.start("subflow/subflow", job_variables=unsafe, data=stored_input, out=beside(stored_input, "x"))
    info = inspect(stack, run.id)
    host = info["HostConfig"]
    assert (
        host["Privileged"] is False
        and not host["CapAdd"]
        and info["Config"]["User"] == f"{SETTINGS['FLOW_UID']}:{SETTINGS['FLOW_UID']}"
    )
    assert not [bind for bind in host["Binds"] if not bind.startswith(f"{stack.volume_dir('data')}/runs/")]
    assert host["NetworkMode"] == f"{stack.project}_default"
    assert info["Config"]["Cmd"] == ["python", "-m", "prefect.engine"]
    assert stack.wait_final(run.id).state.is_completed()


def test_the_api_refuses_requests_without_the_auth_string(stack):
    assert httpx.get(f"{stack.api_url}/health").status_code == 200  # probes need no credentials
    assert httpx.get(f"{stack.api_url}/admin/version").status_code == 401
    wrong = base64.b64encode(b"admin:wrong").decode()
    assert httpx.get(f"{stack.api_url}/admin/version", headers={"Authorization": f"Basic {wrong}"}).status_code == 401
    cli = stack.sh(PREFECT, "deployment", "ls", check=False, PREFECT_API_AUTH_STRING="admin:wrong")
    assert cli.returncode != 0 and "401" in cli.stdout + cli.stderr


def test_csrf_and_cors_protect_the_browser_path(stack):
    auth = {"Authorization": "Basic " + base64.b64encode(stack.secret("api-auth-string").encode()).decode()}
    changed = httpx.post(f"{stack.api_url}/variables/", headers=auth, json={"name": "csrf-probe", "value": 1})
    assert changed.status_code == 403 and "CSRF" in changed.text  # no token, no change
    origin = f"http://localhost:{stack.prefect_port}"
    for allowed, sent in ((True, origin), (False, "http://evil.example")):
        preflight = httpx.options(
            f"{stack.api_url}/flows/filter",
            headers={"Origin": sent, "Access-Control-Request-Method": "POST"},
        )
        assert (preflight.headers.get("access-control-allow-origin") == sent) is allowed, preflight.headers


def test_the_registry_refuses_anonymous_pulls_and_pushes(stack, tmp_path):
    assert httpx.get(f"http://127.0.0.1:{stack.registry_port}/v2/_catalog").status_code == 401
    image = f"{stack.registry}/anonymous:push"  # any local image, tagged for the registry: push needs one
    stack.sh("docker", "tag", SETTINGS["PREFECT_IMAGE"], image)
    try:  # an empty client configuration: no stored login, whatever the host has
        push = stack.sh("docker", "--config", str(tmp_path), "push", image, check=False)
    finally:
        stack.sh("docker", "image", "rm", image)
    assert push.returncode != 0 and "no basic auth credentials" in push.stdout + push.stderr, push


def test_a_registry_that_refuses_credentials_crashes_the_run_with_the_cause(stack):
    """Workers read the registry's password from the stack's secrets for each pull."""
    password = "/secrets/registry-password"
    stack.on_volume("secrets", "sh", "-c", f"echo wrong > {password}", write_as="0")
    stack.forget_image("subflow/subflow")
    try:
        run = stack.run("main-flow/main", steps=[{"step": "subflow/subflow", "retries": 0}])
    finally:
        stack.on_volume("secrets", "sh", "-c", f"echo '{stack.secret('registry-password')}' > {password}", write_as="0")
    child = stack.child(run.id, "subflow")
    assert child.state.is_crashed() and "401" in child.state.message, child.state
    assert run.state.is_failed() and "ended Crashed" in run.state.message
    again = stack.run("main-flow/main", steps=["subflow/subflow"])  # with the right password, it pulls again
    assert again.state.is_completed(), again.state


def test_no_secret_in_images_templates_or_deployments(stack):
    """Every secret the stack generated (its ./.secrets copy), in full and by its password part."""
    secrets = {path.name: path.read_text().strip() for path in (ROOT / ".secrets" / stack.project).iterdir()}
    assert {"api-auth-string", "flow-run-key", "cache-key", "postgres-password", "registry-password"} <= set(secrets)
    needles = {value.split(":", 1)[-1] for value in secrets.values()}  # user:password: the password alone too
    with stack.api() as client:
        pools = [client.read_work_pool(stack.env()[p]).base_job_template for p in ("FLOW_POOL", "SUBFLOW_POOL")]
        deployments = [d.model_dump(mode="json") for d in client.read_deployments()]
    images = [d["job_variables"]["image"] for d in deployments if "image" in d["job_variables"]]
    images.append(f"{stack.project}/worker:{stack.env()['PREFECT_VERSION']}")
    inspected = stack.sh("docker", "image", "inspect", *set(images)).stdout
    seen = json.dumps(pools) + json.dumps(deployments) + inspected
    assert [name for name, value in secrets.items() if value.split(":", 1)[-1] in seen] == []
    grep = ["git", "grep", "-l", "-F", *(a for needle in sorted(needles) for a in ("-e", needle))]
    tracked = subprocess.run(grep, cwd=ROOT, capture_output=True)
    assert tracked.returncode == 1, tracked.stdout  # in no tracked file


def test_the_secrets_live_with_the_stack_not_the_clone(tmp_path):
    """A second clone, without ./.secrets, starts the same stack; a database whose secrets are gone
    is refused by name, instead of meeting a new password it cannot open."""
    own = Stack("modular-pipeline-secrets", prefect_port=14300, registry_port=15100)
    clone = tmp_path / "clone"
    for name in ("docker-compose.yml", ".env", "tools", "worker", "gateway", ".secrets/.gitignore"):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy)(ROOT / name, clone / name)
    mirrors = [ROOT / ".secrets" / own.project, clone / ".secrets" / own.project]
    own.down()
    try:
        own.compose("up", "-d", "--build", "--wait", "postgres")  # its secrets made, its database made with them
        auth = own.secret("api-auth-string")
        own.compose("down")
        own.compose("up", "-d", "--build", "--wait", "gateway", cwd=clone)  # the whole API, from the clone
        assert (mirrors[1] / "api-auth-string").read_text().strip() == auth
        with own.api() as client:
            assert client.read_flows() == []  # the server opened its database; the gateway takes the auth string

        own.compose("down", cwd=clone)
        own.sh("docker", "volume", "rm", f"{own.project}_secrets")
        for mirror in mirrors:
            shutil.rmtree(mirror)
        assert own.compose("up", "-d", "--wait", "postgres", check=False).returncode != 0
        logs = own.compose("logs", "--no-log-prefix", "secrets").stdout
        assert f"the stack's database (volume {own.project}_postgres-data) exists but its secrets are gone" in logs
        assert not mirrors[0].exists()  # and no new secrets were made
    finally:
        own.down()
        for mirror in mirrors:
            shutil.rmtree(mirror, ignore_errors=True)


def test_the_ui_works_in_a_real_browser_after_login(stack, pipelines, tmp_path):
    """The module's pipeline runs, listed in the UI after logging in with the auth string."""
    if not shutil.which("chromium") or not shutil.which("chromedriver"):
        if CI:
            pytest.fail("CI=true but Chromium is missing: .ci/run installs chromium and chromium-driver")
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    # Removing a container deletes its veth; Chromium aborts loads on any host network change.
    flows = ("docker", "ps", "-aq", "--filter", "label=io.prefect.flow-run-id")
    wait_for("no flow container left", lambda: not stack.sh(*flows).stdout.strip(), 60)
    options = webdriver.ChromeOptions()
    for flag in CHROMIUM:
        options.add_argument(flag)
    for attempt in range(3):
        browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        try:
            wait = WebDriverWait(browser, 60)
            browser.get(f"http://localhost:{stack.prefect_port}/")
            password = wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, "input[type=password]")))
            assert "login" in browser.current_url
            password.send_keys(stack.secret("api-auth-string"), Keys.ENTER)
            wait.until(seen.text_to_be_present_in_element((By.TAG_NAME, "body"), stack.env()["SUBFLOW_POOL"]))
            assert "dashboard" in browser.current_url
            browser.get(f"http://localhost:{stack.prefect_port}/runs")
            wait.until(seen.text_to_be_present_in_element((By.TAG_NAME, "body"), "main-flow"))
            assert "validate" in browser.find_element(By.TAG_NAME, "body").text
            return
        except Exception as exc:
            browser.save_screenshot(str(tmp_path / f"ui-{attempt}.png"))
            console = "\n".join(entry["message"] for entry in browser.get_log("browser"))
            if "ERR_NETWORK_CHANGED" in console and attempt < 2:
                continue  # another engine's container came or went mid-load: not the UI's fault
            page = browser.find_element(By.TAG_NAME, "body").text[:2000]
            raise AssertionError(f"{browser.current_url}\n{page}\n{console}") from exc
        finally:
            browser.quit()
