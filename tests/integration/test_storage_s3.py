"""The artifact store and model loading against a real S3 API (moto server on 127.0.0.1), stalls included."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from engine.config import StorageConfig
from engine.errors import ModelLoadError, StorageError
from engine.models.loading import resolve_model
from engine.storage import ArtifactStore


def s3_store(endpoint, bucket, tmp_path, prefix="runs"):
    cfg = StorageConfig(root=f"s3://{bucket}/{prefix}", endpoint_url=endpoint)
    store = ArtifactStore.from_config(cfg, tmp_path)
    store.check()
    return store


def commit_two_checkpoints_and_a_partial_upload(store: ArtifactStore, bucket: str, tmp_path: Path) -> None:
    """Steps 10 and 20 committed under ``ckpt/``, and step 30 interrupted: its data uploaded, no manifest."""
    src = tmp_path / "src"
    (src / "dcp").mkdir(parents=True)
    (src / "dcp/shard0").write_bytes(b"\x00" * 1000)
    (src / "state.json").write_text("{}")
    for step in (10, 20):
        store.commit_dir(src, f"ckpt/step_{step:06d}", metadata={"step": step})
    store.fs.pipe_file(f"{bucket}/runs/ckpt/step_000030/upload-x/dcp/shard0", b"partial")


def test_commit_list_latest_download_on_s3(s3_endpoint, s3_bucket, tmp_path):
    store = s3_store(s3_endpoint, s3_bucket, tmp_path)
    commit_two_checkpoints_and_a_partial_upload(store, s3_bucket, tmp_path)
    assert store.list("ckpt") == ["ckpt/step_000010", "ckpt/step_000020"]
    assert store.latest("ckpt") == "ckpt/step_000020"
    local = store.download(store.uri("ckpt/step_000020"))
    assert (local / "dcp/shard0").read_bytes() == b"\x00" * 1000
    assert store.verify("ckpt/step_000020")


def test_model_loads_from_s3_uri_once(s3_endpoint, s3_bucket, tmp_path, tiny_model_dir):
    store = s3_store(s3_endpoint, s3_bucket, tmp_path)
    ref = store.commit_dir(tiny_model_dir, "models/tiny")
    first = resolve_model(ref.uri, store, tmp_path / "cache")
    assert (first / "config.json").is_file()
    assert resolve_model(ref.uri, store, tmp_path / "cache") == first
    # a plain folder on S3 (no manifest) also loads, through fsspec
    for file in tiny_model_dir.iterdir():
        store.fs.put_file(str(file), f"{s3_bucket}/plain/{file.name}")
    plain = resolve_model(f"s3://{s3_bucket}/plain", store, tmp_path / "cache")
    assert (plain / "model.safetensors").is_file()
    assert resolve_model(f"s3://{s3_bucket}/plain", store, tmp_path / "cache") == plain  # copied once
    config = (tiny_model_dir / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05')
    store.fs.pipe_file(f"{s3_bucket}/plain/config.json", config.encode())  # the model replaced at the same URI
    replaced = resolve_model(f"s3://{s3_bucket}/plain", store, tmp_path / "cache")
    assert replaced != plain and (replaced / "config.json").read_text() == config
    with pytest.raises(ModelLoadError, match=f"model not found: s3://{s3_bucket}/missing"):
        resolve_model(f"s3://{s3_bucket}/missing", store, tmp_path / "cache")


def test_hub_name_offline_fails_in_one_line(tmp_path):
    store = ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache")
    with pytest.raises(ModelLoadError, match="cannot load model 'someone/no-such-model' from the Hugging Face hub"):
        resolve_model("someone/no-such-model", store, tmp_path / "cache")


def test_missing_bucket_and_unreachable_endpoint(s3_endpoint, tmp_path):
    with pytest.raises(StorageError, match="bucket not found or not accessible: s3://no-such-bucket"):
        s3_store(s3_endpoint, "no-such-bucket", tmp_path)
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError, match="s3://any-bucket/runs"):
        s3_store(dead, "any-bucket", tmp_path)


def test_datasets_on_s3_load_through_the_store_settings_keyed_by_content(s3_endpoint, s3_bucket, tmp_path):
    """A file, a glob and a hub-shaped folder on S3 (the GSM8K layout: card, subset, splits): copied once through
    the store's S3 settings, read with ``datasets``; an edited remote file is a new fingerprint."""
    import json

    from engine.config import DataConfig
    from engine.data.datasets import build_splits, resolve_sources
    from tests.fixtures.hub_datasets import make_gsm8k

    store = s3_store(s3_endpoint, s3_bucket, tmp_path)
    rows = "".join(json.dumps({"prompt": f"What is {i}+1?", "completion": i + 1}) + "\n" for i in range(10))
    store.fs.pipe_file(f"{s3_bucket}/data/train.jsonl", rows.encode())
    store.fs.pipe_file(f"{s3_bucket}/data/more.jsonl", rows.encode())

    single = DataConfig(source=f"s3://{s3_bucket}/data/train.jsonl", val_fraction=0.2)
    resolved = resolve_sources(single, tmp_path / "cache", store.options_for)
    train, val = build_splits(single, resolved, seed=0)
    assert len(train) == 8 and len(val) == 2 and train[0]["completion"] == str(int(train[0]["answer"]))
    both = DataConfig(source=f"s3://{s3_bucket}/data/*.jsonl", val_fraction=0.2)
    train, val = build_splits(both, resolve_sources(both, tmp_path / "cache", store.options_for), seed=0)
    assert len(train) + len(val) == 20

    store.fs.pipe_file(f"{s3_bucket}/data/train.jsonl", rows.replace("What is 3+1?", "What is 3+2?").encode())
    assert resolve_sources(single, tmp_path / "cache", store.options_for).fingerprints() != resolved.fingerprints()

    folder = make_gsm8k(tmp_path / "gsm8k", train=6, test=3)
    store.fs.put(str(folder) + "/", f"{s3_bucket}/hub/gsm8k/", recursive=True)
    gsm8k = DataConfig(
        source=f"s3://{s3_bucket}/hub/gsm8k",
        subset="main",
        val_split="test",
        prompt_field="question",
        response_field="answer",
        answer_pattern="#### (.+)$",
    )
    train, val = build_splits(gsm8k, resolve_sources(gsm8k, tmp_path / "cache", store.options_for), seed=0)
    assert (len(train), len(val)) == (6, 3) and train[0]["answer"].isdigit()


def stall(server_pid: int, seconds: float, end: threading.Event | None = None) -> threading.Thread:
    """Pause the S3 server (SIGSTOP), and let it go on (SIGCONT) after ``seconds`` or when ``end`` is set."""
    os.kill(server_pid, signal.SIGSTOP)

    def resume() -> None:
        (end or threading.Event()).wait(timeout=seconds)
        os.kill(server_pid, signal.SIGCONT)

    thread = threading.Thread(target=resume)
    thread.start()
    return thread


def test_a_20_s_stall_mid_upload_leaves_a_whole_commit(s3_server, s3_bucket, tmp_path):
    endpoint, pid = s3_server
    store = s3_store(endpoint, s3_bucket, tmp_path)
    source = tmp_path / "ckpt"
    (source / "dcp").mkdir(parents=True)
    (source / "dcp/shard0").write_bytes(os.urandom(1 << 20))
    (source / "trainer_state.json").write_text('{"step": 4}')
    thread = stall(pid, 20.0)
    started = time.monotonic()
    ref = store.commit_dir(source, "stages/sft/k/checkpoints/step_000004", metadata={"step": 4})
    thread.join()
    assert time.monotonic() - started >= 19  # the commit waited out the stall
    assert store.is_committed(ref.uri) and store.verify(ref.uri)


def test_a_stall_past_the_retry_budget_fails_in_one_line_commits_nothing_and_a_retry_succeeds(
    s3_server, s3_bucket, tmp_path
):
    from engine.storage import StorageUnavailable

    endpoint, pid = s3_server
    cfg = StorageConfig(root=f"s3://{s3_bucket}/runs", endpoint_url=endpoint, read_timeout_s=2, attempts=1)
    store = ArtifactStore.from_config(cfg, tmp_path)
    store.check()
    source = tmp_path / "ckpt"
    source.mkdir()
    (source / "state.json").write_text("{}")
    end = threading.Event()
    thread = stall(pid, 120.0, end)  # longer than 2 s x 1 try: the stage gives up, then the server comes back
    try:
        with pytest.raises(
            StorageUnavailable, match=r"^storage did not take s3://.*/runs/ckpt/step_000008: "
        ) as raised:
            store.commit_dir(source, "ckpt/step_000008")
    finally:
        end.set()
        thread.join()
    assert "\n" not in str(raised.value)
    assert not store.is_committed("ckpt/step_000008")  # nothing half committed
    assert store.is_committed(store.commit_dir(source, "ckpt/step_000008").uri)  # once it answers, a retry commits
