"""gs:// and az:// stores against emulators on 127.0.0.1 (gcp-storage-emulator through gcsfs, Azurite through
adlfs), reached with the options of ``storage.options``: the commit protocol, model and data loading of the S3 store."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from engine.config import DataConfig, PipelineConfig, StorageConfig
from engine.errors import StorageError
from engine.models.loading import resolve_model
from engine.storage import ArtifactStore
from tests.integration.test_storage_s3 import commit_two_checkpoints_and_a_partial_upload


@pytest.fixture
def store(object_store, tmp_path) -> ArtifactStore:
    cfg = StorageConfig(root=f"{object_store.scheme}://{object_store.bucket}/runs", options=object_store.options)
    store = ArtifactStore.from_config(cfg, tmp_path)
    store.check()
    return store


def test_commit_list_latest_download_verify(store, object_store: SimpleNamespace, tmp_path):
    commit_two_checkpoints_and_a_partial_upload(store, object_store.bucket, tmp_path)
    assert store.list("ckpt") == ["ckpt/step_000010", "ckpt/step_000020"]
    assert store.latest("ckpt") == "ckpt/step_000020"
    local = store.download(store.uri("ckpt/step_000020"))
    assert (local / "dcp/shard0").read_bytes() == b"\x00" * 1000
    assert store.verify("ckpt/step_000020")
    assert store.uri("x") == f"{object_store.scheme}://{object_store.bucket}/runs/x"


def test_models_and_data_under_its_uris_load_with_the_stores_options(store, object_store, tmp_path, tiny_model_dir):
    from engine.data.datasets import build_splits, resolve_sources

    ref = store.commit_dir(tiny_model_dir, "models/tiny")
    assert (resolve_model(ref.uri, store, tmp_path / "cache") / "config.json").is_file()
    for file in tiny_model_dir.iterdir():  # a plain folder (no manifest), loaded through the filesystem
        store.fs.put_file(str(file), f"{object_store.bucket}/plain/{file.name}")
    plain = f"{object_store.scheme}://{object_store.bucket}/plain"
    assert (resolve_model(plain, store, tmp_path / "cache") / "model.safetensors").is_file()

    rows = "".join(json.dumps({"prompt": f"What is {i}+1?", "completion": i + 1}) + "\n" for i in range(10))
    store.fs.pipe_file(f"{object_store.bucket}/data/train.jsonl", rows.encode())
    data = DataConfig(source=f"{object_store.scheme}://{object_store.bucket}/data/train.jsonl", val_fraction=0.2)
    train, val = build_splits(data, resolve_sources(data, tmp_path / "cache", store.options_for), seed=0)
    assert len(train) == 8 and len(val) == 2


def test_a_missing_bucket_fails_in_one_line_and_the_credentials_are_masked(object_store, tmp_path):
    scheme, options = object_store.scheme, object_store.options
    missing = StorageConfig(root=f"{scheme}://no-such-bucket/runs", options=options)
    with pytest.raises(StorageError, match=f"bucket not found or not accessible: {scheme}://no-such-bucket"):
        ArtifactStore.from_config(missing, tmp_path).check()
    written = PipelineConfig(storage=missing.model_dump()).redacted()["storage"]["options"]
    secret = "token" if scheme == "gs" else "connection_string"
    assert written == {**options, secret: "***"}
