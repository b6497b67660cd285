"""grpo-pipeline on many machines, on one machine: Ray's multi-node test cluster (a head for the controller and four
one-CPU worker nodes on 127.0.0.1, each with a scratch root of its own) against the same run on the embedded Ray.

Every worker fetches what it loads from the store into its own node's scratch root and uploads what it writes, so
the run on the cluster reaches the single-node run's metrics, and a worker node lost mid-GRPO (its raylet and
workers killed) costs one retry that resumes from the last committed checkpoint on the nodes that are left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.storage import ArtifactStore
from tests.conftest import POSTTRAIN, files_under, multinode_cluster, run_cli
from tests.e2e.test_sft_cli import stage_runs, summary_of

pytestmark = [pytest.mark.slow, pytest.mark.extended]

SHORT = {
    "policy.world_size": 2,  # the trainer ranks on two nodes, the vLLM worker on a third
    "sft.max_steps": 30,
    "grpo.max_steps": 6,
    "grpo.val_every": 3,
    "grpo.checkpoint_every": 3,
    "grpo.val_size": 16,
    "evaluate.size": 16,
    "orchestration.retry_delay_s": 1,
}
ARGS = ["run", "grpo-pipeline", "--json", *[a for k, v in SHORT.items() for a in ("--set", f"{k}={v}")]]
NODES = ("a", "b", "c", "d")  # two trainer ranks and the vLLM worker, and one node to spare for a lost one


@pytest.fixture(scope="module")
def single_node(services, tmp_path_factory):
    """The short pipeline on the embedded Ray: the reference."""
    workdir = tmp_path_factory.mktemp("single-node")
    return summary_of(run_cli(ARGS, workdir, env=services.prefect_env))


@pytest.fixture
def four_nodes(tmp_path):
    scratch = {node: tmp_path / f"node_{node}" for node in NODES}
    with multinode_cluster(scratch) as cluster:
        yield SimpleNamespace(scratch=scratch, **vars(cluster))


def outcome(summary: dict) -> dict[str, dict[str, float]]:
    """Each trained or evaluated stage's metrics, less its timings."""
    return {
        name: {key: value for key, value in stage["metrics"].items() if "seconds" not in key}
        for name, stage in summary["stages"].items()
        if name in ("sft", "grpo", "evaluate")
    }


def assert_same_outcome(summary: dict, reference: dict) -> None:
    got, want = outcome(summary), outcome(reference)
    assert got.keys() == want.keys() == {"sft", "grpo", "evaluate"}
    for stage, metrics in want.items():
        assert got[stage].keys() == metrics.keys(), stage
        for key, value in metrics.items():
            assert got[stage][key] == pytest.approx(value, abs=1e-5), (stage, key)


def fetched(root: Path) -> set[str]:
    """The digests of the artifacts a node's scratch root holds; fails on anything else left there."""
    files = files_under(root)
    assert all(name.startswith("artifacts/") for name in files), files  # no staged shards left behind
    return {name.split("/")[1].removeprefix(".").removesuffix(".lock") for name in files}


def digests(workdir: Path, summary: dict, *stages: str) -> set[str]:
    store = ArtifactStore(f"file://{workdir}/.posttrain/store", workdir / "digests-cache")
    return {store.manifest(summary["stages"][stage]["artifact"]).digest() for stage in stages}


@pytest.mark.timeout(2400)  # services 300, two runs of 900
def test_grpo_pipeline_on_four_nodes_matches_the_single_node_run(single_node, four_nodes, services, tmp_path):
    workdir = tmp_path / "cluster-run"
    workdir.mkdir()
    result = run_cli([*ARGS, "--set", f"ray.address={four_nodes.address}"], workdir, 900, services.prefect_env)
    summary = summary_of(result)
    assert not any(stage["cached"] for stage in summary["stages"].values())
    assert_same_outcome(summary, single_node)
    # SFT's trainers fetched the base model, GRPO's trainers and vLLM worker and the evaluation's the SFT model; a
    # checkpoint or export went from each rank's node to the store and left nothing behind
    per_node = {node: fetched(root) for node, root in four_nodes.scratch.items()}
    assert set().union(*per_node.values()) == digests(workdir, summary, "model", "sft")
    assert sum(bool(held) for held in per_node.values()) >= 3  # GRPO's three workers on three nodes


@pytest.mark.timeout(2400)  # services 300, the reference 900, the run with its retry 900
def test_a_worker_node_lost_mid_grpo_is_retried_on_the_nodes_left(single_node, four_nodes, services, tmp_path):
    """After GRPO's first checkpoint, the node of a trainer rank goes (raylet and workers killed): the stage fails as
    an infrastructure fault, Prefect retries it, and the retry, placed on the three nodes left, resumes at step 3
    and ends where the single-node run did."""
    workdir = tmp_path / "node-lost"
    workdir.mkdir()
    log = (tmp_path / "node-lost.log").open("w")  # a pipe nobody reads until the end could fill and stall the run
    proc = subprocess.Popen(
        [POSTTRAIN, *ARGS, "--set", f"ray.address={four_nodes.address}"],
        cwd=workdir,
        env={**os.environ, **services.prefect_env},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        checkpoints = workdir / ".posttrain/store/stages/grpo"
        deadline = time.monotonic() + 900
        while not list(checkpoints.glob("*/checkpoints/step_000003/MANIFEST.json")):
            assert proc.poll() is None and time.monotonic() < deadline, "no GRPO checkpoint"
            time.sleep(0.2)
        lost = node_of_a_trainer(four_nodes.scratch)
        four_nodes.cluster.remove_node(four_nodes.nodes[lost], allow_graceful=False)
        stdout, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    assert proc.returncode == 0, (tmp_path / "node-lost.log").read_text()[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert_same_outcome(summary, single_node)
    client, runs = stage_runs(workdir, "grpo")
    assert [run.info.status for run in runs] == ["FAILED", "FINISHED"]  # the attempt that lost a node, its retry
    assert runs[-1].data.tags["posttrain.resumed_from_step"] == "3"
    checkpoint = next(checkpoints.glob("*/checkpoints/step_000003"))
    store = ArtifactStore(f"file://{workdir}/.posttrain/store", workdir / "digests-cache")
    step_3 = store.manifest(f"{store.root}/{checkpoint.relative_to(workdir / '.posttrain/store')}").digest()
    resumed_on = {node for node in NODES if node != lost and step_3 in fetched(four_nodes.scratch[node])}
    assert len(resumed_on) == 2  # the retry's two ranks read the checkpoint on two of the nodes left


def node_of_a_trainer(scratch: dict[str, Path]) -> str:
    """The node (by name) whose scratch root a live FSDP2 trainer process was given."""
    pids = subprocess.run(["pgrep", "-f", "FSDP2PolicyWorker"], capture_output=True, text=True).stdout.split()
    roots = {str(root): node for node, root in scratch.items()}
    for pid in pids:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"POSTTRAIN_SCRATCH="):
                node = roots.get(entry.split(b"=", 1)[1].decode())
                if node is not None:
                    return node
    raise AssertionError("no trainer process runs on a worker node of the cluster")
