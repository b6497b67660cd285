"""A committed model out of the store as a plain Hugging Face folder that ``from_pretrained`` and vLLM load.

    posttrain export <artifact URI> <DIR> [--dtype bf16|fp16|fp32]

The folder holds the config (its ``dtype`` set), the weights in the chosen dtype (the same safetensors shards,
with their index), the tokenizer written by ``save_pretrained``, the generation config, and a README.md model card
naming the base model, the datasets, the stage's config and its key metrics.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from engine.checkpointing import CONFIG_FILE
from engine.errors import PosttrainError
from engine.models.loading import set_config_dtype

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _cast_weights(source: Path, target: Path, dtype: str | None) -> None:
    """Every safetensors shard (and its index) copied, floating tensors cast to ``dtype`` where one is given."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = sorted(source.glob("*.safetensors"))
    if not shards:
        raise PosttrainError(f"{source} holds no safetensors weights")
    total = 0
    for shard in shards:
        if dtype is None:
            shutil.copy2(shard, target / shard.name)
            total += shard.stat().st_size
            continue
        cast = getattr(torch, dtype)
        with safe_open(str(shard), framework="pt") as handle:
            tensors = {
                key: (t.to(cast) if t.is_floating_point() else t).contiguous()
                for key, t in ((key, handle.get_tensor(key)) for key in handle.keys())
            }
        save_file(tensors, str(target / shard.name), {"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = source / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data.setdefault("metadata", {})["total_size"] = total
        (target / index.name).write_text(json.dumps(data, indent=2))


def model_card(config: dict[str, Any], stage: str, metrics: dict[str, float], dtype: str) -> str:
    """The README.md of an exported model: where it came from and how well it did."""
    data, model = config.get("data", {}), config.get("model", {})
    sources = [data.get("source")] + ([data["val_source"]] if data.get("val_source") else [])
    subset = f" (subset `{data['subset']}`)" if data.get("subset") else ""
    lines = [
        "---",
        yaml.safe_dump({"library_name": "transformers", "tags": ["posttrain", stage]}, sort_keys=False).strip(),
        "---",
        f"# {config.get('name', 'posttrain')}: {stage}",
        "",
        f"Trained by [posttrain](https://github.com/posttrain/posttrain) (stage `{stage}`), weights in {dtype}.",
        "",
        f"- base model: `{model.get('name', 'unknown')}`",
        "- datasets: " + ", ".join(f"`{s}`" for s in sources if s) + subset,
        "",
        "## Metrics",
        "",
        "| metric | value |",
        "|---|---|",
        *[f"| {key} | {value:.4g} |" for key, value in sorted(metrics.items())],
        "",
        "## Stage config",
        "",
        "```yaml",
        yaml.safe_dump({stage: config.get(stage, {}), "policy": config.get("policy", {})}, sort_keys=False).strip(),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)",
        "```",
        "",
    ]
    return "\n".join(lines)


def stage_of(uri: str) -> str:
    """The stage that committed an artifact, read from its key (``.../stages/<stage>/<key>/model``)."""
    parts = uri.rstrip("/").split("/")
    return parts[parts.index("stages") + 1] if "stages" in parts[:-2] else "model"


def export_folder(source: Path, target: Path, dtype: str | None, metrics: dict[str, float], stage: str) -> Path:
    """Write the plain Hugging Face folder of the committed model in ``source`` to ``target`` (a new folder)."""
    from transformers import AutoTokenizer, GenerationConfig

    if target.exists() and any(target.iterdir()):
        raise PosttrainError(f"export target {target} exists and is not empty")
    if not (source / "config.json").is_file():
        raise PosttrainError(f"{source} is not a Hugging Face model folder (no config.json)")
    target.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copy2(source / "config.json", target / "config.json")
        _cast_weights(source, target, DTYPES[dtype] if dtype else None)
        written = DTYPES[dtype] if dtype else json.loads((source / "config.json").read_text()).get("dtype", "float32")
        set_config_dtype(target, written)
        AutoTokenizer.from_pretrained(source).save_pretrained(target)
        if (source / "generation_config.json").exists():
            shutil.copy2(source / "generation_config.json", target / "generation_config.json")
        else:
            from transformers import AutoConfig

            GenerationConfig.from_model_config(AutoConfig.from_pretrained(source)).save_pretrained(target)
        config = yaml.safe_load((source / CONFIG_FILE).read_text()) if (source / CONFIG_FILE).exists() else {}
        (target / "README.md").write_text(model_card(config, stage, metrics, written))
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)  # nothing half written
        raise
    return target
