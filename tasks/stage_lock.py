"""The stage lock: where runs report to a Prefect server, a stage checks its cache and runs under a Prefect global
concurrency limit named by its store prefix, so two runs never write the same stage artifact at once (the second
waits, then finds the first one's artifact in the cache).

Prefect is imported only when a lock is taken: a stage submitted as a Ray job runs in the cluster without Prefect
unless the task hands it a server to lock on.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterator

from engine import stages
from engine.config import PipelineConfig


@contextmanager
def prefect_stage_lock(store_root: str, prefix: str, timeout_s: float | None) -> Iterator[None]:
    """One slot per (store, stage prefix): a Prefect global concurrency limit, created on first use."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists

    name = "posttrain-stage-" + hashlib.sha256(f"{store_root}/{prefix}".encode()).hexdigest()[:20]
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass
    # strict: a missing limit is an error, not a silent pass; a failed lease renewal (an API blip) must not kill
    # hours of training, so it is tolerated
    # (renewed in the background; a killed holder's slot is revoked by the server about a minute after it dies)
    with concurrency(
        name, occupy=1, strict=True, timeout_seconds=timeout_s, lease_duration=60, raise_on_lease_renewal_failure=False
    ):
        yield


def open_runtime(cfg: PipelineConfig, locking_server: str | None) -> stages.Runtime:
    """The stage's services; with ``locking_server`` (a Prefect API that revokes a dead holder's slot), the lock."""
    runtime = stages.Runtime.open(cfg)
    if locking_server:
        root = cfg.storage.root or ""
        runtime.lock = lambda prefix: prefect_stage_lock(root, prefix, cfg.orchestration.lock_timeout_s)
    return runtime
