"""Hugging Face <-> Megatron-core GPT weights for the Llama and Qwen2 families, tensor- and pipeline-parallel aware.

Pure tensor reshuffles, no process groups: the Megatron worker calls them on the state dicts it holds, and
``posttrain convert`` calls them for every (tensor, pipeline) rank at once. Megatron's layout differs from
Hugging Face's in three places:
- q, k and v live in one ``linear_qkv`` matrix, grouped by key/value head: for each query group the group's
  query heads, then its key head, then its value head (and the same for Qwen2's qkv biases);
- gate and up projections live in one ``linear_fc1`` matrix: on each tensor rank its gate shard, then its up shard;
- column-parallel weights (qkv, fc1, embedding, output layer) split along rows; row-parallel ones (the attention
  output projection, fc2) along columns; norms are replicated.
Keys use the stage's local layer numbers, as Megatron's modules do; ``layers`` says which global layers they are.
On disk (``posttrain convert``) the Megatron side uses Megatron-LM's layout: ``release/mp_rank_TT[_PPP]/``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.errors import PosttrainError
from engine.models.loading import load_hf_folder

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
VOCAB_DIVISOR = 128  # Megatron-LM's default: the padded vocabulary then splits evenly for any TP size up to 128
Shards = dict[str, torch.Tensor]


@dataclass(frozen=True)
class GPTShape:
    """What the conversion and Megatron's ``TransformerConfig`` need to know of a Hugging Face config."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    qkv_bias: bool
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    llama3_rope_factor: float | None

    @property
    def padded_vocab_size(self) -> int:
        """Megatron splits the vocabulary over tensor ranks; the padding rows are zero and their logits masked.
        Independent of the TP size, so a checkpoint reshards from TP=2 to TP=1."""
        return -(-self.vocab_size // VOCAB_DIVISOR) * VOCAB_DIVISOR

    @property
    def queries_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def shape_of(hf_config: Any) -> GPTShape:
    """The GPT shape of a Llama or Qwen2 config; any other architecture is a user error."""
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise PosttrainError(
            f"policy.backend=megatron: model type '{hf_config.model_type}' is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )
    rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise PosttrainError(f"policy.backend=megatron: rope type '{rope_type}' is not supported")
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    heads = hf_config.num_attention_heads
    return GPTShape(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_heads=heads,
        num_kv_heads=hf_config.num_key_value_heads or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        ffn_hidden_size=hf_config.intermediate_size,
        vocab_size=hf_config.vocab_size,
        tied_embeddings=bool(hf_config.tie_word_embeddings),
        qkv_bias=hf_config.model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(theta),
        max_position_embeddings=hf_config.max_position_embeddings,
        llama3_rope_factor=float(rope["factor"]) if rope_type == "llama3" else None,
    )


def check_parallel_sizes(shape: GPTShape, tensor_parallel: int, pipeline_parallel: int) -> None:
    """The divisibility Megatron needs, as one config error naming the field."""
    for what, count in (
        ("key/value heads", shape.num_kv_heads),
        ("intermediate size", shape.ffn_hidden_size),
    ):
        if count % tensor_parallel:
            raise PosttrainError(f"tensor parallel size {tensor_parallel} does not divide the model's {what} ({count})")
    if shape.num_layers % pipeline_parallel:
        raise PosttrainError(
            f"pipeline parallel size {pipeline_parallel} does not divide the number of layers ({shape.num_layers})"
        )


def stage_layers(shape: GPTShape, pipeline_parallel: int, stage: int) -> range:
    per_stage = shape.num_layers // pipeline_parallel
    return range(stage * per_stage, (stage + 1) * per_stage)


# ---------------------------------------------------------------------------------------------- HF -> Megatron


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: GPTShape, tp: int, rank: int) -> torch.Tensor:
    """[heads*d (+k, v), ...] -> this rank's ``linear_qkv`` rows, grouped per key/value head."""
    groups, d, per_group = shape.num_kv_heads, shape.head_dim, shape.queries_per_group
    trailing = q.shape[1:]
    fused = torch.cat(
        [q.reshape(groups, per_group * d, *trailing), k.reshape(groups, d, *trailing), v.reshape(groups, d, *trailing)],
        dim=1,
    )
    return fused.chunk(tp, dim=0)[rank].reshape(-1, *trailing).clone()


def hf_to_megatron(
    hf: dict[str, torch.Tensor], shape: GPTShape, tp: int, tp_rank: int, layers: range, first: bool, last: bool
) -> Shards:
    """The Megatron state dict of one (tensor rank, pipeline stage) from a full Hugging Face state dict."""

    def rows(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.chunk(tp, dim=0)[tp_rank].clone()

    def columns(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.chunk(tp, dim=1)[tp_rank].clone()

    def vocab_rows(tensor: torch.Tensor) -> torch.Tensor:
        padded = tensor.new_zeros(shape.padded_vocab_size, tensor.shape[1])
        padded[: shape.vocab_size] = tensor
        return rows(padded)

    out: Shards = {}
    if first:
        out["embedding.word_embeddings.weight"] = vocab_rows(hf["model.embed_tokens.weight"])
    for local, layer in enumerate(layers):
        src, dst = f"model.layers.{layer}.", f"decoder.layers.{local}."
        attn = src + "self_attn."
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"].clone()
        out[dst + "self_attention.linear_qkv.weight"] = _fuse_qkv(
            hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"], shape, tp, tp_rank
        )
        if shape.qkv_bias:
            out[dst + "self_attention.linear_qkv.bias"] = _fuse_qkv(
                hf[attn + "q_proj.bias"], hf[attn + "k_proj.bias"], hf[attn + "v_proj.bias"], shape, tp, tp_rank
            )
        out[dst + "self_attention.linear_proj.weight"] = columns(hf[attn + "o_proj.weight"])
        out[dst + "pre_mlp_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"].clone()
        out[dst + "mlp.linear_fc1.weight"] = torch.cat(
            [rows(hf[src + "mlp.gate_proj.weight"]), rows(hf[src + "mlp.up_proj.weight"])], dim=0
        )
        out[dst + "mlp.linear_fc2.weight"] = columns(hf[src + "mlp.down_proj.weight"])
    if last:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"].clone()
        # tied embeddings: Megatron keeps the output layer only on a last stage that lacks the embedding
        if not shape.tied_embeddings or not first:
            head = hf["model.embed_tokens.weight"] if shape.tied_embeddings else hf["lm_head.weight"]
            out["output_layer.weight"] = vocab_rows(head)
    return out


# Transformer Engine's layer spec fuses each pre-norm into the linear layer that follows it
TE_FUSED_NORMS = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def rename_norms(shard: Shards, to_transformer_engine: bool) -> Shards:
    """Local-spec norm names <-> the Transformer Engine spec's fused ones (the rest of the layout is shared)."""
    pairs = TE_FUSED_NORMS.items() if to_transformer_engine else ((te, local) for local, te in TE_FUSED_NORMS.items())
    renames = dict(pairs)
    out: Shards = {}
    for key, value in shard.items():
        prefix, _, name = key.partition(".layers.")
        index, _, rest = name.partition(".")
        out[f"{prefix}.layers.{index}.{renames[rest]}" if rest in renames else key] = value
    return out


# ---------------------------------------------------------------------------------------------- Megatron -> HF


def _split_qkv(fused: list[torch.Tensor], shape: GPTShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d, per_group = shape.num_kv_heads, shape.head_dim, shape.queries_per_group
    whole = torch.cat(fused, dim=0)
    trailing = whole.shape[1:]
    grouped = whole.reshape(groups, (per_group + 2) * d, *trailing)
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return (
        q.reshape(-1, *trailing).clone(),
        k.reshape(-1, *trailing).clone(),
        v.reshape(-1, *trailing).clone(),
    )


def megatron_to_hf(shards: list[Shards], shape: GPTShape, layers: range, first: bool, last: bool) -> Shards:
    """The Hugging Face weights held by one pipeline stage, from its tensor ranks' state dicts (rank order)."""

    def gather(key: str, dim: int) -> torch.Tensor:
        return torch.cat([shard[key] for shard in shards], dim=dim)

    out: Shards = {}
    if first:
        out["model.embed_tokens.weight"] = gather("embedding.word_embeddings.weight", 0)[: shape.vocab_size].clone()
    for local, layer in enumerate(layers):
        src, dst = f"decoder.layers.{local}.", f"model.layers.{layer}."
        attn = dst + "self_attn."
        out[dst + "input_layernorm.weight"] = shards[0][src + "input_layernorm.weight"].clone()
        names = ("weight", "bias") if shape.qkv_bias else ("weight",)
        for name in names:
            q, k, v = _split_qkv([s[src + f"self_attention.linear_qkv.{name}"] for s in shards], shape)
            out[attn + f"q_proj.{name}"], out[attn + f"k_proj.{name}"], out[attn + f"v_proj.{name}"] = q, k, v
        out[attn + "o_proj.weight"] = gather(src + "self_attention.linear_proj.weight", 1)
        out[dst + "post_attention_layernorm.weight"] = shards[0][src + "pre_mlp_layernorm.weight"].clone()
        halves = [s[src + "mlp.linear_fc1.weight"].chunk(2, dim=0) for s in shards]
        out[dst + "mlp.gate_proj.weight"] = torch.cat([gate for gate, _ in halves], dim=0)
        out[dst + "mlp.up_proj.weight"] = torch.cat([up for _, up in halves], dim=0)
        out[dst + "mlp.down_proj.weight"] = gather(src + "mlp.linear_fc2.weight", 1)
    if last:
        out["model.norm.weight"] = shards[0]["decoder.final_layernorm.weight"].clone()
        if not shape.tied_embeddings:
            out["lm_head.weight"] = gather("output_layer.weight", 0)[: shape.vocab_size].clone()
    return out


# ---------------------------------------------------------------------------------------------- folders

RELEASE = "release"  # Megatron-LM's name for converted (not trained) weights: latest_checkpointed_iteration.txt
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def rank_folder(tp_rank: int, pp_rank: int, pipeline_parallel: int) -> str:
    """Megatron-LM's per-rank folder name: mp_rank_TT, or mp_rank_TT_PPP with pipeline stages."""
    return f"mp_rank_{tp_rank:02d}" if pipeline_parallel == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def _staged(target: Path) -> Path:
    if target.exists():
        raise PosttrainError(f"output folder already exists: {target}")
    staging = target.with_name(f".{target.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return staging


def _copy_side_files(source: Path, target: Path) -> None:
    for name in HF_SIDE_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)


def convert_hf_folder(source: Path, target: Path, tensor_parallel: int, pipeline_parallel: int) -> Path:
    """Hugging Face folder -> Megatron-LM layout (``release/mp_rank_*/model_optim_rng.pt``), all or nothing."""
    hf_config, state = load_hf_folder(source)
    shape = shape_of(hf_config)
    check_parallel_sizes(shape, tensor_parallel, pipeline_parallel)
    staging = _staged(target)
    try:
        for pp_rank in range(pipeline_parallel):
            layers = stage_layers(shape, pipeline_parallel, pp_rank)
            first, last = pp_rank == 0, pp_rank == pipeline_parallel - 1
            for tp_rank in range(tensor_parallel):
                shard = hf_to_megatron(state, shape, tensor_parallel, tp_rank, layers, first, last)
                folder = staging / RELEASE / rank_folder(tp_rank, pp_rank, pipeline_parallel)
                folder.mkdir(parents=True)
                torch.save({"model": shard, "checkpoint_version": 3.0}, folder / "model_optim_rng.pt")
        _copy_side_files(source, staging)
        layout = {"tensor_parallel": tensor_parallel, "pipeline_parallel": pipeline_parallel}
        (staging / "megatron_layout.json").write_text(json.dumps(layout))
        (staging / "latest_checkpointed_iteration.txt").write_text(RELEASE)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_megatron_folder(source: Path, target: Path) -> Path:
    """A folder written by ``convert_hf_folder`` (or trained weights in the same layout) -> Hugging Face."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    layout_file = source / "megatron_layout.json"
    if not layout_file.is_file() or not (source / "config.json").is_file():
        raise PosttrainError(f"{source} is not a Megatron folder from `posttrain convert` (megatron_layout.json)")
    layout = json.loads(layout_file.read_text())
    tensor_parallel, pipeline_parallel = layout["tensor_parallel"], layout["pipeline_parallel"]
    shape = shape_of(AutoConfig.from_pretrained(source))
    staging = _staged(target)
    try:
        state: dict[str, torch.Tensor] = {}
        for pp_rank in range(pipeline_parallel):
            shards = [
                torch.load(
                    source / RELEASE / rank_folder(tp_rank, pp_rank, pipeline_parallel) / "model_optim_rng.pt",
                    weights_only=True,
                )["model"]
                for tp_rank in range(tensor_parallel)
            ]
            layers = stage_layers(shape, pipeline_parallel, pp_rank)
            state.update(megatron_to_hf(shards, shape, layers, pp_rank == 0, pp_rank == pipeline_parallel - 1))
        save_file(state, str(staging / "model.safetensors"), {"format": "pt"})
        _copy_side_files(source, staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
