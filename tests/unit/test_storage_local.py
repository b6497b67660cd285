"""The artifact store on a local folder: manifest-last commits, listing, verification, downloads."""

import json

import pytest

from engine.config import StorageConfig
from engine.errors import StorageError
from engine.storage import MANIFEST, ArtifactStore


@pytest.fixture
def store(tmp_path):
    return ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache")


def make_dir(path, files):
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    return path


def test_commit_then_download_round_trip(store, tmp_path):
    src = make_dir(tmp_path / "src", {"a.txt": "alpha", "sub/b.bin": "beta"})
    ref = store.commit_dir(src, "models/m1", metadata={"step": 3})
    assert ref.uri == store.uri("models/m1")
    manifest = store.manifest(ref.uri)
    assert {f.path for f in manifest.files} == {"a.txt", "sub/b.bin"}
    assert manifest.metadata == {"step": 3} and ref.digest == manifest.digest()
    local = store.download(ref.uri)
    assert (local / "sub/b.bin").read_text() == "beta"
    assert store.download("models/m1") == local  # cached by digest
    assert store.verify(ref.uri)


def test_upload_without_manifest_does_not_exist(store, tmp_path):
    src = make_dir(tmp_path / "src", {"w.pt": "weights"})
    store.commit_dir(src, "ckpt/step_000010")
    # an upload cut short: files under an upload prefix, no manifest
    partial = tmp_path / "store/ckpt/step_000020/20260101-deadbeef"
    make_dir(partial, {"w.pt": "half"})
    assert store.list("ckpt") == ["ckpt/step_000010"]
    assert store.latest("ckpt") == "ckpt/step_000010"
    assert not store.is_committed("ckpt/step_000020")
    with pytest.raises(StorageError, match="MANIFEST.json is missing"):
        store.download("ckpt/step_000020")


def test_recommit_replaces_content_atomically(store, tmp_path):
    store.commit_dir(make_dir(tmp_path / "v1", {"x": "one"}), "a")
    ref2 = store.commit_dir(make_dir(tmp_path / "v2", {"x": "two"}), "a")
    assert (store.download("a") / "x").read_text() == "two"
    assert store.ref("a").digest == ref2.digest


def test_corruption_is_detected(store, tmp_path):
    ref = store.commit_dir(make_dir(tmp_path / "src", {"x": "good"}), "a")
    manifest = store.manifest("a")
    (tmp_path / "store/a" / manifest.upload_id / "x").write_text("evil")
    assert not store.verify(ref.uri)
    with pytest.raises(StorageError, match="corrupt"):
        store.download(ref.uri)


def test_manifest_is_the_last_write(store, tmp_path, monkeypatch):
    order = []
    real_put, real_pipe = store.fs.put_file, store.fs.pipe_file
    monkeypatch.setattr(store.fs, "put_file", lambda *a, **k: (order.append("file"), real_put(*a, **k)))
    monkeypatch.setattr(
        store.fs, "pipe_file", lambda p, *a, **k: (order.append(p.rsplit("/", 1)[-1]), real_pipe(p, *a, **k))
    )
    store.commit_dir(make_dir(tmp_path / "src", {"a": "1", "b": "2"}), "z")
    assert order[:2] == ["file", "file"] and order[2].startswith(MANIFEST) and len(order) == 3
    assert sorted(p.name for p in (tmp_path / "store/z").iterdir() if p.is_file()) == [MANIFEST]  # renamed whole


def test_a_manifest_cut_short_reads_as_not_committed(store, tmp_path, monkeypatch):
    store.commit_dir(make_dir(tmp_path / "src", {"a": "1"}), "ckpt/step_1")
    ref = store.commit_dir(make_dir(tmp_path / "src", {"a": "1"}), "ckpt/step_2")
    manifest = tmp_path / "store/ckpt/step_2" / MANIFEST
    manifest.write_text(manifest.read_text()[:40])  # a reader racing an in-place write, or a kill, sees this
    assert not store.is_committed(ref.uri) and store.manifest(ref.uri) is None
    assert store.latest("ckpt") == "ckpt/step_1"  # resume passes over it

    import os

    def killed_before_rename(*args):
        raise KeyboardInterrupt  # the process dies after the staged manifest is written, before its rename

    monkeypatch.setattr(os, "replace", killed_before_rename)
    with pytest.raises(KeyboardInterrupt):
        store.commit_dir(make_dir(tmp_path / "src2", {"b": "2"}), "killed")
    assert not store.is_committed("killed") and not (tmp_path / "store/killed" / MANIFEST).exists()


def test_open_and_read_json(store, tmp_path):
    src = make_dir(tmp_path / "src", {"state.json": json.dumps({"step": 4})})
    store.commit_dir(src, "s")
    assert store.read_json("s", "state.json") == {"step": 4}


def test_foreign_uri_is_rejected(store):
    with pytest.raises(StorageError, match="not inside the store"):
        store.key_of("s3://elsewhere/x")


def test_storage_options_go_over_posttrains_own_s3_settings_key_by_key(tmp_path):
    cfg = StorageConfig(
        root="s3://bucket/runs",
        endpoint_url="http://127.0.0.1:9",
        options={"client_kwargs": {"region_name": "eu-west-1"}, "anon": True},
    )
    options = ArtifactStore.from_config(cfg, tmp_path).fs.storage_options
    assert options["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9", "region_name": "eu-west-1"}
    assert options["anon"] is True and options["config_kwargs"]["read_timeout"] == cfg.read_timeout_s


def test_an_upload_from_several_processes_commits_once_its_manifest_lists_them_all(store, tmp_path, monkeypatch):
    """Each trainer rank puts its own files into one upload (here through its own handle, on its node's scratch
    root), the controller adds its own and writes the manifest last: nothing reads as committed before that, a
    path uploaded twice is refused, and a node downloads into its own scratch root."""
    upload = store.begin_upload("stages/sft/k/checkpoints/step_000002")
    node_a = store.handle().open()  # a worker's store: what a rank on another node opens
    shards = node_a.put_dir(make_dir(tmp_path / "rank0", {"dcp/.metadata": "m", "dcp/__0_0.distcp": "0"}), upload)
    shards += node_a.put_dir(make_dir(tmp_path / "rank1", {"dcp/__1_0.distcp": "1"}), upload, under="critic")
    shards += store.put_files(upload, {"trainer_state.json": b'{"step": 2}'})
    assert not store.is_committed(upload.key) and store.latest("stages/sft/k/checkpoints") is None
    with pytest.raises(ValueError, match="trainer_state.json uploaded more than once"):
        store.finish_upload(upload, shards + shards[-1:])
    ref = store.finish_upload(upload, shards, metadata={"step": 2})
    paths = [entry.path for entry in store.manifest(ref.uri).files]
    assert paths == ["critic/dcp/__1_0.distcp", "dcp/.metadata", "dcp/__0_0.distcp", "trainer_state.json"]
    assert store.verify(ref.uri) and store.read_json(ref.uri, "trainer_state.json") == {"step": 2}

    monkeypatch.setenv("POSTTRAIN_SCRATCH", str(tmp_path / "node_b"))
    local = store.handle().open().download(ref.uri)
    assert local.parent == tmp_path / "node_b" / "artifacts" and (local / "critic/dcp/__1_0.distcp").read_text() == "1"
    assert "options" not in repr(store.handle())  # a token or connection string stays out of any log line


def test_processes_asking_for_one_artifact_at_once_download_it_once(store, tmp_path):
    """The ranks of a group on one machine resume from one checkpoint: the first downloads, the others wait for it."""
    import threading
    import time

    ref = store.commit_dir(make_dir(tmp_path / "src", {"dcp/__0_0.distcp": "0" * 1000}), "ckpt/step_000002")
    fetched: list[str] = []
    get_file = store.fs.get_file

    def slow_get_file(remote, local):  # a transfer long enough for every rank to ask before it ends
        fetched.append(remote)
        time.sleep(0.3)
        get_file(remote, local)

    store.fs.get_file = slow_get_file
    folders: list = []
    ranks = [threading.Thread(target=lambda: folders.append(store.download(ref.uri))) for _ in range(4)]
    for rank in ranks:
        rank.start()
    for rank in ranks:
        rank.join()
    assert len(fetched) == 1 and len(set(folders)) == 1 and (folders[0] / "dcp/__0_0.distcp").is_file()
