"""Dynamic batching: split a step's sequences across ranks and into micro-batches by a token budget.

Every micro-batch is right-padded to its longest sequence and holds at most ``token_budget`` padded
tokens. Ranks get balanced token counts and the same number of micro-batches (an FSDP collective needs
every rank), so a rank short of data runs an all-masked filler micro-batch that adds nothing.
"""

from __future__ import annotations

import torch

from engine.data.chat import TokenizedExample

MicroBatch = dict[str, torch.Tensor]


def collate(examples: list[TokenizedExample], pad_id: int) -> MicroBatch:
    """Right-padded ``input_ids``/``attention_mask`` [B, L] and a target mask [B, L-1] aligned with the
    logprobs of tokens 1..L-1 (position t predicts token t+1)."""
    length = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    targets = torch.zeros((len(examples), length), dtype=torch.float32)
    for row, example in enumerate(examples):
        n = len(example)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention[row, :n] = 1
        targets[row, :n] = torch.tensor(example.loss_mask, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": targets[:, 1:]}


def filler_micro_batch(pad_id: int) -> MicroBatch:
    """A one-sequence, all-masked micro-batch: keeps a rank in step with the others' collectives."""
    return collate([TokenizedExample([pad_id, pad_id], [0, 0])], pad_id)


def split_by_token_budget(examples: list[TokenizedExample], token_budget: int) -> list[list[TokenizedExample]]:
    """Greedy packing of length-sorted sequences so that rows x longest row <= token_budget."""
    ordered = sorted(examples, key=len, reverse=True)
    groups: list[list[TokenizedExample]] = []
    for example in ordered:
        current = groups[-1] if groups else None
        if current and (len(current) + 1) * len(current[0]) <= token_budget:
            current.append(example)
        else:
            groups.append([example])
    return groups


def shard_for_ranks(examples: list[TokenizedExample], world_size: int) -> list[list[TokenizedExample]]:
    """Longest-first assignment to the rank with the fewest tokens so far (balanced work per rank)."""
    shards: list[list[TokenizedExample]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for example in sorted(examples, key=len, reverse=True):
        rank = loads.index(min(loads))
        shards[rank].append(example)
        loads[rank] += len(example)
    return shards


def plan_step(
    examples: list[TokenizedExample], world_size: int, token_budget: int, pad_id: int
) -> tuple[list[list[MicroBatch]], int]:
    """Per-rank micro-batches (equal counts) and the step's global number of target tokens."""
    per_rank = [split_by_token_budget(shard, token_budget) for shard in shard_for_ranks(examples, world_size)]
    count = max(1, max(len(groups) for groups in per_rank))
    plans = []
    for groups in per_rank:
        batches = [collate(group, pad_id) for group in groups]
        batches += [filler_micro_batch(pad_id) for _ in range(count - len(batches))]
        plans.append(batches)
    global_targets = sum(int(sum(e.loss_mask[1:])) for e in examples)
    return plans, global_targets
