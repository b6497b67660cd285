"""Hermetic settings and shared fixtures: every service a test needs is started here, on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="posttrain-tests-"))
HERMETIC_ENV = {
    "PREFECT_HOME": str(_SESSION_DIR / "prefect"),
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
os.environ.update(HERMETIC_ENV)
for _unset in ("PREFECT_API_URL", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
    os.environ.pop(_unset, None)

REPO = Path(__file__).resolve().parents[1]
POSTTRAIN = str(Path(sys.executable).parent / "posttrain")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists() or shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where torch sees CUDA and are skipped where the machine has no NVIDIA driver; a machine with
    a driver but a torch that cannot use it fails them, since skipping would hide a broken install."""
    import torch

    if torch.cuda.is_available():
        return
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not _nvidia_driver():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device (this machine has no NVIDIA driver)"))
        return
    reason = f"an NVIDIA driver is present but torch {torch.__version__} cannot use CUDA: install a CUDA build of torch"
    for item in gpu_items:
        item.stash[_BROKEN_CUDA] = reason


_BROKEN_CUDA = pytest.StashKey[str]()


def pytest_runtest_setup(item):
    if _BROKEN_CUDA in item.stash:
        pytest.fail(item.stash[_BROKEN_CUDA], pytrace=False)


def require_tool(path: str | None, what: str, install: str) -> str:
    """The path of a tool a test needs, or a failure naming the install step (a missing tool is not a skip)."""
    if not path:
        pytest.fail(f"{what} not found: {install}", pytrace=False)
    return path


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a real HTTP S3 API): (endpoint, pid); stopped by PID at the end."""
    port = free_port()
    moto = require_tool(
        shutil.which("moto_server", path=str(Path(sys.executable).parent)),
        "moto_server",
        "run `make setup` (pip install -e '.[test]')",
    )
    proc = subprocess.Popen(
        [moto, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.2)
    else:
        proc.kill()
        raise RuntimeError("moto_server did not start")
    yield endpoint, proc.pid
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_endpoint(s3_server):
    return s3_server[0]


@pytest.fixture
def s3_bucket(s3_endpoint):
    import uuid

    import boto3

    name = f"posttrain-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from engine.config import TinyModelConfig
    from engine.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), TinyModelConfig())


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for every in-process integration test (the CLI tests start their own)."""
    from engine import cluster
    from engine.config import RayConfig

    cluster.connect(RayConfig(num_cpus=6))
    yield
    cluster.shutdown()


def run_cli(args: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [POSTTRAIN, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
