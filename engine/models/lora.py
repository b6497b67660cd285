"""LoRA adapters through peft: wrapping a model, and merging a peft state dict back into plain weights.

The generator (vLLM) and every later stage load plain Hugging Face weights, so a LoRA trainer hands out
``W + (alpha / r) B @ A`` under the base model's names; the merge is a pure function of the state dict, done
on the gathered full weights (never on the sharded live model, which keeps training).
"""

from __future__ import annotations

import torch

from engine.config import LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER = "default"  # peft's name for a model's one adapter


def add_adapters(model: torch.nn.Module, cfg: LoraConfig, model_kind: str) -> torch.nn.Module:
    """``model`` wrapped by peft with fresh adapters: only they (and a reward model's new score head) train."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    task = TaskType.SEQ_CLS if model_kind == "reward" else TaskType.CAUSAL_LM
    peft_cfg = PeftLoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        task_type=task,
    )
    return get_peft_model(model, peft_cfg)


def merge_adapters(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A peft model's full state dict as the plain model's: each adapted layer's weight becomes
    ``base + scaling * B @ A``, a trained copy of a head (``modules_to_save``) replaces the original."""
    merged: dict[str, torch.Tensor] = {}
    lora_a, lora_b = f".lora_A.{ADAPTER}.weight", f".lora_B.{ADAPTER}.weight"
    for name, tensor in state.items():
        plain = name.removeprefix(PEFT_PREFIX)
        if ".original_module." in plain or ".lora_" in plain:
            continue  # a head's frozen original (its trained copy wins), or an adapter (merged below)
        if ".base_layer." in plain:
            module = name[: name.index(".base_layer.")]
            plain = plain.replace(".base_layer.", ".")
            if plain.endswith(".weight") and module + lora_a in state:
                down, up = state[module + lora_a], state[module + lora_b]
                tensor = (tensor.float() + scaling * (up.float() @ down.float())).to(tensor.dtype)
        plain = plain.replace(f".modules_to_save.{ADAPTER}.", ".")
        merged[plain] = tensor
    return merged


def adapter_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a peft model's full state dict, under the names peft saves them with (and vLLM loads):
    ``base_model.model.<module>.lora_A.weight``."""
    return {name.replace(f".{ADAPTER}.", "."): tensor for name, tensor in state.items() if ".lora_" in name}


def adapter_scaling(model: torch.nn.Module) -> float:
    """alpha / r of the model's adapter (the same for every adapted layer)."""
    cfg = model.peft_config[ADAPTER]
    return cfg.lora_alpha / cfg.r
