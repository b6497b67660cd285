"""Data-parallel generation workers on Ray.

Prompts are split into contiguous shards, one per worker, and the results put back in order. Weights arrive
through ``update_weights``, or ``update_adapters`` (the refit of ``engine.weight_sync``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from engine import cluster, worker_envs
from engine.config import GenerationConfig, LoraConfig
from engine.errors import InfrastructureError
from engine.generation.interfaces import Completion, SamplingParams
from engine.models.loading import ModelSource, folders_for_workers


def _worker_class(backend: str) -> type:
    if backend == "vllm":
        from engine.generation.vllm import VLLMGenerationWorker

        return VLLMGenerationWorker
    from engine.generation.hf import HFGenerationWorker

    return HFGenerationWorker


class WorkerLost(InfrastructureError):
    """A generation worker died (its process killed, its node gone): an infrastructure fault the controller can
    recover from by restarting the group and pushing the current weights again."""


class GenerationGroup:
    """Workers that load ``model`` each from its own node. ``adapters``: the trainer's LoRA adapters, applied by the
    engine on top of the base it loaded (refits then push the adapters alone, ``generation.lora_refit: adapter``).
    ``wait=False`` returns as soon as the workers are launched, so that their engines load while the caller starts
    other workers (a vLLM worker spends about 20 s importing vLLM); ``wait_started`` then blocks until they are up."""

    def __init__(
        self,
        cfg: GenerationConfig,
        model: ModelSource | Path,
        seed: int = 0,
        adapters: LoraConfig | None = None,
        wait: bool = True,
    ):
        self.cfg, self.model, self.seed, self.adapters = cfg, model, seed, adapters
        self.virtual = cluster.VirtualCluster("generation", cfg.num_workers, gpus_per_bundle=cfg.gpus_per_worker)
        try:
            self._launch()
        except BaseException:  # a node without the vLLM venv, say: its bundle goes back
            self.virtual.release()
            raise
        if wait:
            self.wait_started()

    def wait_started(self) -> None:
        """Block until every worker has loaded its engine; a worker's start-up error raises here."""
        if self._starting:
            cluster.log_placement("generation", ray.get(self._starting))
            self._starting = []

    def _launch(self) -> None:
        """Create the workers; ``self._starting`` holds their ``info`` calls, which answer once each has started."""
        cfg = self.cfg
        envs = [None] * cfg.num_workers
        if cfg.backend == "vllm":  # each worker's node finds its own vLLM venv
            envs = cluster.get(self.virtual.run_on_bundles(worker_envs.node_runtime_env, cfg.worker_env))
        remote_cls = ray.remote(_worker_class(cfg.backend))
        folders = folders_for_workers(self.virtual, self.model)  # fetched on each worker's node, in the main venv
        self.workers = [
            remote_cls.options(
                scheduling_strategy=self.virtual.strategy(i), **self.virtual.actor_options(envs[i])
            ).remote(
                model_path=folders[i],
                dtype=cfg.dtype,
                threads=cfg.threads_per_worker,
                max_model_len=cfg.max_model_len,
                kv_cache_bytes=cfg.kv_cache_bytes,
                seed=self.seed,
                tensor_parallel_size=cfg.tensor_parallel_size,
                **({"lora_rank": self.adapters.rank, "lora_alpha": self.adapters.alpha} if self.adapters else {}),
            )
            for i in range(cfg.num_workers)
        ]
        self._starting = [worker.info.remote() for worker in self.workers]
        self.refit_sender: object | None = None  # the trainer group these workers formed a refit group with

    def restart(self) -> None:
        """Fresh workers on the initial model, in the same bundles; the caller pushes the current weights."""
        for worker in self.workers:
            ray.kill(worker)
        self._launch()
        self.wait_started()

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        size = -(-len(prompts) // len(self.workers))
        refs = [
            worker.generate.remote(prompts[start : start + size], params, first_index=start)
            for worker, start in zip(self.workers, range(0, len(prompts), size))
        ]
        try:
            shards = ray.get(refs, timeout=self.cfg.request_timeout_s)
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost(f"a generation worker died: {str(exc).splitlines()[0]}") from exc
        except ray.exceptions.GetTimeoutError:
            raise WorkerLost(
                f"a generation call took longer than generation.request_timeout_s={self.cfg.request_timeout_s:g}"
            ) from None
        return [completions for shard in shards for completions in shard]

    @property
    def applies_adapters(self) -> bool:
        return self.adapters is not None

    def update_weights(self, manifest: list, buckets: list, version: int) -> None:
        ray.get([worker.update_weights.remote(manifest, buckets, version) for worker in self.workers])

    def update_adapters(self, manifest: list, buckets: list, version: int) -> None:
        ray.get([worker.update_adapters.remote(manifest, buckets, version) for worker in self.workers])

    def join_refit_group(self, address: str, port: int) -> list[ray.ObjectRef]:
        """Every worker joins the refit group hosted at ``address:port`` (ranks 1..n; the sender is rank 0); returns
        the pending calls, which finish once the sender has joined too."""
        world_size = len(self.workers) + 1
        return [w.join_refit_group.remote(address, port, 1 + i, world_size) for i, w in enumerate(self.workers)]

    def check_refit(self, manifest: list) -> None:
        """Every worker checks an announced weight push against its engine (``WeightMismatch`` if it does not fit)."""
        self.call("check_refit", manifest)

    def receive_refit(self, manifest: list, bucket_bytes: int, version: int) -> list[ray.ObjectRef]:
        """Every worker receives the broadcast buckets and reloads its engine; returns the pending calls."""
        return [worker.receive_refit.remote(manifest, bucket_bytes, version) for worker in self.workers]

    def start_profile(self) -> None:
        """Every worker starts a torch profiler trace."""
        self.call("start_profile")

    def stop_profile(self) -> dict[int, bytes]:
        """Each worker's trace since ``start_profile`` (gzipped Chrome trace JSON), by worker."""
        return dict(enumerate(self.call("stop_profile")))

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        return ray.get([getattr(worker, method).remote(*args, **kwargs) for worker in self.workers])

    def shutdown(self) -> None:
        for worker in self.workers:
            ray.kill(worker)
        self.workers = []
        self.virtual.release()
