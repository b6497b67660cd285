"""Stage entry points: what each Prefect task calls, with the cache logic in one place.

Every stage computes its key from its config sections and its inputs' digests, by content: data files by their
bytes, hub datasets and models by their resolved commit, local and remote models by their files, store artifacts
by their manifest, the user's reward functions and environments by their source. When the store already holds a
committed artifact under that key (and caching is on) the stage returns it as cached; otherwise it runs the engine
in a nested MLflow run and commits its artifact.
"""

from __future__ import annotations

import tempfile
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydantic import BaseModel

from engine import checkpointing, user_code
from engine.caching import folder_digest, stage_key
from engine.config import GRPOConfig, PipelineConfig
from engine.data import sources
from engine.data.datasets import build_splits, resolve_sources, write_jsonl
from engine.errors import ConfigError, DataError, ModelLoadError
from engine.models.loading import ModelSource, hub_revision, resolve_model
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
    """Checks that fail fast, before any stage starts: the store is reachable, local inputs exist, the user's
    reward functions and environments import."""
    open_store(cfg)
    for name, source in (("data.source", cfg.data.source), ("data.val_source", cfg.data.val_source)):
        if source and source != "synthetic" and sources.names_local_path(source):
            try:
                sources.local_paths(source, source)
            except DataError as exc:
                raise DataError(f"{exc} ({name})") from None
    if cfg.model.name.startswith(("/", "./", "~", "file://")):
        if not Path(cfg.model.name.removeprefix("file://")).expanduser().is_dir():
            raise ModelLoadError(f"model folder not found: {cfg.model.name} (model.name)")
    for ref in user_code_refs(cfg.grpo):
        user_code.load(ref)


def user_code_refs(g: GRPOConfig) -> list[user_code.CodeRef]:
    """The user's reward functions and environments (the built-in environments are the engine's own code)."""
    refs = [
        user_code.parse(f.function, f"grpo.reward_functions[{i}].function") for i, f in enumerate(g.reward_functions)
    ]
    refs += [user_code.parse(spec, f"grpo.environments.{task}") for task, spec in g.environments.items()]
    return refs


def user_code_digests(g: GRPOConfig) -> dict[str, str]:
    return {f"code:{ref.spec}": user_code.digest(ref) for ref in user_code_refs(g)}


def prepare_model(rt: Runtime) -> StageResult:
    """The base model as a store artifact ('tiny' is built locally) or an external one, digested by content."""
    model = rt.cfg.model
    if model.name != "tiny":
        local = resolve_model(model.name, rt.store, rt.cache_dir)
        return StageResult(name="model", ref=ArtifactRef(uri=model.name, digest=model_digest(rt, local)), cached=True)
    key = f"models/tiny-{stage_key('tiny_model', model.tiny.model_dump(mode='json'), {})}"
    hit = rt.cached("model", key)
    if hit is not None:
        return hit
    from engine.models.tiny import make_tiny_model  # transformers: imported only when a model is built

    with tempfile.TemporaryDirectory(prefix="tiny-model-") as tmp:
        make_tiny_model(tmp, model.tiny)
        ref = rt.store.commit_dir(tmp, key, metadata={"kind": "model", "tiny": model.tiny.model_dump(mode="json")})
    return StageResult(name="model", ref=ref, cached=False)


def model_digest(rt: Runtime, local: Path, name: str | None = None) -> str:
    """A store artifact by its manifest, a hub snapshot by its commit, any other folder by its files' bytes
    (``name``: the model as the config names it; default ``model.name``)."""
    name = name or rt.cfg.model.name
    manifest = rt.store.manifest(name) if name.startswith(rt.store.root + "/") else None
    if manifest is not None:
        return manifest.digest()
    revision = hub_revision(name, local)
    return folder_digest(local, rt.cache_dir / "digests") if revision is None else f"hub:{name}@{revision}"


def prepare_data(rt: Runtime) -> StageResult:
    """Normalized train/val splits committed to the store as jsonl, keyed by the data's content."""
    cfg = rt.cfg
    resolved = resolve_sources(cfg.data, rt.cache_dir / "data", rt.store.options_for)
    fingerprints = resolved.fingerprints()
    settings = {"data": cfg.data.model_dump(mode="json"), "seed": cfg.seed}
    key = f"datasets/{stage_key('data', settings, fingerprints)}"
    hit = rt.cached("data", key)
    if hit is not None:
        return hit
    train, val = build_splits(cfg.data, resolved, cfg.seed)
    with tempfile.TemporaryDirectory(prefix="dataset-") as tmp:
        write_jsonl(train, Path(tmp) / "train.jsonl")
        write_jsonl(val, Path(tmp) / "val.jsonl")
        metrics = {"train_rows": float(len(train)), "val_rows": float(len(val))}
        metadata = {"kind": "dataset", "metrics": metrics, "source": cfg.data.source, "fingerprints": fingerprints}
        ref = rt.store.commit_dir(tmp, key, metadata=metadata)
    return StageResult(name="data", ref=ref.model_copy(update={"metrics": metrics}), cached=False)


def model_source(rt: Runtime, name: str, local: Path | None = None) -> ModelSource:
    """``name`` as the workers of any node load it, resolved here first (``local``, if it already is): a missing
    model fails before any worker starts, and a hub repo is pinned to the commit the stage was keyed on."""
    return ModelSource.resolved(name, rt.store, local or resolve_model(name, rt.store, rt.cache_dir))


def _run_stage(
    rt: Runtime,
    name: str,
    stage_config: dict[str, Any],
    inputs: dict[str, str],
    parent_run_id: str | None,
    body: Callable[["StageRun", str], ArtifactRef],
    data: ArtifactRef,
    artifact: str = "model",
    data_context: str = "training",
) -> StageResult:
    """Return the committed artifact of this exact stage if there is one; else run ``body`` in a nested
    MLflow run (``body`` gets the run and the stage's store prefix and commits the artifact; ``data`` is logged as
    the run's dataset input)."""
    resumed_from = checkpointing.explicit_checkpoint(rt.store, f"stages/{name}/-", rt.cfg.resume)
    if resumed_from is not None:  # a run continued from a named checkpoint is not a fresh run: its own key
        inputs = {**inputs, "resumed_from": resumed_from}
    prefix = f"stages/{name}/{stage_key(name, stage_config, inputs)}"
    with rt.lock(prefix):  # a second run of the same stage waits here, then finds the first one's artifact
        hit = rt.cached(name, f"{prefix}/{artifact}")
        if hit is not None:
            return hit
        run = rt.tracker.start_stage(parent_run_id, name, stage_config)
        run.set_tags({f"posttrain.input.{k}": v for k, v in inputs.items()})
        source = rt.cfg.data.source + (f":{rt.cfg.data.subset}" if rt.cfg.data.subset else "")
        run.log_dataset(source, data.digest, data.uri, data.metrics, data_context)
        status = "FAILED"
        try:
            ref = body(run, prefix)
            run.log_metrics({f"final/{k}": v for k, v in ref.metrics.items()}, step=0)
            if artifact == "model" and rt.cfg.tracking.registered_model:
                rt.tracker.register_model(rt.cfg.tracking.registered_model, ref.uri, run.run_id, name)
            status = "FINISHED"
            return StageResult(name=name, ref=ref, cached=False, mlflow_run_id=run.run_id)
        finally:
            run.finish(status)


def _training_config(cfg: PipelineConfig, *sections: str) -> dict[str, Any]:
    """A training stage's key material; a profiled run is its own run (a cached one would trace nothing)."""
    profiled = ("profile",) if cfg.profile.steps else ()
    return {"seed": cfg.seed, **cfg.section("policy", "export", *sections, *profiled)}


def train_sft(rt: Runtime, model: ArtifactRef, data: ArtifactRef, parent_run_id: str | None) -> StageResult:
    cfg = rt.cfg

    def body(run: "StageRun", prefix: str) -> ArtifactRef:
        from engine.algorithms.sft import run_sft  # the trainers' imports take seconds; a cache hit skips them

        return run_sft(cfg, rt.store, run, model_source(rt, model.uri), rt.store.download(data.uri), prefix)

    inputs = {"model": model.digest, "data": data.digest}
    return _run_stage(rt, "sft", _training_config(cfg, "sft"), inputs, parent_run_id, body, data)


def train_reward_model(rt: Runtime, start: ArtifactRef, data: ArtifactRef, parent_run_id: str | None) -> StageResult:
    cfg = rt.cfg

    def body(run: "StageRun", prefix: str) -> ArtifactRef:
        from engine.algorithms.rm import run_reward_model

        return run_reward_model(cfg, rt.store, run, model_source(rt, start.uri), rt.store.download(data.uri), prefix)

    inputs = {"start": start.digest, "data": data.digest}
    return _run_stage(rt, "reward_model", _training_config(cfg, "reward_model"), inputs, parent_run_id, body, data)


def train_grpo(
    rt: Runtime, start: ArtifactRef, data: ArtifactRef, reward_model: ArtifactRef | None, parent_run_id: str | None
) -> StageResult:
    cfg = rt.cfg
    uses_rm = reward_model is not None and cfg.grpo.reward_model_weight > 0
    if cfg.grpo.reward_model_weight > 0 and reward_model is None:
        raise DataError("grpo.reward_model_weight > 0 needs a reward model: set stages.reward_model to true or auto")
    inputs = {"start": start.digest, "data": data.digest, **user_code_digests(cfg.grpo)}
    if uses_rm:
        inputs["reward_model"] = reward_model.digest
    critic = cfg.grpo.critic.model if cfg.grpo.advantage_estimator == "gae" else None
    critic_dir = resolve_model(critic, rt.store, rt.cache_dir) if critic else None
    if critic_dir is not None:
        inputs["critic"] = model_digest(rt, critic_dir, critic)

    def body(run: "StageRun", prefix: str) -> ArtifactRef:
        from engine.algorithms.grpo import run_grpo

        rm_model = model_source(rt, reward_model.uri) if uses_rm else None
        critic_model = model_source(rt, critic, critic_dir) if critic else None
        start_model, data_dir = model_source(rt, start.uri), rt.store.download(data.uri)
        return run_grpo(cfg, rt.store, run, start_model, data_dir, prefix, rm_model, critic_model)

    stage_config = _training_config(cfg, "generation", "grpo")
    return _run_stage(rt, "grpo", stage_config, inputs, parent_run_id, body, data)


def train_distill(rt: Runtime, start: ArtifactRef, data: ArtifactRef, parent_run_id: str | None) -> StageResult:
    """The student (``start``) distilled on-policy from ``distill.teacher``, whose digest is part of the key."""
    cfg = rt.cfg
    teacher = distill_teacher(cfg)
    teacher_dir = resolve_model(teacher, rt.store, rt.cache_dir)
    inputs = {
        "start": start.digest,
        "data": data.digest,
        "teacher": model_digest(rt, teacher_dir, teacher),
        **user_code_digests(cfg.grpo),
    }

    def body(run: "StageRun", prefix: str) -> ArtifactRef:
        from engine.algorithms.distill import run_distill

        start_model, data_dir = model_source(rt, start.uri), rt.store.download(data.uri)
        return run_distill(cfg, rt.store, run, start_model, model_source(rt, teacher, teacher_dir), data_dir, prefix)

    stage_config = {**_training_config(cfg, "generation", "distill"), "scoring": scoring_config(cfg.grpo)}
    return _run_stage(rt, "distill", stage_config, inputs, parent_run_id, body, data)


def distill_teacher(cfg: PipelineConfig) -> str:
    if not cfg.distill.teacher:
        raise ConfigError("distill.teacher is required: a hub id, a folder or a store URI of the teacher model")
    return cfg.distill.teacher


def scoring_config(g: GRPOConfig) -> dict[str, Any]:
    """What scores a generated answer (GRPO's environments and reward functions, weighted): part of the key of
    every stage that scores with them but does not train GRPO."""
    return {
        "environment": g.environment,
        "environments": g.environment_classes(),
        "reward_functions": [f.model_dump(mode="json") for f in g.reward_functions],
        "verifier_weight": g.verifier_weight,
        "max_rollout_turns": g.max_rollout_turns,
    }


def train_dpo(rt: Runtime, start: ArtifactRef, data: ArtifactRef, parent_run_id: str | None) -> StageResult:
    cfg = rt.cfg

    def body(run: "StageRun", prefix: str) -> ArtifactRef:
        from engine.algorithms.dpo import run_dpo

        start_model, data_dir = model_source(rt, start.uri), rt.store.download(data.uri)
        return run_dpo(cfg, rt.store, run, start_model, data_dir, prefix, start.digest)

    inputs = {"start": start.digest, "data": data.digest}
    return _run_stage(rt, "dpo", _training_config(cfg, "dpo"), inputs, parent_run_id, body, data)


def evaluate(
    rt: Runtime,
    start: ArtifactRef,
    final: ArtifactRef,
    data: ArtifactRef,
    parent_run_id: str | None,
    start_name: str = "sft",
    preference: bool = False,
) -> StageResult:
    """Held-out generation (greedy pass@1, mean reward, pass@k) with GRPO's own rewards, and, with ``preference``,
    the final model's preference accuracy against the start model; ``start_name`` labels the start model."""
    cfg = rt.cfg
    g = cfg.grpo
    stage_config = {"rewards": scoring_config(g), "start_name": start_name, "preference": preference}
    stage_config.update(cfg.section("policy", "generation", "evaluate"))

    def body(run: "StageRun", prefix: str) -> ArtifactRef:
        from engine.algorithms.evaluate import run_evaluate

        with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
            out = Path(tmp)
            metrics = run_evaluate(
                cfg,
                model_source(rt, start.uri),
                model_source(rt, final.uri),
                rt.store.download(data.uri),
                out,
                start_name,
                preference,
            )
            for plot in sorted(out.glob("*.png")):
                run.log_artifact(plot, "plots")
            ref = rt.store.commit_dir(out, f"{prefix}/result", metadata={"metrics": metrics})
        return ref.model_copy(update={"metrics": metrics})

    inputs = {"start": start.digest, "final": final.digest, "data": data.digest, **user_code_digests(g)}
    return _run_stage(rt, "evaluate", stage_config, inputs, parent_run_id, body, data, "result", "evaluation")
