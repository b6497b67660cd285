"""What stages reserve on the cluster (engine.resources) and whether it fits the nodes (engine.cluster)."""

from __future__ import annotations

import pytest

from engine.cluster import unplaced_bundles
from engine.config import ConfigError, load_config
from engine.resources import gpus, peak_gpus, stage_groups

GPU_WORKERS = ["policy.gpus_per_worker=1", "generation.gpus_per_worker=1"]


def test_a_bundle_is_never_split_across_nodes():
    two_one_gpu_nodes = [{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0, "GPU": 1.0}]
    assert unplaced_bundles([{"CPU": 1.0, "GPU": 1.0}] * 2, two_one_gpu_nodes) == 0
    assert unplaced_bundles([{"CPU": 1.0, "GPU": 2.0}], two_one_gpu_nodes) == 1
    assert unplaced_bundles([{"CPU": 1.0, "GPU": 1.0}] * 3, two_one_gpu_nodes) == 1
    assert unplaced_bundles([{"CPU": 1.0}] * 8, two_one_gpu_nodes) == 0
    assert unplaced_bundles([{"CPU": 1.0}] * 9, two_one_gpu_nodes) == 1


def test_largest_bundles_are_placed_first():
    nodes = [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 2.0, "GPU": 2.0}]
    # in the given order the 1-GPU worker could take the 2-GPU node and strand the 2-GPU one
    assert unplaced_bundles([{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 2.0}], nodes) == 0


def test_fractional_gpus_share_a_device():
    assert unplaced_bundles([{"CPU": 1.0, "GPU": 0.5}] * 2, [{"CPU": 2.0, "GPU": 1.0}]) == 0


def test_stage_groups_follow_the_config():
    cfg = load_config("grpo_tiny", [*GPU_WORKERS, "policy.world_size=4", "generation.num_workers=2"])
    assert stage_groups(cfg, "sft") == {"policy": (4, {"CPU": 1.0, "GPU": 1.0})}
    assert gpus(stage_groups(cfg, "grpo")) == 6
    with_reference = load_config("grpo_tiny", [*GPU_WORKERS, "grpo.loss.kl_beta=0.1", "grpo.reward_model_weight=1"])
    assert set(stage_groups(with_reference, "grpo")) == {"policy", "generation", "reference", "reward_model"}
    lora = load_config("grpo_tiny", [*GPU_WORKERS, "grpo.loss.kl_beta=0.1", "grpo.lora.rank=8"])
    assert "reference" not in stage_groups(lora, "grpo")  # the policy's own base is the reference
    distill = load_config("distill_tiny", GPU_WORKERS)
    assert set(stage_groups(distill, "distill")) >= {"policy", "generation", "teacher"}
    assert peak_gpus(cfg, ["sft", "grpo", "evaluate"]) == 6


def test_cpu_only_by_default():
    cfg = load_config("grpo_tiny")
    assert peak_gpus(cfg, ["sft", "grpo", "evaluate"]) == 0
    assert all("GPU" not in bundle for _, bundle in stage_groups(cfg, "grpo").values())


def test_tensor_parallel_engines_hold_their_gpus():
    cfg = load_config("grpo_tiny", ["generation.tensor_parallel_size=2", "generation.gpus_per_worker=2"])
    assert stage_groups(cfg, "evaluate") == {"generation": (1, {"CPU": 1.0, "GPU": 2.0})}
    with pytest.raises(ConfigError, match="set generation.gpus_per_worker to 2"):
        load_config("grpo_tiny", ["generation.tensor_parallel_size=2"])
    with pytest.raises(ConfigError, match="needs generation.backend: vllm"):
        load_config(
            "grpo_tiny", ["generation.backend=hf", "generation.tensor_parallel_size=2", "generation.gpus_per_worker=2"]
        )
