"""Which Prefect API a run reports to, and the temporary server a plain `posttrain run` starts for itself.

With no ``PREFECT_API_URL``, Prefect starts a temporary server on the first flow call: the caller first imports
the server's modules (about 6 s on two cores), then waits while a subprocess imports them again (about 9 s), one
after the other. `posttrain run` starts that server itself before it imports torch, Ray, MLflow and the flows, so
the server's start-up overlaps the run's imports and the caller never imports the server. Like Prefect's own, it
has no UI and no background services, lives as long as the run, and is stopped by its PID.

Nothing here imports Prefect at module level: the CLI calls it before the heavy imports.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Callable, Iterator

from engine.errors import PosttrainError

if TYPE_CHECKING:
    from fastapi import FastAPI

HOST = "127.0.0.1"
# names the API URL of this run's temporary server: Prefect talks to it, but no stage lock or Ray job relies on it
TEMPORARY_API_ENV = "POSTTRAIN_TEMPORARY_PREFECT_API"
_PR_SET_PDEATHSIG = 1  # prctl(2)


def reporting_api_url() -> str | None:
    """The Prefect server runs report to (deployments, `posttrain server up`); None under a temporary server,
    which revokes no expired lease and is unreachable from a Ray cluster."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return url if url and url != os.environ.get(TEMPORARY_API_ENV) else None


def create_app() -> FastAPI:
    """The uvicorn factory of the temporary server: Prefect's API without its UI and background services."""
    from prefect.server.api.server import create_app as create_prefect_app

    return create_prefect_app(ephemeral=True, final=True)


def answers(url: str) -> bool:
    """True when ``url`` (a server's health check) answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _end_with_parent() -> None:
    """Runs in the server's process before exec: on Linux it gets SIGTERM when the run's process dies, even by a
    signal that skips exit handlers; elsewhere the exit handler and the process group are what stop it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class TemporaryPrefectServer:
    """A Prefect API server in a child process, started at once and waited for only when the run needs it."""

    def __init__(self) -> None:
        port = _free_port()
        self.url = f"http://{HOST}:{port}/api"
        self._log = tempfile.TemporaryFile()
        env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--factory",
                f"{__name__}:create_app",
                "--host",
                HOST,
                "--port",
                str(port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env={**env, "PREFECT_UI_ENABLED": "false"},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_end_with_parent,  # the run has no threads yet: Prefect is not imported
        )

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PosttrainError(
                    f"Prefect's temporary server exited with code {self.process.returncode}: {self._log_tail()}"
                )
            if answers(f"{self.url}/health"):
                return
            time.sleep(0.1)
        raise PosttrainError(f"Prefect's temporary server did not answer {self.url}/health within {timeout_s:.0f}s")

    def _log_tail(self) -> str:
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._log.close()


def prepare_prefect_api(startup_timeout_s: float) -> Callable[[], AbstractContextManager[None]]:
    """Find the Prefect API this run reports to: the one configured (``PREFECT_API_URL`` in the environment, a
    profile, a ``prefect.toml``), or else a temporary server, started now so that it comes up while the caller
    imports its flows. Returns ``use_api``: the run's flow is called inside ``with use_api():``, which waits for the
    server and points Prefect at it.

    The server is stopped at exit, not when the flow returns: Prefect's log and event workers send their last
    items from exit handlers, and those run before ours (last registered, first run), as with Prefect's own."""
    if os.environ.get("PREFECT_API_URL"):
        return nullcontext
    server = TemporaryPrefectServer()  # before Prefect's import, which alone takes 2 s
    atexit.register(server.stop)
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:  # a profile or a settings file names the API: not ours to replace
        server.stop()
        return nullcontext

    @contextmanager
    def use_api() -> Iterator[None]:
        server.wait_ready(startup_timeout_s)
        os.environ[TEMPORARY_API_ENV] = server.url
        try:
            # no UI is served and the server ends with the run: no "View at <url>" line pointing at it
            with temporary_settings({PREFECT_API_URL: server.url, PREFECT_UI_URL: ""}):
                yield
        finally:
            del os.environ[TEMPORARY_API_ENV]

    return use_api
