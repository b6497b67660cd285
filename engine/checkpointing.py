"""Training checkpoints in the store, the explicit resume policy (auto | never | <uri>), and the final export:
the loop scaffolding every training stage (SFT, reward model, DPO, GRPO) shares.

A checkpoint is a committed artifact ``<stage prefix>/checkpoints/step_NNNNNN`` holding the trainer's
shards (DCP), per-rank RNG and scheduler state, and ``trainer_state.json`` written by the controller:
the step, the data position, the controller's RNG, the metric history so far and the resolved config.
The ranks upload their own files and read them back from the store (``engine.policy.shards``); the controller
writes the manifest last, so no file passes through another node's disk.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.errors import ConfigError
from engine.policy.shards import ShardSource, ShardTarget
from engine.storage import ArtifactRef, ArtifactStore

if TYPE_CHECKING:
    from engine.config import PipelineConfig
    from engine.policy.group import PolicyGroup
    from engine.tracking import StageRun

log = logging.getLogger("posttrain.checkpointing")
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "posttrain_config.yaml"  # the resolved config a committed model was trained with
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def checkpoint_prefix(stage_prefix: str) -> str:
    return f"{stage_prefix}/checkpoints"


def capture_rng() -> dict[str, Any]:
    import torch  # here, not at the top: a cached stage imports no torch

    return {"python": random.getstate(), "torch": torch.get_rng_state().tolist()}


def restore_rng(state: dict[str, Any]) -> None:
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


# what a resumed stage may change against its checkpoint's config: how long it runs and how often it reports
RESUMABLE_CHANGES = ("max_steps", "val_every", "val_size", "checkpoint_every")


def stage_of_prefix(stage_prefix: str) -> str:
    """``stages/<stage>/<key>`` -> ``<stage>``."""
    return stage_prefix.split("/")[1]


def explicit_checkpoint(store: ArtifactStore, stage_prefix: str, resume: str) -> str | None:
    """The checkpoint a ``resume: <uri>`` names for this stage: a URI applies to the stage whose checkpoint it is
    (``.../stages/<stage>/<key>/checkpoints/step_N``); the run's other stages resume as with ``auto``."""
    if resume in ("auto", "never"):
        return None
    parts = store.key_of(resume).split("/")
    if len(parts) < 5 or parts[0] != "stages" or parts[3] != "checkpoints":
        raise ConfigError(f"resume: {resume} is not a stage checkpoint (<store>/stages/<stage>/<key>/checkpoints/...)")
    return resume if parts[1] == stage_of_prefix(stage_prefix) else None


def find_resume_checkpoint(store: ArtifactStore, stage_prefix: str, resume: str) -> str | None:
    """The URI of the checkpoint to resume from, or None to start fresh."""
    if resume == "never":
        return None
    named = explicit_checkpoint(store, stage_prefix, resume)
    if named is not None:
        if not store.is_committed(named):
            raise ConfigError(f"resume: no committed checkpoint at {named}")
        return named
    latest = store.latest(checkpoint_prefix(stage_prefix))
    if latest is None:
        _say_why_not_resumed(store, stage_prefix)
        return None
    return store.uri(latest)


def _say_why_not_resumed(store: ArtifactStore, stage_prefix: str) -> None:
    """One line when the same stage has checkpoints under another config: the key changed, so nothing resumes."""
    stage_root = stage_prefix.rsplit("/", 1)[0]
    others = [key for key in store.list_children(stage_root) if f"{stage_root}/{key}" != stage_prefix]
    latest = [store.latest(checkpoint_prefix(f"{stage_root}/{key}")) for key in others]
    found = sorted((key for key in latest if key), key=lambda key: store.manifest(key).created)
    if found:
        log.info(
            "%s starts from step 0: its config differs from the %d run(s) with checkpoints (%s); "
            "resume=<that uri> continues one where only %s changed",
            stage_of_prefix(stage_prefix),
            len(found),
            store.uri(found[-1]),
            ", ".join(RESUMABLE_CHANGES),
        )


def check_resumable(saved: dict[str, Any], current: dict[str, Any], stage: str, source: str) -> None:
    """A checkpoint resumes a run whose config matches it, but for how long it runs and how often it reports;
    otherwise one line naming what differs."""
    sections = [stage, "policy", "data", "model", "seed"] + (["generation"] if stage in ("grpo", "distill") else [])
    allowed = {f"{stage}.{name}" for name in RESUMABLE_CHANGES}

    def flat(data: Any, prefix: str) -> dict[str, Any]:
        if isinstance(data, dict):
            return {k: v for key, value in data.items() for k, v in flat(value, f"{prefix}.{key}").items()}
        return {prefix: data}

    before = {k: v for section in sections for k, v in flat(saved.get(section), section).items()}
    after = {k: v for section in sections for k, v in flat(current.get(section), section).items()}
    differing = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k) and k not in allowed)
    if differing:
        shown = ", ".join(f"{k} ({before.get(k)!r} -> {after.get(k)!r})" for k in differing[:4])
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        raise ConfigError(
            f"resume: {source} was trained with another config: {shown}{more}; only "
            f"{', '.join(sorted(allowed))} may change when resuming"
        )


@dataclass
class LoopState:
    """What a stage's loop carries across a checkpoint: the steps done and the metrics logged so far."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)  # per-step metrics
    val_history: list[Any] = field(default_factory=list)  # validation results, in the stage's own form
    extra: dict[str, Any] = field(default_factory=dict)  # what else the stage's loop resumes from (JSON)


def resume(
    store: ArtifactStore,
    policy: "PolicyGroup",
    stage_prefix: str,
    cfg: "PipelineConfig",
    run: "StageRun",
    companions: dict[str, "PolicyGroup"] | None = None,
) -> LoopState:
    """The state to continue from: a fresh one, or the chosen checkpoint's (its config checked against this one),
    loaded into the trainer (model, optimizer, scheduler, RNG) and the ``companions`` that train with it (PPO's
    critic, from the checkpoint's folder of that name), with the controller's RNG restored, so the resumed curve is
    the uninterrupted one."""
    uri = find_resume_checkpoint(store, stage_prefix, cfg.resume)
    if uri is None:
        return LoopState()
    state = store.read_json(uri, TRAINER_STATE)
    named = explicit_checkpoint(store, stage_prefix, cfg.resume) or "the checkpoint"
    check_resumable(state["config"], cfg.redacted(), stage_of_prefix(stage_prefix), named)
    source = ShardSource(store.handle(), uri)
    policy.load_checkpoint(source)
    for name, group in (companions or {}).items():
        group.load_checkpoint(source.within(name))
    restore_rng(state["rng"])
    run.set_tags({"posttrain.resumed_from_step": str(state["step"])})
    log.info("%s resumes from step %d", stage_of_prefix(stage_prefix), state["step"])
    return LoopState(state["step"], state.get("history", []), state["val_history"], state.get("extra", {}))


def checkpoint(
    store: ArtifactStore,
    policy: "PolicyGroup",
    stage_prefix: str,
    cfg: "PipelineConfig",
    state: LoopState,
    data_position: int,
    companions: dict[str, "PolicyGroup"] | None = None,
) -> str:
    """Commit the trainer's shards (and each companion's, in a folder of its name) with the loop's state; returns
    the checkpoint's URI."""
    trainer_state = {
        "step": state.step,
        "data_position": data_position,
        "history": state.history,
        "val_history": state.val_history,
        "extra": state.extra,
        "rng": capture_rng(),
        "config": cfg.redacted(),
    }
    return save_checkpoint(store, policy, stage_prefix, trainer_state, companions)


def save_checkpoint(
    store: ArtifactStore,
    policy: "PolicyGroup",
    stage_prefix: str,
    trainer_state: dict[str, Any],
    companions: dict[str, "PolicyGroup"] | None = None,
) -> str:
    """The workers' shards and the controller's state (which holds ``step``), committed; returns the URI."""
    step = trainer_state["step"]
    upload = store.begin_upload(f"{checkpoint_prefix(stage_prefix)}/step_{step:06d}")
    target = ShardTarget(store.handle(), upload)
    files = policy.save_checkpoint(target)
    for name, group in (companions or {}).items():
        files += group.save_checkpoint(target.within(name))
    files += store.put_files(upload, {TRAINER_STATE: json.dumps(trainer_state).encode()})
    return store.finish_upload(upload, files, metadata={"step": step}).uri


def export_model(
    store: ArtifactStore,
    policy: "PolicyGroup",
    base_model_dir: Path,
    key: str,
    cfg: "PipelineConfig",
    metrics: dict[str, float],
    extra_files: dict[str, str] | None = None,
) -> ArtifactRef:
    """Full Hugging Face weights (in ``export.dtype``, uploaded by the rank that gathers them), the base model's
    tokenizer and generation config (over the one the trainer writes) and the resolved config, committed to ``key``."""
    upload = store.begin_upload(key)
    weights = policy.export(ShardTarget(store.handle(), upload), cfg.export_dtype())
    texts = {CONFIG_FILE: cfg.to_yaml(), **(extra_files or {})}
    ours = {name: (base_model_dir / name).read_bytes() for name in TOKENIZER_FILES if (base_model_dir / name).exists()}
    ours.update({name: text.encode() for name, text in texts.items()})
    files = [entry for entry in weights if entry.path not in ours] + store.put_files(upload, ours)
    ref = store.finish_upload(upload, files, metadata={"metrics": metrics})
    return ref.model_copy(update={"metrics": metrics})
