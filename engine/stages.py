"""Stage entry points: what each Prefect task calls, with the cache logic in one place.

Every stage computes its key from its config sections and its inputs' digests; when the store already
holds a committed artifact under that key (and caching is on) the stage returns it as cached; otherwise
it runs the engine in a nested MLflow run and commits its artifact.
"""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel

from engine.caching import stage_key
from engine.config import PipelineConfig
from engine.data.datasets import FILE_FORMATS, build_splits, write_jsonl
from engine.errors import DataError, ModelLoadError
from engine.models.loading import resolve_model
from engine.storage import ArtifactRef, ArtifactStore

if TYPE_CHECKING:
    from engine.tracking import StageRun, Tracker


class StageResult(BaseModel):
    name: str
    ref: ArtifactRef
    cached: bool
    mlflow_run_id: str | None = None


@dataclass
class Runtime:
    """The services a stage talks to, opened from the config in whatever process runs the stage. ``lock`` guards
    a stage's store prefix while it is checked and written (the orchestrator supplies a shared one)."""

    cfg: PipelineConfig
    store: ArtifactStore
    tracker: "Tracker"
    lock: Callable[[str], AbstractContextManager] = field(default=lambda prefix: nullcontext())

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
    for name, source in (("data.source", cfg.data.source), ("data.val_source", cfg.data.val_source)):
        if source and _names_local_file(source) and not Path(source.removeprefix("file://")).is_file():
            raise DataError(f"dataset file not found: {source} ({name})")
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


def _run_stage(
    rt: Runtime,
    name: str,
    stage_config: dict[str, Any],
    inputs: dict[str, str],
    parent_run_id: str | None,
    body: Callable[["StageRun", str], ArtifactRef],
    artifact: str = "model",
) -> StageResult:
    """Return the committed artifact of this exact stage if there is one; else run ``body`` in a nested
    MLflow run (``body`` gets the run and the stage's store prefix and commits the artifact)."""
    prefix = f"stages/{name}/{stage_key(name, stage_config, inputs)}"
    with rt.lock(prefix):  # a second run of the same stage waits here, then finds the first one's artifact
        hit = rt.cached(name, f"{prefix}/{artifact}")
        if hit is not None:
            return hit
        run = rt.tracker.start_stage(parent_run_id, name, stage_config)
        run.set_tags({f"posttrain.input.{k}": v for k, v in inputs.items()})
        status = "FAILED"
        try:
            ref = body(run, prefix)
            run.log_metrics({f"final/{k}": v for k, v in ref.metrics.items()}, step=0)
            status = "FINISHED"
            return StageResult(name=name, ref=ref, cached=False, mlflow_run_id=run.run_id)
        finally:
            run.finish(status)


def train_sft(rt: Runtime, model: ArtifactRef, data: ArtifactRef, parent_run_id: str | None) -> StageResult:
    cfg = rt.cfg
    stage_config = {"seed": cfg.seed, **cfg.section("policy", "sft")}

    def body(run: "StageRun", prefix: str) -> ArtifactRef:
        from engine.algorithms.sft import run_sft  # the trainers' imports take seconds; a cache hit skips them

        return run_sft(cfg, rt.store, run, local_model_dir(rt, model), rt.store.download(data.uri), prefix)

    return _run_stage(rt, "sft", stage_config, {"model": model.digest, "data": data.digest}, parent_run_id, body)


def train_reward_model(rt: Runtime, sft: ArtifactRef, data: ArtifactRef, parent_run_id: str | None) -> StageResult:
    cfg = rt.cfg
    stage_config = {"seed": cfg.seed, "system_prompt": cfg.data.system_prompt, **cfg.section("policy", "reward_model")}

    def body(run: "StageRun", prefix: str) -> ArtifactRef:
        from engine.algorithms.rm import run_reward_model

        return run_reward_model(cfg, rt.store, run, local_model_dir(rt, sft), rt.store.download(data.uri), prefix)

    return _run_stage(rt, "reward_model", stage_config, {"sft": sft.digest, "data": data.digest}, parent_run_id, body)


def train_grpo(
    rt: Runtime, sft: ArtifactRef, data: ArtifactRef, reward_model: ArtifactRef | None, parent_run_id: str | None
) -> StageResult:
    cfg = rt.cfg
    uses_rm = reward_model is not None and cfg.grpo.reward_model_weight > 0
    stage_config = {
        "seed": cfg.seed,
        "system_prompt": cfg.data.system_prompt,
        **cfg.section("policy", "generation", "grpo"),
    }
    inputs = {"sft": sft.digest, "data": data.digest, **({"reward_model": reward_model.digest} if uses_rm else {})}

    def body(run: "StageRun", prefix: str) -> ArtifactRef:
        from engine.algorithms.grpo import run_grpo

        reward_model_dir = local_model_dir(rt, reward_model) if uses_rm else None
        sft_dir, data_dir = local_model_dir(rt, sft), rt.store.download(data.uri)
        return run_grpo(cfg, rt.store, run, sft_dir, data_dir, prefix, reward_model_dir)

    return _run_stage(rt, "grpo", stage_config, inputs, parent_run_id, body)


def train_dpo(rt: Runtime, sft: ArtifactRef, data: ArtifactRef, parent_run_id: str | None) -> StageResult:
    cfg = rt.cfg
    stage_config = {"seed": cfg.seed, "system_prompt": cfg.data.system_prompt, **cfg.section("policy", "dpo")}

    def body(run: "StageRun", prefix: str) -> ArtifactRef:
        from engine.algorithms.dpo import run_dpo

        sft_dir, data_dir = local_model_dir(rt, sft), rt.store.download(data.uri)
        return run_dpo(cfg, rt.store, run, sft_dir, data_dir, prefix, sft.digest, data.digest)

    return _run_stage(rt, "dpo", stage_config, {"sft": sft.digest, "data": data.digest}, parent_run_id, body)


def evaluate(
    rt: Runtime, sft: ArtifactRef, final: ArtifactRef, data: ArtifactRef, parent_run_id: str | None
) -> StageResult:
    cfg = rt.cfg
    stage_config = {
        "environment": cfg.grpo.environment,
        "max_rollout_turns": cfg.grpo.max_rollout_turns,
        "system_prompt": cfg.data.system_prompt,
        **cfg.section("generation", "evaluate"),
    }

    def body(run: "StageRun", prefix: str) -> ArtifactRef:
        from engine.algorithms.evaluate import run_evaluate

        with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
            out = Path(tmp)
            metrics = run_evaluate(
                cfg, local_model_dir(rt, sft), local_model_dir(rt, final), rt.store.download(data.uri), out
            )
            for plot in sorted(out.glob("*.png")):
                run.log_artifact(plot, "plots")
            ref = rt.store.commit_dir(out, f"{prefix}/result", metadata={"metrics": metrics})
        return ref.model_copy(update={"metrics": metrics})

    inputs = {"sft": sft.digest, "final": final.digest, "data": data.digest}
    return _run_stage(rt, "evaluate", stage_config, inputs, parent_run_id, body, artifact="result")
