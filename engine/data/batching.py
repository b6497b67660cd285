"""Dynamic batching: split a step's sequences across ranks and into micro-batches by a token budget.

Every micro-batch is right-padded to its longest sequence and holds at most ``token_budget`` padded
tokens. Ranks get balanced token counts and the same number of micro-batches (an FSDP collective needs
every rank), so a rank short of data runs an all-masked filler micro-batch that adds nothing.

Sequences can be planned in units (``group_size`` consecutive examples, e.g. a chosen/rejected pair)
that always land in the same micro-batch. Each micro-batch records the ``index`` of its examples, so
per-example outputs can be put back in order.
"""

from __future__ import annotations

from typing import TypedDict

import torch

from engine.data.chat import TokenizedExample


class MicroBatch(TypedDict, total=False):
    """What a loss reads. Per-token fields are [B, L-1], aligned with the logprobs of tokens 1..L-1 (position t
    scores token t+1); per-sequence fields are [B]. A stage's examples add their own ``token_values`` and
    ``scalars`` under these names."""

    input_ids: torch.Tensor  # [B, L], right-padded
    attention_mask: torch.Tensor  # [B, L]
    loss_mask: torch.Tensor  # [B, L-1]: 1 where the token is a training target
    index: torch.Tensor  # [B]: the example's position in the step (-1: padding or filler rows)
    generation_logprobs: torch.Tensor  # [B, L-1] GRPO: the generator's logprob of each sampled token
    reference_logprobs: torch.Tensor  # [B, L-1] GRPO with a KL term: the frozen reference's
    advantage: torch.Tensor  # [B] GRPO
    reference_logprob_sum: torch.Tensor  # [B] DPO: the reference's summed logprob of the response


def collate(examples: list[TokenizedExample], pad_id: int, indices: list[int] | None = None) -> MicroBatch:
    """Right-padded ``input_ids``/``attention_mask`` [B, L]; per-token fields (the target mask and any
    ``token_values``) shifted to [B, L-1], aligned with the logprobs of tokens 1..L-1 (position t predicts
    token t+1); per-sequence ``scalars`` as [B]."""
    length = max(len(e) for e in examples)
    rows = len(examples)
    input_ids = torch.full((rows, length), pad_id, dtype=torch.long)
    attention = torch.zeros((rows, length), dtype=torch.long)
    per_token = {"loss_mask": torch.zeros((rows, length))}
    for key in examples[0].token_values:
        per_token[key] = torch.zeros((rows, length))
    scalars = {key: torch.zeros(rows) for key in examples[0].scalars}
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = 1
        per_token["loss_mask"][row, :n] = torch.tensor(example.loss_mask, dtype=torch.float32)
        for key, values in example.token_values.items():
            per_token[key][row, :n] = torch.tensor(values, dtype=torch.float32)
        for key, value in example.scalars.items():
            scalars[key][row] = value
    batch = {"input_ids": input_ids, "attention_mask": attention, **scalars}
    batch.update({key: values[:, 1:] for key, values in per_token.items()})
    batch["index"] = torch.tensor(indices if indices is not None else [-1] * rows)
    return batch


def filler_micro_batch(template: TokenizedExample, pad_id: int) -> MicroBatch:
    """A one-sequence, all-masked micro-batch: keeps a rank in step with the others' collectives."""
    filler = TokenizedExample(
        [pad_id, pad_id],
        [0, 0],
        token_values={key: [0.0, 0.0] for key in template.token_values},
        scalars={key: 0.0 for key in template.scalars},
    )
    return collate([filler], pad_id)


def pad_micro_batch(batch: MicroBatch, rows: int, length: int) -> MicroBatch:
    """The batch widened to [rows, length] with fully masked padding (pipeline stages exchange fixed shapes);
    added rows have index -1, so nothing reads their outputs."""
    current_rows, current_length = batch["input_ids"].shape
    if (current_rows, current_length) == (rows, length):
        return batch
    padded: MicroBatch = {}
    for key, value in batch.items():
        fill = -1 if key == "index" else 0
        shape = list(value.shape)
        shape[0] = rows
        if value.dim() == 2:
            shape[1] = length if value.shape[1] == current_length else length - 1
        out = torch.full(shape, fill, dtype=value.dtype)
        out[tuple(slice(0, n) for n in value.shape)] = value
        padded[key] = out
    return padded


Unit = list[int]  # indices of examples that travel together


def _units(count: int, group_size: int) -> list[Unit]:
    if count % group_size:
        raise ValueError(f"{count} examples do not split into groups of {group_size}")
    return [list(range(start, start + group_size)) for start in range(0, count, group_size)]


def split_by_token_budget(units: list[Unit], lengths: list[int], token_budget: int) -> list[list[Unit]]:
    """Greedy packing of length-sorted units so that rows x longest row <= token_budget."""
    longest = {id(unit): max(lengths[i] for i in unit) for unit in units}
    ordered = sorted(units, key=lambda unit: longest[id(unit)], reverse=True)
    groups: list[list[Unit]] = []
    for unit in ordered:
        current = groups[-1] if groups else None
        if current is not None:
            rows = sum(len(u) for u in current) + len(unit)
            if rows * longest[id(current[0])] <= token_budget:
                current.append(unit)
                continue
        groups.append([unit])
    return groups


def shard_for_ranks(units: list[Unit], lengths: list[int], world_size: int) -> list[list[Unit]]:
    """Longest-first assignment to the rank with the fewest tokens so far (balanced work per rank)."""
    shards: list[list[Unit]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for unit in sorted(units, key=lambda u: sum(lengths[i] for i in u), reverse=True):
        rank = loads.index(min(loads))
        shards[rank].append(unit)
        loads[rank] += sum(lengths[i] for i in unit)
    return shards


def plan_step(
    examples: list[TokenizedExample], world_size: int, token_budget: int, pad_id: int, group_size: int = 1
) -> tuple[list[list[MicroBatch]], int]:
    """Per-rank micro-batches (equal counts) and the step's global number of target tokens."""
    lengths = [len(e) for e in examples]
    units = _units(len(examples), group_size)
    per_rank = [
        split_by_token_budget(shard, lengths, token_budget) for shard in shard_for_ranks(units, lengths, world_size)
    ]
    count = max(1, max(len(groups) for groups in per_rank))
    plans = []
    for groups in per_rank:
        batches = []
        for group in groups:
            indices = [i for unit in group for i in unit]
            batches.append(collate([examples[i] for i in indices], pad_id, indices))
        batches += [filler_micro_batch(examples[0], pad_id) for _ in range(count - len(batches))]
        plans.append(batches)
    global_targets = sum(int(sum(e.loss_mask[1:])) for e in examples)
    return plans, global_targets
