"""Trainer ranks on different machines, on one machine: Ray's own multi-node test cluster, a head for the controller
and three one-CPU worker nodes on 127.0.0.1, each with a scratch root of its own (``POSTTRAIN_SCRATCH``).

Each rank uploads its checkpoint shards from its own node and the controller commits them; a group placed on other
nodes fetches its starting model and the checkpoint from the store into its own nodes' scratch roots and continues
the uninterrupted curve. Nothing passes through another node's disk, the controller's included.
"""

from __future__ import annotations

import pytest
import ray
import torch

from engine import checkpointing, cluster, worker_envs
from engine.algorithms.sft import sft_loss
from engine.config import GenerationConfig, RayConfig, load_config
from engine.generation.group import GenerationGroup
from engine.models.loading import ModelSource
from engine.policy.shards import ShardSource
from engine.storage import ArtifactStore
from tests.conftest import connect_embedded_ray, files_under, multinode_cluster
from tests.integration.conftest import BATCH, STEPS
from tests.integration.test_fsdp2 import assert_same_curve, make_policy, train_curve

NODES = ("a", "b", "c")


@pytest.fixture(scope="module")
def three_nodes(tmp_path_factory):
    """The cluster's address and each worker node's scratch root; the embedded Ray of the other tests is stopped
    for the module and started again after it."""
    was_up = ray.is_initialized()
    cluster.shutdown()
    scratch = {node: tmp_path_factory.mktemp(f"node_{node}") for node in NODES}
    no_envs = {"c": {"POSTTRAIN_ENVS_DIR": str(tmp_path_factory.mktemp("node_c_envs"))}}  # c has no vLLM venv built
    try:
        with multinode_cluster(scratch, no_envs) as nodes:
            cluster.connect(RayConfig(address=nodes.address))
            yield scratch
            cluster.shutdown()
    finally:
        if was_up:
            connect_embedded_ray()


@ray.remote(num_cpus=1)
class Occupant:
    """Holds a node's only CPU, so a group is placed on the other two."""

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()


def occupy(node: str) -> ray.actor.ActorHandle:
    occupant = Occupant.options(resources={f"node_{node}": 1}).remote()
    ray.get(occupant.node.remote())
    return occupant


def test_ranks_on_two_nodes_commit_their_own_shards_and_a_group_on_other_nodes_resumes_from_the_store(
    three_nodes, tiny_model_dir, examples, tmp_path
):
    data, pad = examples
    store = ArtifactStore(f"file://{tmp_path}/store", tmp_path / "controller_cache")
    occupant = occupy("c")
    policy = make_policy(tiny_model_dir, pad, world_size=2, token_budget=100_000)
    try:
        first_nodes = [info["node"] for info in policy.info()]
        first = train_curve(policy, data, steps=1)
        uri = checkpointing.save_checkpoint(store, policy, "stages/sft/k", {"step": 1})
        uninterrupted = [policy.train(data[s * BATCH : (s + 1) * BATCH], sft_loss) for s in range(1, STEPS)]
        cfg = load_config(None)
        exported = checkpointing.export_model(store, policy, tiny_model_dir, "stages/sft/k/model", cfg, {})
    finally:
        policy.shutdown()
        ray.kill(occupant)
    assert len(set(first_nodes)) == 2  # one rank per node
    committed = [entry.path for entry in store.manifest(uri).files]
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp", "rank0.pt", "rank1.pt"} <= set(committed)
    assert "trainer_state.json" in committed
    assert all(files_under(three_nodes[node]) == [] for node in ("a", "b"))  # staged, uploaded, removed

    base = store.commit_dir(tiny_model_dir, "models/tiny")  # the starting model, as the pipeline's model stage has it
    source = ModelSource(base.uri, store.handle())
    occupant = occupy("a")
    resumed = make_policy(source, pad, world_size=2, token_budget=100_000)
    try:
        resumed_nodes = [info["node"] for info in resumed.info()]
        resumed.load_checkpoint(ShardSource(store.handle(), uri))
        rest = [resumed.train(data[s * BATCH : (s + 1) * BATCH], sft_loss) for s in range(1, STEPS)]
    finally:
        resumed.shutdown()
        ray.kill(occupant)
    assert set(resumed_nodes) != set(first_nodes) and len(set(resumed_nodes)) == 2
    assert_same_curve(first + rest, first + uninterrupted)
    digest = store.manifest(uri).digest()
    for node in ("b", "c"):  # each node of the resumed group fetched the model and checkpoint into its scratch root
        fetched = files_under(three_nodes[node])
        assert f"artifacts/{digest}/dcp/__1_0.distcp" in fetched and all(f.startswith("artifacts/") for f in fetched)
        assert f"artifacts/{base.digest}/model.safetensors" in fetched
    assert files_under(three_nodes["a"]) == []
    assert not (tmp_path / "controller_cache").exists()  # the controller downloaded nothing

    from transformers import AutoModelForCausalLM

    export = store.download(exported.uri)  # rank 0's weights from its node, the tokenizer from the controller
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert (export / "tokenizer.json").is_file() and model.num_parameters() == base.num_parameters()


def test_a_node_without_the_vllm_venv_says_so_in_one_line_naming_it(three_nodes, tiny_model_dir):
    """The generation worker's node, not the controller, finds the vLLM venv: c has none built."""
    occupants = [occupy("a"), occupy("b")]
    try:
        with pytest.raises(worker_envs.WorkerEnvMissing) as missing:
            GenerationGroup(GenerationConfig(backend="vllm"), tiny_model_dir)
        (line,) = str(missing.value).splitlines()
        assert line.startswith("node ") and line.endswith("run: posttrain env build vllm")
        assert worker_envs.python_for("vllm").is_file()  # the controller has it
    finally:
        for occupant in occupants:
            ray.kill(occupant)


@pytest.mark.extended
def test_megatron_tensor_parallel_split_across_two_nodes_resumes_on_another_pair(
    three_nodes, tiny_model_dir, examples, tmp_path
):
    """TP=2 with its two ranks on two nodes (gloo over loopback) follows the one-rank FSDP2 curve; its checkpoint
    is committed from both nodes, and a TP=2 group on another pair of nodes continues from it on the same curve."""
    data, pad = examples
    store = ArtifactStore(f"file://{tmp_path}/store", tmp_path / "controller_cache")
    reference = make_policy(tiny_model_dir, pad, world_size=1, token_budget=100_000)
    try:
        want = train_curve(reference, data)
    finally:
        reference.shutdown()
    megatron = {"policy.backend": "megatron", "policy.megatron.tensor_parallel": 2}
    occupant = occupy("c")
    first = make_policy(tiny_model_dir, pad, world_size=2, token_budget=100_000, **megatron)
    try:
        first_nodes = {info["node"] for info in first.info()}
        curve = train_curve(first, data, steps=2)
        uri = checkpointing.save_checkpoint(store, first, "stages/sft/megatron", {"step": 2})
    finally:
        first.shutdown()
        ray.kill(occupant)
    occupant = occupy("a")
    resumed = make_policy(tiny_model_dir, pad, world_size=2, token_budget=100_000, **megatron)
    try:
        resumed_nodes = {info["node"] for info in resumed.info()}
        resumed.load_checkpoint(ShardSource(store.handle(), uri))
        rest = [resumed.train(data[s * BATCH : (s + 1) * BATCH], sft_loss) for s in range(2, STEPS)]
    finally:
        resumed.shutdown()
        ray.kill(occupant)
    assert len(first_nodes) == len(resumed_nodes) == 2 and first_nodes != resumed_nodes
    assert_same_curve(curve + rest, want)
