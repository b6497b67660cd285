"""LoRA's pure parts: the merge of a peft state dict into plain weights (what the generator and later stages load)
against peft's own ``merge_and_unload``, and the config's refusals."""

from __future__ import annotations

import pytest
import torch

from engine.config import LoraConfig, load_config
from engine.errors import ConfigError
from engine.models.lora import adapter_scaling, add_adapters, merge_adapters


def _with_trained_adapters(model: torch.nn.Module, cfg: LoraConfig, kind: str) -> torch.nn.Module:
    """peft starts B at zero (the adapted model equals the base); give every adapter and head weights to merge."""
    peft_model = add_adapters(model, cfg, kind)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return peft_model


def _assert_same_weights(merged: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(merged) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_merge_matches_peft_merge_and_unload_on_a_causal_lm(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    plain_names = set(base.state_dict())
    peft_model = _with_trained_adapters(base, LoraConfig(rank=4, alpha=8.0), "causal_lm")
    assert adapter_scaling(peft_model) == 2.0
    merged = merge_adapters(peft_model.state_dict(), adapter_scaling(peft_model))
    assert set(merged) == plain_names  # the names vLLM and from_pretrained expect, nothing of peft's left
    frozen = base.state_dict()["model.layers.0.self_attn.q_proj.base_layer.weight"]  # peft adapted base in place
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], frozen)
    _assert_same_weights(merged, peft_model.merge_and_unload().state_dict())


def test_merge_of_a_reward_model_takes_the_trained_score_head(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, dtype=torch.float32)
    plain_names = set(base.state_dict())
    peft_model = _with_trained_adapters(base, LoraConfig(rank=2, target_modules=["q_proj", "v_proj"]), "reward")
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("score.modules_to_save" in n for n in trainable)  # the new head trains in full
    assert all("lora_" in n or "score" in n for n in trainable)
    merged = merge_adapters(peft_model.state_dict(), adapter_scaling(peft_model))
    assert set(merged) == plain_names
    _assert_same_weights(merged, peft_model.merge_and_unload().state_dict())


def test_lora_on_megatron_is_refused_naming_the_field():
    assert load_config("sft_tiny", ["policy.backend=megatron"]).sft.lora.rank == 0
    with pytest.raises(ConfigError, match=r"grpo.lora.rank=8: LoRA runs on the fsdp2 trainer only"):
        load_config("grpo_tiny", ["policy.backend=megatron", "grpo.lora.rank=8"])


def test_an_adapter_push_is_checked_against_the_engines_weights():
    from engine.weight_sync import TensorSpec, WeightMismatch, check_adapter_manifest

    expected = {
        "model.layers.0.self_attn.q_proj.weight": TensorSpec(
            "model.layers.0.self_attn.q_proj.weight", (64, 32), "float32"
        ),
        "model.layers.0.mlp.down_proj.weight": TensorSpec("model.layers.0.mlp.down_proj.weight", (32, 96), "float32"),
    }

    def spec(module: str, part: str, shape: tuple[int, ...]) -> TensorSpec:
        return TensorSpec(f"base_model.model.model.layers.0.{module}.lora_{part}.weight", shape, "float32")

    good = [spec("self_attn.q_proj", "A", (4, 32)), spec("self_attn.q_proj", "B", (64, 4))]
    good += [spec("mlp.down_proj", "A", (4, 96)), spec("mlp.down_proj", "B", (32, 4))]
    assert check_adapter_manifest(good, expected) == (
        4,
        ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.q_proj"],
    )
    with pytest.raises(WeightMismatch, match="q_proj lacks lora_B"):
        check_adapter_manifest(good[:1] + good[2:], expected)
    with pytest.raises(WeightMismatch, match="mixes ranks"):
        check_adapter_manifest(
            good[:2] + [spec("mlp.down_proj", "A", (8, 96)), spec("mlp.down_proj", "B", (32, 8))], expected
        )
    with pytest.raises(WeightMismatch, match="not a LoRA matrix"):
        check_adapter_manifest(good + [TensorSpec("model.norm.weight", (32,), "float32")], expected)
    with pytest.raises(WeightMismatch, match="holds no tensors"):
        check_adapter_manifest([], expected)


def test_adapter_refit_needs_grpo_adapters_and_vllm():
    with pytest.raises(ConfigError, match="generation.lora_refit=adapter needs adapters"):
        load_config("grpo_tiny", ["generation.lora_refit=adapter"])
    with pytest.raises(ConfigError, match="needs generation.backend=vllm"):
        load_config("grpo_tiny", ["generation.lora_refit=adapter", "grpo.lora.rank=8", "generation.backend=hf"])
