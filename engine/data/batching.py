"""Dynamic batching: split a step's sequences across ranks and into micro-batches by a token budget.

Every micro-batch is right-padded to its longest sequence and holds at most ``token_budget`` padded
tokens. Ranks get balanced token counts and the same number of micro-batches (an FSDP collective needs
every rank), so a rank short of data runs an all-masked filler micro-batch that adds nothing.

With sequence packing, a micro-batch's sequences are laid end to end in rows as long as its longest sequence
(first fit, longest first): the model runs on those rows, with position ids restarting at each sequence so that
attention stays within it, and its outputs are put back in the padded layout above, which is what the losses read.
The padding the model computes on shrinks; the losses and their normalizers do not change.

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
    prev_logprobs: torch.Tensor  # [B, L-1] GRPO with several updates a step: the policy's before the first
    advantage: torch.Tensor  # [B] GRPO
    reference_logprob_sum: torch.Tensor  # [B] DPO: the reference's summed logprob of the response
    packed_input_ids: torch.Tensor  # [R, C] sequence packing: the examples end to end, rows right-padded
    packed_position_ids: torch.Tensor  # [R, C]: restart at 0 with each example (and at the padding)
    unpack_index: torch.Tensor  # [B, L-1]: where each next-token value sits in the flattened [R, C-1] outputs


def collate(examples: list[TokenizedExample], pad_id: int, indices: list[int] | None = None) -> MicroBatch:
    """Right-padded ``input_ids``/``attention_mask`` [B, L]; per-token fields (the target mask and any
    ``token_values``) shifted to [B, L-1], aligned with the logprobs of tokens 1..L-1 (position t predicts
    token t+1); per-sequence ``scalars`` as [B]."""
    length = max(len(e) for e in examples)

    def padded(rows: list[list], fill: float | int, dtype: torch.dtype) -> torch.Tensor:
        # one tensor from padded Python lists: a tensor per row costs more than the rows' values at these sizes
        return torch.tensor([[*row, *[fill] * (length - len(row))] for row in rows], dtype=dtype)

    input_ids = padded([e.input_ids for e in examples], pad_id, torch.long)
    attention = padded([[1] * len(e) for e in examples], 0, torch.long)
    per_token = {"loss_mask": padded([e.loss_mask for e in examples], 0, torch.float32)}
    for key in examples[0].token_values:
        per_token[key] = padded([e.token_values.get(key, []) for e in examples], 0.0, torch.float32)
    scalars = {
        key: torch.tensor([e.scalars.get(key, 0.0) for e in examples], dtype=torch.float32)
        for key in examples[0].scalars
    }
    batch = {"input_ids": input_ids, "attention_mask": attention, **scalars}
    batch.update({key: values[:, 1:] for key, values in per_token.items()})
    batch["index"] = torch.tensor(indices if indices is not None else [-1] * len(examples))
    return batch


def collate_packed(examples: list[TokenizedExample], rows: list[list[int]], pad_id: int) -> MicroBatch:
    """``collate`` of the examples that ``rows`` name (indices into ``examples``, the step's), in row order, plus
    their packed layout: each row holds its examples end to end, right-padded to the longest row."""
    order = [i for row in rows for i in row]
    batch = collate([examples[i] for i in order], pad_id, order)
    position = {index: k for k, index in enumerate(order)}
    width = max(sum(len(examples[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    unpack_index = torch.zeros(batch["loss_mask"].shape, dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            n = len(examples[i])
            input_ids[r, offset : offset + n] = torch.tensor(examples[i].input_ids)
            position_ids[r, offset : offset + n] = torch.arange(n)
            # position t of the row predicts token t+1: example i's t-th next-token value is at offset + t
            unpack_index[position[i], : n - 1] = r * (width - 1) + offset + torch.arange(n - 1)
            offset += n
        position_ids[r, offset:] = torch.arange(width - offset)
    batch.update(packed_input_ids=input_ids, packed_position_ids=position_ids, unpack_index=unpack_index)
    return batch


def unpack_token_values(packed: torch.Tensor, batch: MicroBatch) -> torch.Tensor:
    """Next-token values of the packed rows [R, C-1] in the padded layout [B, L-1]; 0 past each example's end."""
    values = packed.reshape(-1)[batch["unpack_index"].to(packed.device)]
    inside = batch["attention_mask"][:, 1:].bool().to(packed.device)
    return torch.where(inside, values, torch.zeros_like(values))


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


def pack_by_token_budget(units: list[Unit], lengths: list[int], token_budget: int) -> list[list[list[int]]]:
    """Micro-batches of packed rows (each a list of example indices): units in order of their longest sequence,
    each sequence into the first row of the current micro-batch with room for it (rows as long as the micro-batch's
    longest sequence), a new micro-batch when rows x that length would pass token_budget. A unit never splits
    across micro-batches."""
    ordered = sorted(units, key=lambda unit: max(lengths[i] for i in unit), reverse=True)
    batches: list[list[list[int]]] = []
    free: list[int] = []  # room left in each row of the current micro-batch
    width = 0
    for unit in ordered:
        for start_new in (False, True):
            if start_new or not batches:
                batches.append([])
                free, width = [], max(lengths[i] for i in unit)
            rows, room = [list(row) for row in batches[-1]], list(free)
            for i in sorted(unit, key=lambda i: lengths[i], reverse=True):
                slot = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
                if slot is None:
                    rows.append([])
                    room.append(width)
                    slot = len(rows) - 1
                rows[slot].append(i)
                room[slot] -= lengths[i]
            if len(rows) * width <= token_budget or not batches[-1]:
                batches[-1], free = rows, room
                break
    return batches


def shard_for_ranks(units: list[Unit], lengths: list[int], world_size: int) -> list[list[Unit]]:
    """Longest-first assignment to the rank with the fewest tokens so far (balanced work per rank)."""
    shards: list[list[Unit]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for unit in sorted(units, key=lambda u: sum(lengths[i] for i in u), reverse=True):
        rank = loads.index(min(loads))
        shards[rank].append(unit)
        loads[rank] += sum(lengths[i] for i in unit)
    return shards


def _rank_micro_batches(
    examples: list[TokenizedExample],
    lengths: list[int],
    shard: list[Unit],
    token_budget: int,
    pad_id: int,
    packing: bool,
) -> list[MicroBatch]:
    if packing:
        return [collate_packed(examples, rows, pad_id) for rows in pack_by_token_budget(shard, lengths, token_budget)]
    batches = []
    for group in split_by_token_budget(shard, lengths, token_budget):
        indices = [i for unit in group for i in unit]
        batches.append(collate([examples[i] for i in indices], pad_id, indices))
    return batches


def plan_step(
    examples: list[TokenizedExample],
    world_size: int,
    token_budget: int,
    pad_id: int,
    group_size: int = 1,
    packing: bool = False,
) -> tuple[list[list[MicroBatch]], int]:
    """Per-rank micro-batches (equal counts) and the step's global number of target tokens; ``packing``: packed
    rows (see ``collate_packed``) instead of one padded row per sequence."""
    lengths = [len(e) for e in examples]
    units = _units(len(examples), group_size)
    per_rank = [
        _rank_micro_batches(examples, lengths, shard, token_budget, pad_id, packing)
        for shard in shard_for_ranks(units, lengths, world_size)
    ]
    count = max(1, max(len(batches) for batches in per_rank))
    plans = []
    for batches in per_rank:
        batches += [filler_micro_batch(examples[0], pad_id) for _ in range(count - len(batches))]
        plans.append(batches)
    global_targets = sum(int(sum(e.loss_mask[1:])) for e in examples)
    return plans, global_targets
