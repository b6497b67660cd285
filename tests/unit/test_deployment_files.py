"""prefect.yaml and deployments/: they parse, name flows and configs that exist, and images that we build.
(That Prefect itself accepts every deployment is checked against a real server in tests/e2e/test_deployments.py.)"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from engine.config import RunParameters, load_config
from engine.resources import peak_gpus
from flows.cli import PIPELINES, build_parser
from flows.pipelines import FLOWS

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENTS = REPO / "deployments"
CLOUD_POOLS = {"kubernetes", "ecs", "cloud-run", "aci"}
PIPELINE_STAGES = {
    "grpo-pipeline": ["sft", "reward_model", "grpo", "evaluate"],
    "dpo-pipeline": ["sft", "dpo", "evaluate"],
}
POD_GPUS = {"kubernetes": "gpu_limit", "aci": "gpu_count"}  # the ecs and cloud-run pools' templates name no GPUs
IMAGE = re.compile(r"^(?:[\w.\-]+(?::\d+)?/)*posttrain:(cpu|cuda)$")


@pytest.fixture(scope="module")
def prefect_yaml() -> dict:
    return yaml.safe_load((REPO / "prefect.yaml").read_text())


def flow_of(entrypoint: str):
    path, name = entrypoint.split(":")
    assert (REPO / path).is_file(), entrypoint
    import importlib

    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, name)


def test_every_flow_has_a_local_deployment(prefect_yaml):
    local = {flow_of(d["entrypoint"]).name for d in prefect_yaml["deployments"] if d["name"] == "local"}
    assert local == set(FLOWS) == set(PIPELINES)


def test_deployments_point_at_flows_pools_and_validated_parameters(prefect_yaml):
    seen = set()
    for deployment in prefect_yaml["deployments"]:
        flow = flow_of(deployment["entrypoint"])
        key = f"{flow.name}/{deployment['name']}"
        assert key not in seen, f"duplicate deployment {key}"
        seen.add(key)
        assert deployment["enforce_parameter_schema"] is True
        pool = deployment["work_pool"]
        if pool["name"] == "local":
            assert "pull" not in deployment  # `prefect deploy` sets the working directory to the checkout
            continue
        assert pool["name"] in CLOUD_POOLS and pool["name"] == deployment["name"]
        assert IMAGE.match(pool["job_variables"]["image"]), pool["job_variables"]["image"]
        step = deployment["pull"][0]["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == "/opt/posttrain"  # where the Dockerfiles put the code
        params = RunParameters.model_validate(deployment["parameters"])
        assert params.resolve().model.name != "tiny"  # the GPU recipe exists, validates and names a real model
    assert {key.split("/")[1] for key in seen} == {"local"} | CLOUD_POOLS


def test_cloud_pods_hold_the_gpus_their_ray_reserves_or_drive_a_named_cluster(prefect_yaml):
    """No `ray.address: auto` in a pod without a Ray cluster; no 8 trainers on a 1-GPU pod."""
    for deployment in prefect_yaml["deployments"]:
        pool = deployment["work_pool"]
        if pool["name"] == "local":
            continue
        cfg = RunParameters.model_validate(deployment["parameters"]).resolve()
        variables = pool["job_variables"]
        pod_gpus = variables.get(POD_GPUS.get(pool["name"], ""), 0)
        where = f"{flow_of(deployment['entrypoint']).name}/{deployment['name']}"
        if cfg.ray.address == "local":  # Ray starts in the pod: the pod has what the busiest stage reserves
            stages = PIPELINE_STAGES[flow_of(deployment["entrypoint"]).name]
            assert pod_gpus == peak_gpus(cfg, stages) > 0, where
            assert cfg.ray.num_cpus <= variables["cpu"], where
        else:  # the stages run as Ray jobs on the named cluster; the pod only follows them
            assert cfg.ray.address.startswith("ray://") and cfg.ray.submission == "job", where
            assert pod_gpus == 0, where


def test_dockerfiles_copy_what_exists_and_install_torch_first():
    for kind in ("cpu", "cuda"):
        text = (DEPLOYMENTS / f"Dockerfile.{kind}").read_text()
        for line in text.splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), f"Dockerfile.{kind} copies missing {source}"
        runs = [line for line in text.splitlines() if line.startswith("RUN pip install")]
        assert runs[0].startswith("RUN pip install torch=="), f"Dockerfile.{kind}: torch must be installed first"
        assert runs[1].startswith("RUN pip install -e . -c constraints.txt"), f"Dockerfile.{kind}: the tested set"
        assert f"posttrain:{kind} ." in text  # the build command in its header names the image tag


def test_kubernetes_base_job_template_requests_gpus():
    template = json.loads((DEPLOYMENTS / "work-pools" / "kubernetes.json").read_text())
    variables = template["variables"]["properties"]
    assert {"image", "cpu_request", "memory_request", "gpu_limit", "shm_size"} <= set(variables)
    container = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_limit }}"
    rendered = json.dumps(template["job_configuration"])
    for name in re.findall(r"\{\{ (\w+) \}\}", rendered):
        assert name in variables, f"template uses undeclared variable {name}"


def _containers(manifest: dict) -> list[dict]:
    spec = manifest["spec"].get("rayClusterSpec", manifest["spec"])
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def test_kuberay_manifests_use_our_image_and_a_real_entrypoint():
    kinds = {}
    for path in sorted((DEPLOYMENTS / "kuberay").glob("*.yaml")):
        manifest = yaml.safe_load(path.read_text())
        kinds[manifest["kind"]] = manifest
        assert manifest["apiVersion"] == "ray.io/v1"
        for container in _containers(manifest):
            assert IMAGE.match(container["image"]), (path.name, container["image"])
            assert container["workingDir"] == "/opt/posttrain"
    assert set(kinds) == {"RayCluster", "RayJob"}
    argv = shlex.split(kinds["RayJob"]["spec"]["entrypoint"])
    assert argv[0] == "posttrain"
    args = build_parser().parse_args(argv[1:])
    assert args.pipeline in PIPELINES
    load_config(args.config, dict(item.split("=", 1) for item in args.set))


def test_slurm_script_is_valid_bash_and_runs_the_cli():
    script = DEPLOYMENTS / "slurm" / "posttrain.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "#SBATCH --nodes" in text and 'ray" start --head' in text
    assert re.search(r"posttrain\" run \"\$PIPELINE\" --config \"\$CONFIG\" --set ray.address=auto", text)
    default_config = re.search(r"CONFIG=\$\{2:-([^}]+)\}", text).group(1)
    assert (REPO / default_config).is_file()
