"""Stage entry points: what each Prefect task calls, with the cache logic in one place.

Every stage computes its key from its config sections and its inputs' digests; when the store already
holds a committed artifact under that key (and caching is on) the stage returns it as cached; otherwise
it runs the engine in a nested MLflow run and commits its artifact.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from engine.caching import stage_key
from engine.config import PipelineConfig
from engine.data.datasets import FILE_FORMATS, build_splits, write_jsonl
from engine.errors import DataError, ModelLoadError
from engine.models.loading import resolve_model
from engine.storage import ArtifactRef, ArtifactStore

if TYPE_CHECKING:
    from engine.tracking import Tracker


class StageResult(BaseModel):
    name: str
    ref: ArtifactRef
    cached: bool
    mlflow_run_id: str | None = None


@dataclass
class Runtime:
    """The services a stage talks to, opened from the config in whatever process runs the stage."""

    cfg: PipelineConfig
    store: ArtifactStore
    tracker: "Tracker"

    @classmethod
    def open(cls, cfg: PipelineConfig) -> "Runtime":
        from engine.tracking import Tracker  # MLflow costs seconds to import: only where a stage runs

        return cls(cfg, open_store(cfg), Tracker.from_config(cfg))

    @property
    def cache_dir(self) -> Path:
        return Path(self.cfg.workdir) / "cache"

    def cached(self, name: str, key: str) -> StageResult | None:
        if not self.cfg.cache:
            return None
        manifest = self.store.manifest(key)
        if manifest is None:
            return None
        metrics = manifest.metadata.get("metrics", {})
        ref = ArtifactRef(uri=self.store.uri(key), digest=manifest.digest(), metrics=metrics)
        return StageResult(name=name, ref=ref, cached=True)


def open_store(cfg: PipelineConfig) -> ArtifactStore:
    store = ArtifactStore.from_config(cfg.storage, cfg.workdir)
    store.check()
    return store


def preflight(cfg: PipelineConfig) -> None:
    """Checks that fail fast, before any stage starts: the store is reachable, local inputs exist."""
    open_store(cfg)
    for field, source in (("data.source", cfg.data.source), ("data.val_source", cfg.data.val_source)):
        if source and _names_local_file(source) and not Path(source.removeprefix("file://")).is_file():
            raise DataError(f"dataset file not found: {source} ({field})")
    if cfg.model.name.startswith(("/", "./", "~", "file://")):
        if not Path(cfg.model.name.removeprefix("file://")).expanduser().is_dir():
            raise ModelLoadError(f"model folder not found: {cfg.model.name} (model.name)")


def _names_local_file(source: str) -> bool:
    return source.startswith("file://") or ("://" not in source and Path(source).suffix in FILE_FORMATS)


def prepare_model(rt: Runtime) -> StageResult:
    """The base model as a store artifact ('tiny' is built locally) or a resolvable external name."""
    model = rt.cfg.model
    if model.name != "tiny":
        local = resolve_model(model.name, rt.store, rt.cache_dir)
        digest = stage_key("model", {"name": model.name, "path": str(local)}, {})
        return StageResult(name="model", ref=ArtifactRef(uri=model.name, digest=digest), cached=True)
    key = f"models/tiny-{stage_key('tiny_model', model.tiny.model_dump(mode='json'), {})}"
    hit = rt.cached("model", key)
    if hit is not None:
        return hit
    from engine.models.tiny import make_tiny_model  # transformers: imported only when a model is built

    with tempfile.TemporaryDirectory(prefix="tiny-model-") as tmp:
        make_tiny_model(tmp, model.tiny)
        ref = rt.store.commit_dir(tmp, key, metadata={"kind": "model", "tiny": model.tiny.model_dump(mode="json")})
    return StageResult(name="model", ref=ref, cached=False)


def prepare_data(rt: Runtime) -> StageResult:
    """Normalised train/val splits committed to the store as jsonl."""
    cfg = rt.cfg
    key = f"datasets/{stage_key('data', {'data': cfg.data.model_dump(mode='json'), 'seed': cfg.seed}, {})}"
    hit = rt.cached("data", key)
    if hit is not None:
        return hit
    train, val = build_splits(cfg.data, rt.cache_dir / "data", rt.store.fs.storage_options, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="dataset-") as tmp:
        write_jsonl(train, Path(tmp) / "train.jsonl")
        write_jsonl(val, Path(tmp) / "val.jsonl")
        metrics = {"train_rows": float(len(train)), "val_rows": float(len(val))}
        ref = rt.store.commit_dir(tmp, key, metadata={"kind": "dataset", "metrics": metrics})
    return StageResult(name="data", ref=ref.model_copy(update={"metrics": metrics}), cached=False)


def local_model_dir(rt: Runtime, ref: ArtifactRef) -> Path:
    return resolve_model(ref.uri, rt.store, rt.cache_dir)


def train_sft(rt: Runtime, model: ArtifactRef, data: ArtifactRef, parent_run_id: str | None) -> StageResult:
    from engine.algorithms.sft import run_sft

    cfg = rt.cfg
    stage_config: dict[str, Any] = {"seed": cfg.seed, **cfg.section("policy", "sft")}
    prefix = f"stages/sft/{stage_key('sft', stage_config, {'model': model.digest, 'data': data.digest})}"
    hit = rt.cached("sft", f"{prefix}/model")
    if hit is not None:
        return hit
    run = rt.tracker.start_stage(parent_run_id, "sft", stage_config)
    status = "FAILED"
    try:
        ref = run_sft(cfg, rt.store, run, local_model_dir(rt, model), rt.store.download(data.uri), prefix)
        run.log_metrics({f"final/{k}": v for k, v in ref.metrics.items()}, step=cfg.sft.max_steps)
        status = "FINISHED"
        return StageResult(name="sft", ref=ref, cached=False, mlflow_run_id=run.run_id)
    finally:
        run.finish(status)
