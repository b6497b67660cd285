"""Fixed costs of a pipeline run: the wall time of a run whose every stage is cached, with a temporary Prefect
server (the embedded default) and with a Prefect server already up (`posttrain server up`, as deployments run).

    .venv/bin/python -m bench.fixed_costs          # writes bench/RESULTS.md

The run is `posttrain run grpo-pipeline` on short step counts; after one uncached run, the cached run is repeated
ROUNDS times with the temporary server, then (after one uncounted run: a Prefect server's first seconds go to its own
start-up work, which would slow whatever runs beside it) ROUNDS times against the server; medians are reported.
The command start-up alone is `posttrain config show` (interpreter, imports, config parsing).
"""

from __future__ import annotations

import os
import platform
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.grpo_vs_trl import POSTTRAIN
from bench.results import write_section

ROUNDS = 3
SHORT = {
    "sft.max_steps": 10,
    "reward_model.max_steps": 2,
    "grpo.max_steps": 2,
    "grpo.val_every": 2,
    "grpo.checkpoint_every": 2,
    "evaluate.size": 16,
    "grpo.val_size": 16,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return time.perf_counter() - started


def main() -> None:
    overrides = [a for k, v in SHORT.items() for a in ("--set", f"{k}={v}")]
    run = [POSTTRAIN, "run", "grpo-pipeline", "--json", *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        embedded = {**os.environ}
        embedded.pop("PREFECT_API_URL", None)
        first = timed(run, workdir, embedded)
        times: dict[str, list[float]] = {"embedded": [timed(run, workdir, embedded) for _ in range(ROUNDS)]}
        services = workdir / "services-home"
        services.mkdir()
        server_env = {**embedded, "PREFECT_HOME": str(services / "prefect-home")}
        prefect_port = _free_port()
        up = [
            POSTTRAIN,
            "server",
            "up",
            "--workdir",
            str(services),
            "--no-worker",
            "--prefect-port",
            str(prefect_port),
            "--mlflow-port",
            str(_free_port()),
        ]
        subprocess.run(up, cwd=workdir, env=server_env, check=True, capture_output=True)
        try:
            with_server = {**server_env, "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
            timed(run, workdir, with_server)  # not counted: the new server's own start-up work is still running
            times["server"] = [timed(run, workdir, with_server) for _ in range(ROUNDS)]
        finally:
            subprocess.run(
                [POSTTRAIN, "server", "down", "--workdir", str(services)], env=server_env, capture_output=True
            )
        startup = statistics.median(
            timed([POSTTRAIN, "config", "show", "--config", "grpo_tiny"], workdir, embedded) for _ in range(ROUNDS)
        )
    median = {mode: statistics.median(values) for mode, values in times.items()}
    table = [
        "| run | wall s (median) | runs |",
        "|---|---|---|",
        f"| uncached (short steps) | {first:.1f} | 1 |",
        f"| all stages cached, a temporary Prefect server | {median['embedded']:.1f} | "
        + ", ".join(f"{t:.1f}" for t in times["embedded"])
        + " |",
        f"| all stages cached, a Prefect server already up | {median['server']:.1f} | "
        + ", ".join(f"{t:.1f}" for t in times["server"])
        + " |",
        f"| `posttrain config show` (interpreter, imports, config) | {startup:.1f} | {ROUNDS} |",
    ]
    import torch

    write_section(
        "fixed_costs",
        "Fixed costs of a pipeline run",
        ".venv/bin/python -m bench.fixed_costs",
        f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "\n".join(table)
        + "\n\n`posttrain run grpo-pipeline` with short step counts; the cached runs start Ray only where a stage "
        "runs. With no Prefect server configured, `posttrain run` starts a temporary one (tasks/prefect_api.py) "
        "before it imports the flows, so the server's start-up (about 9 s alone) overlaps the run's imports; the "
        "difference between the two cached rows is the part of it they do not cover.",
    )


if __name__ == "__main__":
    main()
