"""The Megatron-core backend on CPU with gloo: converted logits against Hugging Face at TP=1 and TP=2, and the
worker group on real Ray actors following the FSDP2 loss curve at TP=2, PP=2 and DP=2 (distributed
optimizer), with a TP=2 checkpoint reloaded at TP=1."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from engine.algorithms.sft import sft_loss
from engine.config import PolicyConfig, TinyModelConfig
from engine.models.tiny import make_tiny_model
from tests.integration.conftest import commit_checkpoint, export_folder, load_checkpoint
from tests.integration.test_fsdp2 import (
    BATCH,
    assert_same_curve,
    assert_trains_on_cuda_like_cpu,
    make_policy,
    reference_curve,
    train_curve,
)

__all__ = ["reference_curve"]  # a module fixture shared with the FSDP2 tests (reference: 1 FSDP2 rank)

MEGATRON = {"policy.backend": "megatron"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _logits_rank(rank: int, world_size: int, port: int, model_dir: str, results) -> None:
    """One rank of a TP=world_size Megatron model built by the worker: full logits against the HF model's."""
    from megatron.core import tensor_parallel
    from transformers import AutoModelForCausalLM

    from engine.policy.megatron import MegatronPolicyWorker

    policy = PolicyConfig(backend="megatron", world_size=world_size, megatron={"tensor_parallel": world_size})
    worker = MegatronPolicyWorker(rank, world_size, model_dir, policy.model_dump(), {}, 1, seed=0)
    worker.init_distributed("127.0.0.1", port)
    input_ids = torch.randint(0, worker.shape.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(17).expand_as(input_ids)
    with torch.no_grad():
        local = worker.model(input_ids, positions, None)
        logits = tensor_parallel.gather_from_tensor_model_parallel_region(local)[..., : worker.shape.vocab_size]
        reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(input_ids).logits
    results[rank] = float((logits - reference).abs().max())


@pytest.mark.parametrize("tensor_parallel", [1, 2])
def test_converted_logits_equal_hugging_face(tmp_path, tensor_parallel):
    # Qwen2 with grouped-query attention, qkv biases and an untied output layer
    model_dir = make_tiny_model(
        tmp_path / "qwen2", TinyModelConfig(arch="qwen2", num_kv_heads=2, tie_word_embeddings=False)
    )
    results = mp.Manager().dict()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_logits_rank, args=(tensor_parallel, _free_port(), str(model_dir), results), nprocs=tensor_parallel)
    assert len(results) == tensor_parallel
    assert max(results.values()) < 1e-5, dict(results)


@pytest.mark.parametrize(
    "layout,token_budget",
    [
        ({"policy.megatron.tensor_parallel": 2}, 100_000),
        ({"policy.megatron.pipeline_parallel": 2}, 64),  # several micro-batches through the pipeline schedule
        ({}, 100_000),  # two data-parallel replicas with the distributed optimizer
        ({"policy.megatron.tensor_parallel": 2, "policy.activation_checkpointing": True}, 100_000),
    ],
    ids=["tp2", "pp2", "dp2", "tp2-recompute"],
)
def test_megatron_follows_the_fsdp2_curve(ray_local, tiny_model_dir, examples, reference_curve, layout, token_budget):
    data, pad = examples
    policy = make_policy(tiny_model_dir, pad, world_size=2, token_budget=token_budget, **MEGATRON, **layout)
    try:
        info = policy.info()
        assert {i["backend"] for i in info} == {"gloo"}
        assert len(policy.reporting_ranks) == (2 if not layout else 1)  # data-parallel replicas
        assert_same_curve(train_curve(policy, data), reference_curve, tol=1e-5)
    finally:
        policy.shutdown()


def test_bf16_mixed_precision_trains_close_to_fp32(ray_local, tiny_model_dir, examples, reference_curve):
    data, pad = examples
    extra = {"policy.megatron.tensor_parallel": 2, "policy.precision": "bf16"}
    policy = make_policy(tiny_model_dir, pad, world_size=2, token_budget=100_000, **MEGATRON, **extra)
    try:
        curve = train_curve(policy, data)
    finally:
        policy.shutdown()
    for got, want in zip(curve, reference_curve):
        assert got["loss"] == pytest.approx(want["loss"], rel=0.005)  # measured <= 0.14 %
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=0.02)  # measured <= 0.32 %
    assert curve[-1]["loss"] < curve[0]["loss"]


def test_tp2_checkpoint_reloads_at_tp1(ray_local, tiny_model_dir, examples, store):
    data, pad = examples
    tp2 = make_policy(
        tiny_model_dir, pad, world_size=2, token_budget=100_000, **MEGATRON, **{"policy.megatron.tensor_parallel": 2}
    )
    try:
        train_curve(tp2, data, steps=2)
        uri = commit_checkpoint(store, tp2)
        logprobs_tp2 = tp2.forward(data[:BATCH])
        next_step_tp2 = tp2.train(data[2 * BATCH : 3 * BATCH], sft_loss)
        export = export_folder(store, tp2)
    finally:
        tp2.shutdown()
    tp1 = make_policy(tiny_model_dir, pad, world_size=1, token_budget=100_000, **MEGATRON)
    try:
        load_checkpoint(store, tp1, uri)
        logprobs_tp1 = tp1.forward(data[:BATCH])
        for got, want in zip(logprobs_tp1, logprobs_tp2):
            assert torch.allclose(got, want, atol=1e-5)
        # weights, optimizer moments and step resharded: the next step is the same step
        next_step_tp1 = tp1.train(data[2 * BATCH : 3 * BATCH], sft_loss)
        assert next_step_tp1["loss"] == pytest.approx(next_step_tp2["loss"], abs=1e-5)
        assert next_step_tp1["lr"] == pytest.approx(next_step_tp2["lr"])
    finally:
        tp1.shutdown()
    assert {"config.json", "model.safetensors"} <= {p.name for p in export.iterdir()}


@pytest.mark.gpu
def test_megatron_nccl_on_cuda_matches_cpu_math(ray_local, tiny_model_dir, examples, reference_curve):
    """The Megatron trainer on CUDA with NCCL (skipped where no CUDA device is present): the CPU patches stay off."""
    data, pad = examples
    tensor_parallel = min(2, torch.cuda.device_count())
    extra = {"policy.megatron.tensor_parallel": tensor_parallel}
    policy = make_policy(tiny_model_dir, pad, world_size=tensor_parallel, token_budget=100_000, **MEGATRON, **extra)
    assert_trains_on_cuda_like_cpu(policy, data, reference_curve)


def test_the_reward_model_stage_refuses_the_scalar_head_on_megatron(tmp_path):
    from engine.algorithms.rm import run_reward_model
    from engine.config import load_config
    from engine.errors import ConfigError

    cfg = load_config(None, {"policy.backend": "megatron", "reward_model.head": "scalar"})
    with pytest.raises(ConfigError, match="reward_model.head=scalar needs policy.backend=fsdp2"):
        run_reward_model(cfg, None, None, tmp_path, tmp_path, "stages/reward_model")


def test_a_layout_the_model_cannot_split_fails_before_any_worker_starts(tiny_model_dir, examples):
    from engine.errors import PosttrainError

    _, pad = examples
    layout = {"policy.megatron.tensor_parallel": 3}  # the tiny model has 4 key/value heads
    with pytest.raises(PosttrainError, match="tensor parallel size 3 does not divide the model's key/value heads"):
        make_policy(tiny_model_dir, pad, world_size=3, token_budget=100_000, **MEGATRON, **layout)
