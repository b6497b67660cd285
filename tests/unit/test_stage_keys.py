"""Stage keys hold content: a data file by its bytes, a local model folder by its files, the user's reward function
by its source. Editing any of them changes the key of exactly the stages that read it; an unchanged rerun hits."""

from __future__ import annotations

import json
import shutil

from engine import stages
from engine.config import load_config
from engine.storage import ArtifactRef, ArtifactStore


def runtime(tmp_path, **overrides) -> stages.Runtime:
    cfg = load_config(None, {"workdir": str(tmp_path / "work"), **overrides})
    return stages.Runtime(cfg, ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache"), tracker=None)


def test_the_data_stage_is_keyed_by_the_file_content(tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(10)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = stages.prepare_data(runtime(tmp_path, **{"data.source": str(data)}))
    again = stages.prepare_data(runtime(tmp_path, **{"data.source": str(data)}))
    assert not first.cached and again.cached and again.ref.uri == first.ref.uri
    rows[3] = {"prompt": "q3", "completion": "edited"}
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    edited = stages.prepare_data(runtime(tmp_path, **{"data.source": str(data)}))
    assert not edited.cached and edited.ref.uri != first.ref.uri


def test_a_local_model_is_keyed_by_its_files(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    rt = runtime(tmp_path, **{"model.name": str(model)})
    first = stages.prepare_model(rt)
    assert stages.prepare_model(rt).ref.digest == first.ref.digest
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert stages.prepare_model(rt).ref.digest != first.ref.digest
    moved = tmp_path / "elsewhere"
    shutil.copytree(model, moved)  # the same bytes at another path: the same model
    assert stages.prepare_model(runtime(tmp_path, **{"model.name": str(moved)})).ref.digest == (
        stages.prepare_model(rt).ref.digest
    )


def test_reward_function_and_environment_code_is_in_the_key(tmp_path):
    code = tmp_path / "rewards.py"
    code.write_text("def score(prompts, completions, **kw):\n    return [1.0] * len(prompts)\n")
    cfg = load_config(None, {"grpo.reward_functions": [{"function": f"{code}:score"}]})
    first = stages.user_code_digests(cfg.grpo)
    assert list(first) == [f"code:{code}:score"]
    code.write_text("def score(prompts, completions, **kw):\n    return [0.5] * len(prompts)\n")
    assert stages.user_code_digests(cfg.grpo) != first
    assert stages.user_code_digests(load_config(None).grpo) == {}  # built-in environments are the engine's code


def test_a_critic_started_from_a_given_model_keys_the_grpo_stage_by_its_files(tmp_path, tiny_model_dir, monkeypatch):
    """``grpo.critic.model`` is read by PPO only: its files are in the GRPO stage's key, so another critic is another
    run, and GRPO's group-relative advantages ignore it."""
    keyed: list[dict[str, str]] = []
    monkeypatch.setattr(stages, "_run_stage", lambda rt, name, config, inputs, *rest, **kw: keyed.append(inputs))
    critic = tmp_path / "critic"
    shutil.copytree(tiny_model_dir, critic)
    start, data = ArtifactRef(uri="file:///start", digest="s"), ArtifactRef(uri="file:///data", digest="d")
    ppo = {"grpo.advantage_estimator": "gae", "grpo.critic.model": str(critic)}
    stages.train_grpo(runtime(tmp_path, **ppo), start, data, None, None)
    stages.train_grpo(runtime(tmp_path, **{**ppo, "grpo.advantage_estimator": "grpo"}), start, data, None, None)
    config = json.loads((critic / "config.json").read_text())
    (critic / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    stages.train_grpo(runtime(tmp_path, **ppo), start, data, None, None)
    first, grpo, edited = keyed
    assert "critic" in first and "critic" not in grpo and edited["critic"] != first["critic"]


def test_a_hub_model_reaches_the_workers_at_the_commit_the_stage_was_keyed_on(tmp_path, tiny_model_dir):
    """The controller resolves a hub id to a snapshot; a node that resolves the source later gets that snapshot even
    where the hub's ``main`` has moved on since."""
    from engine.models.loading import ModelSource, resolve_model

    store = ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache" / "artifacts")
    repo = tmp_path / "cache" / "hub" / "models--org--tiny"
    keyed, newer = "a" * 40, "b" * 40
    for commit in (keyed, newer):
        shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(keyed)
    folder = resolve_model("org/tiny", store, tmp_path / "cache")
    source = ModelSource.resolved("org/tiny", store, folder)
    (repo / "refs" / "main").write_text(newer)  # the hub moved on
    assert folder.name == keyed and source.revision == keyed
    assert source.local() == folder
    assert resolve_model("org/tiny", store, tmp_path / "cache").name == newer  # what an unpinned fetch would load
