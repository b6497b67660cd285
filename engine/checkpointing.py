"""Training checkpoints in the store, and the explicit resume policy (auto | never | <uri>).

A checkpoint is a committed artifact ``<stage prefix>/checkpoints/step_NNNNNN`` holding the trainer's
shards (DCP), per-rank RNG and scheduler state, and ``trainer_state.json`` written by the controller:
the step, the data position, the controller's RNG, the metric history so far and the resolved config.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.errors import ConfigError
from engine.storage import ArtifactRef, ArtifactStore

if TYPE_CHECKING:
    from engine.cluster import WorkerGroup

TRAINER_STATE = "trainer_state.json"
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
    return {"python": random.getstate(), "torch": torch.get_rng_state().tolist()}


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))


def find_resume_checkpoint(store: ArtifactStore, stage_prefix: str, resume: str) -> Path | None:
    """The local folder of the checkpoint to resume from, or None to start fresh."""
    if resume == "never":
        return None
    if resume == "auto":
        latest = store.latest(checkpoint_prefix(stage_prefix))
        return store.download(latest) if latest else None
    if not store.is_committed(resume):
        raise ConfigError(f"resume: no committed checkpoint at {resume}")
    return store.download(resume)


def read_trainer_state(checkpoint_dir: Path) -> dict[str, Any]:
    return json.loads((checkpoint_dir / TRAINER_STATE).read_text())


def new_staging_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


def save_checkpoint(
    store: ArtifactStore, workers: "WorkerGroup", stage_prefix: str, trainer_state: dict[str, Any]
) -> str:
    """The workers' shards and the controller's state (which holds ``step``), committed; returns the URI."""
    staging = new_staging_dir("ckpt-")
    try:
        workers.call("save_checkpoint", str(staging))
        (staging / TRAINER_STATE).write_text(json.dumps(trainer_state))
        step = trainer_state["step"]
        key = f"{checkpoint_prefix(stage_prefix)}/step_{step:06d}"
        return store.commit_dir(staging, key, metadata={"step": step}).uri
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def copy_tokenizer(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, target / name)


def export_model(
    store: ArtifactStore,
    workers: "WorkerGroup",
    base_model_dir: Path,
    key: str,
    config_yaml: str,
    metrics: dict[str, float],
    extra_files: dict[str, str] | None = None,
) -> ArtifactRef:
    """Full Hugging Face weights, the base model's tokenizer and the resolved config, committed to ``key``."""
    export = new_staging_dir("model-")
    try:
        workers.call("export_hf", str(export))
        copy_tokenizer(base_model_dir, export)
        (export / "posttrain_config.yaml").write_text(config_yaml)
        for name, text in (extra_files or {}).items():
            (export / name).write_text(text)
        ref = store.commit_dir(export, key, metadata={"metrics": metrics})
    finally:
        shutil.rmtree(export, ignore_errors=True)
    return ref.model_copy(update={"metrics": metrics})
