"""Hermetic settings and shared fixtures: every service a test needs is started here, on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

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
    # gcsfs asks GCS's gRPC control plane for each bucket's layout; an emulator has none and each ask waits 60 s
    "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
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


@contextlib.contextmanager
def serving(command: list[str], port: int, timeout_s: float = 30.0) -> Iterator[subprocess.Popen]:
    """``command`` running while open, from when it accepts connections on 127.0.0.1:``port``; stopped by PID."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{Path(command[0]).name} did not start on port {port}") from None
            time.sleep(0.2)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # Azurite (node) can take longer to stop on SIGTERM than a test run waits
            proc.kill()
            proc.wait(timeout=10)


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
    with serving([moto, "-H", "127.0.0.1", "-p", str(port)], port) as proc:
        yield f"http://127.0.0.1:{port}", proc.pid


@pytest.fixture(scope="session")
def gcs_endpoint():
    """A GCS emulator (gcp-storage-emulator, in memory) on 127.0.0.1: gs:// stores reach it through gcsfs."""
    emulator = require_tool(
        shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent)),
        "gcp-storage-emulator",
        "run `make setup` (pip install -e '.[test]')",
    )
    port = free_port()
    with serving([emulator, "start", "--host=127.0.0.1", f"--port={port}", "--in-memory"], port):
        yield f"http://127.0.0.1:{port}"


# Azurite's documented development account (public, the same in every Azurite)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


@pytest.fixture(scope="session")
def azurite_connection_string():
    """Azurite's blob service (npm, in memory) on 127.0.0.1: az:// stores reach it through adlfs."""
    azurite = Path(sys.executable).parent.parent / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    azurite = require_tool(str(azurite) if azurite.exists() else None, "azurite-blob", "run `make azurite` (npm)")
    port = free_port()
    flags = ["--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence", "--skipApiVersionCheck"]
    with serving([azurite, *flags, "--loose", "--silent"], port):
        yield (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT};"
        )


@pytest.fixture(params=["gs", "az"])
def object_store(request) -> SimpleNamespace:
    """A GCS or Azure Blob emulator: its URI scheme, the ``storage.options`` that reach it, a fresh bucket in it."""
    import uuid

    import fsspec

    if request.param == "gs":
        options = {"endpoint_url": request.getfixturevalue("gcs_endpoint"), "token": "anon"}
    else:
        options = {"connection_string": request.getfixturevalue("azurite_connection_string")}
    bucket = f"posttrain-{uuid.uuid4().hex[:10]}"
    fsspec.filesystem(request.param, **options).mkdir(bucket)
    return SimpleNamespace(scheme=request.param, options=options, bucket=bucket)


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


def connect_embedded_ray() -> None:
    """The embedded Ray every in-process integration test shares (6 logical CPUs on 2 cores)."""
    from engine import cluster
    from engine.config import RayConfig

    cluster.connect(RayConfig(num_cpus=6))


@contextlib.contextmanager
def multinode_cluster(
    scratch: dict[str, Path], node_env: dict[str, dict[str, str]] | None = None
) -> Iterator[SimpleNamespace]:
    """Ray's own multi-node test cluster on 127.0.0.1: a head with no CPUs (the controller's) and, per entry of
    ``scratch``, a one-CPU worker node with that scratch root (``POSTTRAIN_SCRATCH``), a resource ``node_<name>`` and
    the environment ``node_env[name]``. Yields its ``address``, ``cluster`` and worker ``nodes`` by name; everything is
    stopped on the way out."""
    from ray.cluster_utils import Cluster

    from engine import cluster

    for key, value in cluster.LOCAL_RAY_ENV.items():  # loopback only, as the embedded Ray (the CLI inherits them)
        os.environ.setdefault(key, value)
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    try:
        workers = {
            name: nodes.add_node(
                num_cpus=1,
                resources={f"node_{name}": 1},
                node_ip_address="127.0.0.1",
                env_vars={"POSTTRAIN_SCRATCH": str(root), **(node_env or {}).get(name, {})},
            )
            for name, root in scratch.items()
        }
        yield SimpleNamespace(address=nodes.address, cluster=nodes, nodes=workers)
    finally:
        nodes.shutdown()


def files_under(root: Path) -> list[str]:
    """The files below ``root`` (none if it does not exist), as sorted relative paths: what a node's scratch holds."""
    return sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray for every in-process integration test (the CLI tests start their own)."""
    from engine import cluster

    connect_embedded_ray()
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
