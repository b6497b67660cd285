"""Fixtures the worker-group tests share."""

import pytest

from engine.config import SyntheticDataConfig
from engine.data.chat import tokenize_conversation
from engine.data.synthetic import make_arithmetic

STEPS, BATCH = 3, 24


@pytest.fixture(scope="module")
def examples(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows, _ = make_arithmetic(SyntheticDataConfig(num_train=STEPS * BATCH, num_val=1))
    messages = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["answer"]}] for r in rows]
    # vary lengths so micro-batches pad differently
    for i, m in enumerate(messages):
        m[0]["content"] += " Think." * (i % 4)
    return [tokenize_conversation(tok, m, 256) for m in messages], tok.pad_token_id


@pytest.fixture(scope="session")
def synchronous_grpo_curve(ray_local, tiny_model_dir) -> list[dict[str, float]]:
    """The uninterrupted synchronous run of ``tests.integration.test_worker_loss.grpo_run``, which the worker-loss
    and asynchronous-GRPO runs are compared with."""
    from tests.integration.test_worker_loss import grpo_run

    return grpo_run(tiny_model_dir, kill_before_step=None)


@pytest.fixture
def store(tmp_path):
    """A store in the test's folder, which the workers open themselves as on a cluster."""
    from engine.storage import ArtifactStore

    return ArtifactStore(f"file://{tmp_path}/store", tmp_path / "cache")


def commit_checkpoint(store, group, key: str = "ckpt") -> str:
    """``group``'s checkpoint, uploaded by its ranks and committed as the controller commits it; returns its URI."""
    from engine.policy.shards import ShardTarget

    upload = store.begin_upload(key)
    return store.finish_upload(upload, group.save_checkpoint(ShardTarget(store.handle(), upload))).uri


def load_checkpoint(store, group, uri: str) -> None:
    from engine.policy.shards import ShardSource

    group.load_checkpoint(ShardSource(store.handle(), uri))


def export_folder(store, group, dtype: str = "float32", key: str = "export"):
    """``group``'s Hugging Face export, committed and downloaded: the folder a user loads."""
    from engine.policy.shards import ShardTarget

    upload = store.begin_upload(key)
    store.finish_upload(upload, group.export(ShardTarget(store.handle(), upload), dtype))
    return store.download(key)
