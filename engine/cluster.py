"""Ray: start or connect, a virtual cluster of placement-group bundles, and worker groups on it.

The embedded default starts Ray in-process, kept on loopback with the dashboard off. A worker group is N
actors of one class, one per bundle, that call each other through torch.distributed; the group's rank 0
picks the rendezvous address, so the same code spans nodes on a real cluster.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from typing import Any, Callable, Sequence

from engine.config import RayConfig
from engine.resources import Bundle, Groups, bundle_of

# Ray reads these when its processes start: keep it on loopback, quiet and unauthenticated locally.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_DEDUP_LOGS": "0",
}

import ray  # noqa: E402
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402

log = logging.getLogger("posttrain.cluster")
worker_log = logging.getLogger("posttrain.workers")


def connect(cfg: RayConfig) -> None:
    """Start the embedded Ray (address 'local') or join a running cluster; a no-op when already up. The workers'
    warnings and errors reach the driver as ``posttrain.workers`` records (``WorkerWarnings``)."""
    if ray.is_initialized():
        return
    if cfg.address == "local":
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(
            address="local",
            num_cpus=cfg.num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            configure_logging=False,
        )
    else:
        ray.init(address=cfg.address, log_to_driver=True, configure_logging=False)
    _forward_worker_warnings()


# What a worker's stderr line must say to reach the driver: a Python warning or a log record at WARNING and above.
# The rest stays in Ray's worker log files: INFO lines, progress bars, and tracebacks, whose exception reaches the
# caller through ray.get anyway (a bad input keeps its one-line error).
_WORTH_A_LINE = re.compile(r"Warning\b|\bWARN(ING)?\b|\bERROR\b|\bCRITICAL\b|\bFATAL\b")


class WorkerWarnings:
    """Ray's stream of worker output, as the driver receives it: stderr lines that warn or fail become
    ``posttrain.workers`` WARNING records (the CLI's stderr, the Prefect task log), each distinct line once."""

    def __init__(self, remembered: int = 10_000):
        self.remembered = remembered
        self._seen: set[str] = set()

    def __call__(self, data: dict[str, Any]) -> None:
        if not data.get("is_err"):
            return
        source = f"{data.get('actor_name') or data.get('task_name') or 'worker'} pid={data.get('pid')}"
        for raw in data.get("lines", []):
            line = raw.rsplit("\r", 1)[-1].strip()  # a progress bar's latest state
            if not line or line in self._seen or not _WORTH_A_LINE.search(line):
                continue
            if len(self._seen) < self.remembered:
                self._seen.add(line)
            worker_log.warning("[%s] %s", source, line)


def _forward_worker_warnings() -> None:
    """In place of the handler ``log_to_driver`` installs, which prints every line of every worker. Ray (pinned)
    offers no public hook for this: its stream dispatcher is private, so a Ray upgrade must keep the integration
    test of this path green."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("posttrain_worker_warnings")
    dispatcher.add_handler("posttrain_worker_warnings", WorkerWarnings())


def rendezvous_point() -> tuple[str, int]:
    """This node's address and a free port on it: where a worker group's rank 0 hosts torch.distributed."""
    address = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((address, 0))
        return address, sock.getsockname()[1]


def ship_by_value(obj: Any) -> None:
    """Make the module that defines ``obj`` travel with it to actors (its source, not an import by name), so a
    user's reward function or environment runs in an actor that could not import the user's file."""
    import sys

    module = sys.modules.get(getattr(obj, "__module__", ""))
    if module is not None and not module.__name__.startswith("engine."):
        ray.cloudpickle.register_pickle_by_value(module)


def get(refs: Any, timeout: float | None = None) -> Any:
    """``ray.get``, with a user error raised in an actor re-raised as itself (one line, never retried) rather
    than wrapped in Ray's task error."""
    from engine.errors import PosttrainError

    try:
        return ray.get(refs, timeout=timeout)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, PosttrainError):
            raise exc.cause from None
        raise


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


def unplaced_bundles(bundles: Sequence[Bundle], nodes: Sequence[dict[str, float]]) -> int:
    """How many of ``bundles`` find no room when packed, largest first, into ``nodes``' total resources: a bundle
    is never split across nodes, so 2 x 1 GPU fits two 1-GPU nodes while 1 x 2 GPUs does not."""
    free = [dict(node) for node in nodes]
    unplaced = 0
    for bundle in sorted(bundles, key=lambda b: (b.get("GPU", 0.0), b["CPU"]), reverse=True):
        node = next((n for n in free if all(n.get(k, 0.0) >= v for k, v in bundle.items())), None)
        if node is None:
            unplaced += 1
            continue
        for key, value in bundle.items():
            node[key] -= value
    return unplaced


def _described(resources: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:g}" for key, value in sorted(resources.items()) if key in ("CPU", "GPU"))


def check_fits(groups: Groups) -> None:
    """Fail in one line, before any actor waits on a placement group that could never be ready, when the
    connected cluster (all its nodes, busy or not) cannot hold the bundles of ``groups`` at once."""
    from engine.errors import ConfigError

    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    bundles = [bundle for count, bundle in groups.values() for _ in range(count)]
    if unplaced_bundles(bundles, nodes):
        totals: dict[str, float] = {}
        for node in nodes:
            for key, value in node.items():
                totals[key] = totals.get(key, 0.0) + value
        asked = " + ".join(f"{role} {count} x {{{_described(bundle)}}}" for role, (count, bundle) in groups.items())
        raise ConfigError(
            f"{asked} do not fit the Ray cluster ({_described(totals) or 'nothing'} on {len(nodes)} node(s), "
            "a worker never split across nodes): lower policy/generation's world_size, num_workers or "
            "gpus_per_worker, or add nodes"
        )


class VirtualCluster:
    """A reserved slice of the cluster: one placement-group bundle per worker, checked to fit first."""

    def __init__(self, role: str, num_bundles: int, cpus_per_bundle: float = 1.0, gpus_per_bundle: float = 0.0):
        self.bundle = bundle_of(cpus_per_bundle, gpus_per_bundle)
        check_fits({role: (num_bundles, self.bundle)})
        self.num_bundles = num_bundles
        self.group: PlacementGroup = placement_group([dict(self.bundle)] * num_bundles, strategy="PACK")
        ray.get(self.group.ready(), timeout=120)

    def strategy(self, index: int) -> PlacementGroupSchedulingStrategy:
        return PlacementGroupSchedulingStrategy(placement_group=self.group, placement_group_bundle_index=index)

    def actor_options(self, runtime_env: dict[str, Any] | None = None) -> dict[str, Any]:
        """Ray options of an actor on one bundle. An actor that reserved no GPU is kept off the node's GPUs
        (Ray >= 2.48 no longer hides them), so nothing lands on a device another worker reserved."""
        gpus = self.bundle.get("GPU", 0.0)
        options: dict[str, Any] = {"num_cpus": self.bundle["CPU"], "num_gpus": gpus}
        env = dict(runtime_env or {})
        if not gpus:
            env["env_vars"] = {**env.get("env_vars", {}), "CUDA_VISIBLE_DEVICES": ""}
        options["runtime_env"] = env
        return options

    def run_on_bundles(self, fn: Callable[..., Any], *args: Any) -> list[ray.ObjectRef]:
        """``fn(*args)`` as a task in each bundle, so on the node that bundle's worker will run on (a model fetched
        into that node's cache). A worker given the task's ref as an argument starts once the task is done."""
        task = ray.remote(fn)
        return [
            task.options(num_cpus=self.bundle["CPU"], num_gpus=0, scheduling_strategy=self.strategy(i)).remote(*args)
            for i in range(self.num_bundles)
        ]

    def release(self) -> None:
        remove_placement_group(self.group)


def placement() -> dict[str, Any]:
    """Where the calling actor runs: its node, the GPUs Ray gave it (what ``CUDA_VISIBLE_DEVICES`` holds) and its torch
    threads; empty outside Ray."""
    import torch

    if not ray.is_initialized():
        return {}
    return {
        "node": ray.get_runtime_context().get_node_id(),
        "gpu_ids": [str(i) for i in ray.get_gpu_ids()],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "threads": torch.get_num_threads(),
    }


def log_placement(role: str, infos: Sequence[dict[str, Any]]) -> None:
    """One line per worker of a group that started: which node, which GPUs, how many threads (``placement()``)."""
    for index, info in enumerate(infos):
        gpus = info.get("cuda_visible_devices") or "none"
        node, threads = str(info.get("node"))[:12], info.get("threads")
        log.info("%s worker %d on node %s, threads=%s, CUDA_VISIBLE_DEVICES=%s", role, index, node, threads, gpus)


class WorkerGroup:
    """N Ray actors of ``worker_cls``, rank i on bundle i; methods are called on all ranks at once, and a user error
    a rank raises (a corrupt checkpoint in the store, say) reaches the caller as itself."""

    def __init__(
        self,
        worker_cls: type,
        cluster: VirtualCluster,
        world_size: int,
        init_kwargs: dict[str, Any],
        runtime_env: dict[str, Any] | None = None,
        rank_kwargs: Sequence[dict[str, Any]] | None = None,
    ):
        """``rank_kwargs[i]``: rank i's own constructor arguments on top of ``init_kwargs`` (object refs are
        resolved before the rank starts)."""
        remote_cls = ray.remote(worker_cls)
        options = cluster.actor_options(runtime_env)
        self.world_size = world_size
        own = rank_kwargs or [{}] * world_size
        self.actors = [
            remote_cls.options(scheduling_strategy=cluster.strategy(rank), **options).remote(
                rank=rank, world_size=world_size, **init_kwargs, **own[rank]
            )
            for rank in range(world_size)
        ]
        address, port = ray.get(self.actors[0].rendezvous_address.remote())
        ray.get([actor.init_distributed.remote(address, port) for actor in self.actors])

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """The same arguments to every rank; returns the per-rank results."""
        return get([getattr(actor, method).remote(*args, **kwargs) for actor in self.actors])

    def call_per_rank(self, method: str, per_rank_args: Sequence[tuple], **kwargs: Any) -> list[Any]:
        """Rank i gets ``per_rank_args[i]`` (e.g. its shard of a batch)."""
        refs = [getattr(actor, method).remote(*args, **kwargs) for actor, args in zip(self.actors, per_rank_args)]
        return get(refs)

    def call_on(self, ranks: Sequence[int], method: str, *args: Any) -> list[Any]:
        """``method`` on the listed ranks only; their results in that order."""
        return get(self.submit_on(ranks, method, *args))

    def submit_on(self, ranks: Sequence[int], method: str, *args: Any) -> list[ray.ObjectRef]:
        """``call_on`` without waiting: the calls' object refs, for calls that must run alongside another group's."""
        return [getattr(self.actors[rank], method).remote(*args) for rank in ranks]

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
