"""Build time of the vLLM worker environment with pip and with uv, each into a fresh envs folder, in the same run.

    .venv/bin/python -m bench.worker_env_build          # needs uv (pip install uv); writes bench/RESULTS.md

Each builder keeps its own download cache (pip's wheel cache, uv's cache); two alternating rounds, each build into a
fresh folder, so that the last round compares both with warm caches (a machine that built once before: a CI runner,
a node). Both install the same requirement set and pass the same import check (`import vllm, engine`).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.results import write_section
from engine import worker_envs

POSTTRAIN = str(Path(sys.executable).parent / "posttrain")
ROUNDS = 2


def build_seconds(installer: str, envs_dir: Path) -> float:
    env = {**os.environ, "POSTTRAIN_ENVS_DIR": str(envs_dir), "POSTTRAIN_INSTALLER": installer}
    started = time.perf_counter()
    out = subprocess.run([POSTTRAIN, "env", "build", "vllm"], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{installer} build failed: {out.stderr[-3000:]}")
    return time.perf_counter() - started


def package_versions(envs_dir: Path) -> dict[str, str]:
    (python,) = envs_dir.glob("vllm-*/bin/python")
    listed = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print('\\n'.join(sorted(f'{d.name}=={d.version}' "
            "for d in m.distributions())))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return dict(line.split("==", 1) for line in listed)


def main() -> None:
    uv = worker_envs.uv_executable()
    if uv is None:
        raise SystemExit("uv is not installed: pip install uv")
    seconds: dict[str, list[float]] = {"pip": [], "uv": []}
    versions: dict[str, dict[str, str]] = {}
    for _ in range(ROUNDS):  # alternating, so that both meet the same machine state; the first round warms uv's cache
        for installer in ("pip", "uv"):
            with tempfile.TemporaryDirectory() as tmp:
                seconds[installer].append(build_seconds(installer, Path(tmp)))
                versions[installer] = package_versions(Path(tmp))
    same = {k for k in versions["pip"] if versions["uv"].get(k) == versions["pip"][k]}
    differ = sorted((set(versions["pip"]) | set(versions["uv"])) - same)
    uv_version = subprocess.run([uv, "--version"], capture_output=True, text=True).stdout.strip()
    last = {installer: times[-1] for installer, times in seconds.items()}
    table = [
        "| builder | build s, round by round | last round | uv / pip |",
        "|---|---|---|---|",
        f"| pip | {', '.join(f'{t:.1f}' for t in seconds['pip'])} | {last['pip']:.1f} | 1.00x |",
        f"| {uv_version} | {', '.join(f'{t:.1f}' for t in seconds['uv'])} | {last['uv']:.1f} | "
        f"{last['uv'] / last['pip']:.2f}x |",
    ]
    note = (
        f"\n\nThe two venvs hold {len(versions['pip'])} and {len(versions['uv'])} distributions; "
        f"{len(same)} at the same version in both"
        + (f"; different or only in one: {', '.join(differ)}." if differ else ".")
    )
    write_section(
        "worker_env_build",
        "Building the vLLM worker environment: pip vs uv",
        ".venv/bin/python -m bench.worker_env_build",
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "\n".join(table) + note,
    )


if __name__ == "__main__":
    main()
