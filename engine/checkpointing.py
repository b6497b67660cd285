"""Training checkpoints in the store, and the explicit resume policy (auto | never | <uri>).

A checkpoint is a committed artifact ``<stage prefix>/checkpoints/step_NNNNNN`` holding the trainer's
shards (DCP), per-rank RNG and scheduler state, and ``trainer_state.json`` written by the controller:
the step, the data position, the controller's RNG, the metric history so far and the resolved config.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path
from typing import Any

import torch

from engine.errors import ConfigError
from engine.storage import ArtifactStore

TRAINER_STATE = "trainer_state.json"


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


def commit_checkpoint(
    store: ArtifactStore, stage_prefix: str, step: int, staging: Path, trainer_state: dict[str, Any]
) -> str:
    """Write the controller's state beside the workers' shards, then commit; returns the URI."""
    (staging / TRAINER_STATE).write_text(json.dumps(trainer_state))
    key = f"{checkpoint_prefix(stage_prefix)}/step_{step:06d}"
    return store.commit_dir(staging, key, metadata={"step": step}).uri
