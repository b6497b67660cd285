"""The artifact store: directories committed to object storage through fsspec.

An artifact is a folder at ``<root>/<key>``. Its files go under a fresh upload prefix
(``<key>/<upload-id>/...``) and its ``MANIFEST.json`` (file list, sizes, sha256, metadata) is written
last, in one PUT. An artifact without its manifest does not exist: an upload cut short leaves only
unreferenced files under an upload prefix, never a half-written artifact. This works the same on a
local folder and on S3, which has no atomic rename.

The files of one upload may come from several processes on several machines (each trainer rank uploads its own
checkpoint shards through a ``StoreHandle``); the controller writes the manifest once all of them are in.
"""

from __future__ import annotations

import builtins
import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import fsspec
from pydantic import BaseModel, ValidationError

from engine.config import StorageConfig
from engine.errors import InfrastructureError, StorageError


class StorageUnavailable(InfrastructureError):
    """The store did not answer within its timeouts and retries (a stalled or unreachable server)."""


MANIFEST = "MANIFEST.json"
SCRATCH_ENV = "POSTTRAIN_SCRATCH"  # a node's own disk for the files its workers fetch and stage
BUCKET_SCHEMES = {"s3", "gs", "gcs", "az", "abfs", "abfss"}  # object stores: the root's first segment is a bucket


class ArtifactRef(BaseModel):
    """What stages hand each other: where an artifact is, which exact content it is, and a few metrics."""

    uri: str
    digest: str
    metrics: dict[str, float] = {}


class ManifestEntry(BaseModel):
    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    upload_id: str
    created: float
    files: list[ManifestEntry]
    metadata: dict[str, Any] = {}

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()


@dataclass(frozen=True)
class Upload:
    """An artifact being written: its files go under ``<key>/<upload_id>/`` from any process that can reach the
    store, and nothing reads it until its manifest is written."""

    key: str
    upload_id: str


def node_scratch() -> Path | None:
    """This node's scratch root (``$POSTTRAIN_SCRATCH``), where its workers cache what they fetch and stage what
    they upload; None: the controller's cache and the system's temporary folder (one machine)."""
    root = os.environ.get(SCRATCH_ENV)
    return Path(root) if root else None


@dataclass(frozen=True)
class StoreHandle:
    """What a worker on any node needs to open the controller's store itself: its root and filesystem options
    (credentials come from the node's own environment, as the AWS chain does), never a local path of the
    controller's but its cache as the default for a node with no scratch root of its own."""

    root: str
    options: dict[str, Any] = field(repr=False)  # may hold a token or connection string
    attempts: int | None
    default_cache_dir: str

    def open(self) -> "ArtifactStore":
        scratch = node_scratch()
        cache = scratch / "artifacts" if scratch else Path(self.default_cache_dir)
        return ArtifactStore(self.root, cache, self.options, self.attempts)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _s3_options(cfg: StorageConfig) -> dict[str, Any]:
    client_kwargs: dict[str, Any] = {}
    if cfg.endpoint_url:
        client_kwargs["endpoint_url"] = cfg.endpoint_url
    if cfg.region:
        client_kwargs["region_name"] = cfg.region
    # Fail fast on an unreachable endpoint instead of botocore's long retry ladder; a stalled server gets
    # read_timeout_s per try and `attempts` tries, all counted by s3fs (botocore's own retries are off: the two
    # would multiply).
    config_kwargs = {"connect_timeout": 5, "read_timeout": cfg.read_timeout_s, "retries": {"max_attempts": 1}}
    return {"client_kwargs": client_kwargs, "config_kwargs": config_kwargs}


def _scheme(uri: str) -> str:
    """``s3`` of ``s3://bucket/key``; a plain path is its own (it matches no URI's)."""
    return uri.split("://", 1)[0]


def _merged(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """``theirs`` over ``ours``, nested mappings (s3fs's client_kwargs, config_kwargs) merged key by key."""
    merged = dict(ours)
    for key, value in theirs.items():
        both_maps = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = _merged(merged[key], value) if both_maps else value
    return merged


class ArtifactStore:
    def __init__(
        self,
        root: str,
        cache_dir: str | Path,
        storage_options: dict[str, Any] | None = None,
        attempts: int | None = None,
    ):
        self.root = root.rstrip("/")
        self.scheme = _scheme(self.root)
        self.cache_dir = Path(cache_dir)
        self._handle = StoreHandle(self.root, dict(storage_options or {}), attempts, str(self.cache_dir))
        options = dict(storage_options or {})
        if attempts is not None:  # s3fs counts tries per instance: this store gets an instance of its own
            options["skip_instance_cache"] = True
        try:
            self.fs, self._root_path = fsspec.core.url_to_fs(self.root, **options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open storage root {self.root}: {exc}") from None
        if attempts is not None:
            self.fs.retries = attempts

    @classmethod
    def from_config(cls, cfg: StorageConfig, workdir: str | Path) -> "ArtifactStore":
        assert cfg.root is not None, "PipelineConfig fills storage.root"
        cache = Path(workdir) / "cache" / "artifacts"
        if cfg.root.startswith("s3://"):
            return cls(cfg.root, cache, _merged(_s3_options(cfg), cfg.options), attempts=cfg.attempts)
        return cls(cfg.root, cache, cfg.options)

    # ----------------------------------------------------------------------------- addressing

    def uri(self, key: str) -> str:
        return f"{self.root}/{key.strip('/')}"

    def key_of(self, uri_or_key: str) -> str:
        if uri_or_key.startswith(self.root + "/"):
            return uri_or_key[len(self.root) + 1 :]
        if "://" in uri_or_key:
            raise StorageError(f"{uri_or_key} is not inside the store {self.root}")
        return uri_or_key.strip("/")

    def options_for(self, uri: str) -> dict[str, Any]:
        """The store's filesystem options for another URI of the same scheme (a dataset or model in the store's
        bucket service), none for any other."""
        return dict(self.fs.storage_options) if _scheme(uri) == self.scheme else {}

    def _path(self, key: str) -> str:
        return f"{self._root_path.rstrip('/')}/{key}" if key else self._root_path

    def handle(self) -> StoreHandle:
        """This store as a worker on another node opens it (``StoreHandle.open``)."""
        return self._handle

    # ----------------------------------------------------------------------------- health

    def check(self) -> None:
        """Fail with one line naming the root if it cannot be reached or written."""
        try:
            if self.scheme in BUCKET_SCHEMES:  # a bucket is made by its owner, never by a run
                bucket = self._root_path.split("/", 1)[0]
                try:
                    self.fs.ls(bucket)  # unlike exists(), raises on a transport error instead of saying False
                except (FileNotFoundError, PermissionError):
                    raise StorageError(
                        f"bucket not found or not accessible: {self.scheme}://{bucket} (storage.root={self.root})"
                    ) from None
            else:
                self.fs.makedirs(self._root_path, exist_ok=True)
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - any transport error is a user-facing reachability problem
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StorageError(f"cannot reach storage root {self.root}: {reason}") from None

    # ----------------------------------------------------------------------------- writing

    def commit_dir(self, local_dir: str | Path, key: str, metadata: dict[str, Any] | None = None) -> ArtifactRef:
        """Upload a local folder under a fresh prefix, then write its manifest: the commit point. Storage that
        stops answering fails the commit as an infrastructure fault naming the artifact; what was uploaded without
        its manifest stays invisible."""
        upload = self.begin_upload(key)
        return self.finish_upload(upload, self.put_dir(local_dir, upload), metadata)

    def begin_upload(self, key: str) -> Upload:
        """A fresh upload prefix under ``key``: its files can come from anywhere, its manifest from one place."""
        return Upload(key.strip("/"), f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}")

    def put_dir(self, local_dir: str | Path, upload: Upload, under: str = "") -> builtins.list[ManifestEntry]:
        """Upload a local folder's files into ``upload`` (below ``under``); returns their manifest entries."""
        local_dir, entries = Path(local_dir), []
        with self._transport(upload.key):
            for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
                rel = "/".join(filter(None, (under, file.relative_to(local_dir).as_posix())))
                entries.append(ManifestEntry(path=rel, size=file.stat().st_size, sha256=sha256_file(file)))
                self.fs.put_file(str(file), self._upload_path(upload, rel))
        return entries

    def put_files(self, upload: Upload, files: dict[str, bytes]) -> builtins.list[ManifestEntry]:
        """Upload files held in memory (path -> bytes) into ``upload``; returns their manifest entries."""
        with self._transport(upload.key):
            for rel, data in files.items():
                self.fs.pipe_file(self._upload_path(upload, rel), data)
        return [ManifestEntry(path=p, size=len(d), sha256=hashlib.sha256(d).hexdigest()) for p, d in files.items()]

    def _upload_path(self, upload: Upload, rel: str) -> str:
        """Where ``rel`` of ``upload`` goes, its folder made."""
        remote = self._path(f"{upload.key}/{upload.upload_id}/{rel}")
        self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        return remote

    def finish_upload(
        self, upload: Upload, entries: builtins.list[ManifestEntry], metadata: dict[str, Any] | None = None
    ) -> ArtifactRef:
        """Write the manifest of ``entries``, every file of the artifact wherever it was uploaded from: the commit
        point. Two uploads of one path (two ranks writing the same file name) are refused before it."""
        paths = [entry.path for entry in entries]
        clashes = sorted({path for path in paths if paths.count(path) > 1})
        if clashes:
            raise ValueError(f"{self.uri(upload.key)}: {', '.join(clashes)} uploaded more than once")
        files = sorted(entries, key=lambda entry: entry.path)
        manifest = Manifest(upload_id=upload.upload_id, created=time.time(), files=files, metadata=metadata or {})
        with self._transport(upload.key):
            self._write_whole(self._path(f"{upload.key}/{MANIFEST}"), manifest.model_dump_json(indent=1).encode())
        return ArtifactRef(uri=self.uri(upload.key), digest=manifest.digest())

    @contextmanager
    def _transport(self, key: str) -> Iterator[None]:
        """Storage that stops answering fails the write as an infrastructure fault naming the artifact (one line,
        retried by the orchestrator); what was uploaded without its manifest stays invisible."""
        try:
            yield
        except (StorageError, FileNotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001 - a transport fault
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StorageUnavailable(f"storage did not take {self.uri(key)}: {reason}") from exc

    def _write_whole(self, path: str, data: bytes) -> None:
        """A file that readers see whole or not at all: one PUT on object storage; on a local disk, a temporary
        name renamed into place (a file written in place can be read, or left by a kill, half written)."""
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        if "file" not in protocols:
            self.fs.pipe_file(path, data)
            return
        staged = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
        self.fs.pipe_file(staged, data)
        os.replace(staged, path)

    # ----------------------------------------------------------------------------- reading

    def manifest(self, uri_or_key: str) -> Manifest | None:
        path = self._path(f"{self.key_of(uri_or_key)}/{MANIFEST}")
        try:
            raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            return Manifest.model_validate_json(raw)
        except ValidationError:  # not a whole manifest (written by hand, cut short elsewhere): not committed
            return None

    def is_committed(self, uri_or_key: str) -> bool:
        return self.manifest(uri_or_key) is not None

    def ref(self, uri_or_key: str) -> ArtifactRef | None:
        manifest = self.manifest(uri_or_key)
        if manifest is None:
            return None
        return ArtifactRef(uri=self.uri(self.key_of(uri_or_key)), digest=manifest.digest())

    def list(self, prefix: str) -> builtins.list[str]:  # builtins: this method's name shadows list here
        """Keys of the committed artifacts directly below ``prefix``, sorted by name."""
        self.fs.invalidate_cache()
        pattern = self._path(f"{prefix.strip('/')}/*/{MANIFEST}")
        root = self._root_path.strip("/") + "/"
        keys = [found.lstrip("/")[len(root) :].rsplit("/", 1)[0] for found in self.fs.glob(pattern)]
        return sorted(keys)

    def list_children(self, prefix: str) -> builtins.list[str]:
        """Names of the folders directly below ``prefix`` (committed or not), sorted."""
        try:
            found = self.fs.ls(self._path(prefix.strip("/")), detail=True)
        except FileNotFoundError:
            return []
        return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in found if entry["type"] == "directory")

    def latest(self, prefix: str) -> str | None:
        """The newest key below ``prefix`` whose manifest reads whole (a cut one is passed over)."""
        return next((key for key in reversed(self.list(prefix)) if self.manifest(key) is not None), None)

    def download(self, uri_or_key: str, verify: bool = True) -> Path:
        """A local copy of a committed artifact, cached by content digest: downloaded once per cache, however many
        processes of the machine (the ranks of a group) ask for it at once."""
        key = self.key_of(uri_or_key)
        manifest = self.manifest(key)
        if manifest is None:
            raise StorageError(f"no committed artifact at {self.uri(key)} (its {MANIFEST} is missing)")
        target = self.cache_dir / manifest.digest()
        if (target / ".complete").exists():
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with open(self.cache_dir / f".{manifest.digest()}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the others wait here, then find the first one's copy
            if not (target / ".complete").exists():
                self._fetch(key, manifest, target, verify)
        return target

    def _fetch(self, key: str, manifest: Manifest, target: Path, verify: bool) -> None:
        staging = self.cache_dir / f".{manifest.digest()}.{uuid.uuid4().hex[:8]}"
        for entry in manifest.files:
            local = staging / entry.path
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._path(f"{key}/{manifest.upload_id}/{entry.path}"), str(local))
            if verify and (local.stat().st_size != entry.size or sha256_file(local) != entry.sha256):
                shutil.rmtree(staging, ignore_errors=True)
                raise StorageError(f"artifact {self.uri(key)} is corrupt: {entry.path} does not match its manifest")
        staging.mkdir(parents=True, exist_ok=True)
        (staging / ".complete").touch()
        try:
            os.replace(staging, target)
        except OSError:  # another cache user finished the same download first
            shutil.rmtree(staging, ignore_errors=True)

    def verify(self, uri_or_key: str) -> bool:
        """Re-hash every remote file of an artifact against its manifest."""
        key = self.key_of(uri_or_key)
        manifest = self.manifest(key)
        if manifest is None:
            return False
        for entry in manifest.files:
            data = self.fs.cat_file(self._path(f"{key}/{manifest.upload_id}/{entry.path}"))
            if len(data) != entry.size or hashlib.sha256(data).hexdigest() != entry.sha256:
                return False
        return True

    def open(self, uri_or_key: str, relpath: str, mode: str = "rb"):
        key = self.key_of(uri_or_key)
        manifest = self.manifest(key)
        if manifest is None:
            raise StorageError(f"no committed artifact at {self.uri(key)}")
        return self.fs.open(self._path(f"{key}/{manifest.upload_id}/{relpath}"), mode)

    def read_json(self, uri_or_key: str, relpath: str) -> Any:
        with self.open(uri_or_key, relpath) as handle:
            return json.load(handle)
