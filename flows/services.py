"""`posttrain server up|down|status`: a local Prefect server, a `local` process work pool with its worker,
and an MLflow server, all on 127.0.0.1, started in their own sessions and stopped by the PIDs recorded here.

State lives in ``<workdir>/services``: one ``<name>.pid`` and ``<name>.log`` per process, and ``env`` with the
variables a shell needs to talk to them (``source .posttrain/services/env``).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine.errors import PosttrainError
from tasks.prefect_api import answers

HOST = "127.0.0.1"
WORK_POOL = "local"
SERVICES = ("prefect-server", "mlflow-server", "prefect-worker")  # started in this order, stopped in reverse


@dataclass(frozen=True)
class Ports:
    prefect: int = 4200
    mlflow: int = 5000

    @property
    def prefect_api(self) -> str:
        return f"http://{HOST}:{self.prefect}/api"

    @property
    def prefect_ui(self) -> str:
        return f"http://{HOST}:{self.prefect}"

    @property
    def mlflow_ui(self) -> str:
        return f"http://{HOST}:{self.mlflow}"


def state_dir(workdir: str | Path) -> Path:
    return Path(workdir).expanduser().resolve() / "services"


def _bin(name: str) -> str:
    """A console script of this environment (the venv's, not whatever is first on PATH)."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else (shutil.which(name) or name)


def _alive(pid: int) -> bool:
    """Running, not just present: a service stopped after its parent exited stays a zombie until init reaps it, and
    in a container whose PID 1 does not reap, that is forever."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not Path("/proc").is_dir():  # no procfs (macOS): the signal is all there is to go by
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:  # gone meanwhile
        return False
    return state != "Z"


def _pid(directory: Path, name: str) -> int | None:
    path = directory / f"{name}.pid"
    if not path.exists():
        return None
    pid = int(path.read_text())
    return pid if _alive(pid) else None


def _start(directory: Path, name: str, command: list[str], env: dict[str, str]) -> int:
    log = open(directory / f"{name}.log", "ab")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    (directory / f"{name}.pid").write_text(str(process.pid))
    return process.pid


def _wait_healthy(url: str, name: str, directory: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _pid(directory, name) is None:
            raise PosttrainError(f"{name} exited while starting; see {directory / (name + '.log')}")
        if answers(url):
            return
        time.sleep(0.5)
    raise PosttrainError(f"{name} did not answer {url} within {timeout_s:.0f}s; see {directory / (name + '.log')}")


def service_env(ports: Ports) -> dict[str, str]:
    """What a client of these services needs (no secrets: the servers are local and unauthenticated)."""
    return {"PREFECT_API_URL": ports.prefect_api, "MLFLOW_TRACKING_URI": ports.mlflow_ui}


def up(workdir: str | Path, ports: Ports, worker: bool = True) -> dict[str, str]:
    """Start the servers (and the worker), wait until they answer, and return their URLs. If any of them fails
    to start, the ones already started are stopped again."""
    running = [name for name, pid in status(workdir).items() if pid is not None]
    if running:
        raise PosttrainError(f"already running: {', '.join(running)}; run: posttrain server down")
    try:
        return _up(workdir, ports, worker)
    except BaseException:
        down(workdir)
        raise


def _base_env() -> dict[str, str]:
    env = {**os.environ, "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)  # the server itself must not point at another API
    return env


def start_prefect_server(workdir: str | Path, ports: Ports) -> None:
    """The Prefect server of ``workdir`` (its database under PREFECT_HOME), started and answering; ``up`` calls it,
    and it starts the server again after ``stop_service`` (the same database: runs in flight carry on)."""
    directory = state_dir(workdir)
    # the database lives under PREFECT_HOME: a restart, from whatever shell, must find the one `up` started with
    home_file = directory / "prefect-home"
    home = home_file.read_text() if home_file.exists() else os.environ.get("PREFECT_HOME", "")
    home_file.write_text(home)
    server_env = {  # the UI asks /ui-settings where its API is: tell it this port, not the default 4200
        **_base_env(),
        **({"PREFECT_HOME": home} if home else {}),
        "PREFECT_SERVER_API_HOST": HOST,
        "PREFECT_SERVER_API_PORT": str(ports.prefect),
        "PREFECT_UI_API_URL": ports.prefect_api,
    }
    _start(
        directory,
        "prefect-server",
        [_bin("prefect"), "server", "start", "--host", HOST, "--port", str(ports.prefect)],
        server_env,
    )
    _wait_healthy(f"{ports.prefect_api}/health", "prefect-server", directory)


def stop_service(workdir: str | Path, name: str) -> bool:
    """Stop one recorded service by its PID; False if it was not running."""
    directory = state_dir(workdir)
    pid = _pid(directory, name)
    if pid is not None:
        _stop(pid)
    (directory / f"{name}.pid").unlink(missing_ok=True)
    return pid is not None


def _up(workdir: str | Path, ports: Ports, worker: bool) -> dict[str, str]:
    directory = state_dir(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    env = _base_env()
    mlflow_db = Path(workdir).expanduser().resolve() / "mlflow.db"
    _start(
        directory,
        "mlflow-server",
        [
            _bin("mlflow"),
            "server",
            "--host",
            HOST,
            "--port",
            str(ports.mlflow),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{mlflow_db}",
            "--artifacts-destination",
            str(mlflow_db.parent / "mlartifacts"),
        ],
        {**env, "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    start_prefect_server(workdir, ports)
    _wait_healthy(f"{ports.mlflow_ui}/health", "mlflow-server", directory)
    client_env = {**env, **service_env(ports)}
    created = subprocess.run(
        [_bin("prefect"), "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"],
        env=client_env,
        capture_output=True,
        text=True,
    )
    if created.returncode != 0:
        raise PosttrainError(f"could not create the '{WORK_POOL}' work pool: {created.stderr.strip()[-300:]}")
    if worker:
        _start(directory, "prefect-worker", [_bin("prefect"), "worker", "start", "--pool", WORK_POOL], client_env)
    (directory / "env").write_text("".join(f"export {k}={v}\n" for k, v in service_env(ports).items()))
    return {"prefect_ui": ports.prefect_ui, "prefect_api": ports.prefect_api, "mlflow_ui": ports.mlflow_ui}


def _stop(pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM the service's process group, then SIGKILL what is left (a Prefect worker can ignore SIGTERM)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:  # not our child: poll its existence instead
                if not _alive(pid):
                    return
            time.sleep(0.2)


def down(workdir: str | Path) -> list[str]:
    """Stop every recorded service by its PID; returns the names stopped."""
    stopped = [name for name in reversed(SERVICES) if stop_service(workdir, name)]
    (state_dir(workdir) / "prefect-home").unlink(missing_ok=True)  # the next `up` takes the shell's PREFECT_HOME
    return stopped


def status(workdir: str | Path) -> dict[str, int | None]:
    directory = state_dir(workdir)
    return {name: _pid(directory, name) for name in SERVICES}
