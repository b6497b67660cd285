"""Synthetic data, chat formatting with assistant-only masks, dynamic batching, dataset loading."""

import torch

from engine.config import SyntheticDataConfig
from engine.data.batching import (
    collate,
    collate_packed,
    pack_by_token_budget,
    plan_step,
    split_by_token_budget,
    unpack_token_values,
)
from engine.data.chat import TokenizedExample, tokenize_conversation, tokenize_prompt
from engine.data.synthetic import make_arithmetic


def test_synthetic_splits_are_disjoint_deterministic_and_verifiable():
    cfg = SyntheticDataConfig(num_train=500, num_val=100, operations=["+", "-"])
    train, val = make_arithmetic(cfg)
    assert (len(train), len(val)) == (500, 100)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}
    assert make_arithmetic(cfg) == (train, val)
    for row in train[:50]:
        a, op, b = (
            row["prompt"].removeprefix("What is ").removesuffix("?").partition("+" if "+" in row["prompt"] else "-")
        )
        assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        assert row["answer"] not in row["wrong_answers"] and len(row["wrong_answers"]) == cfg.num_wrong_answers


def test_assistant_only_loss_mask(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "What is 37+45?"}, {"role": "assistant", "content": "82"}]
    example = tokenize_conversation(tok, messages, max_len=512)
    targets = [t for t, m in zip(example.input_ids, example.loss_mask) if m]
    assert tok.decode(targets) == "82<|im_end|>"
    prompt = tokenize_prompt(tok, messages[:1])
    assert example.input_ids[: len(prompt)] == prompt and not any(example.loss_mask[: len(prompt)])


def test_multi_turn_masks_every_assistant_turn(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [
        {"role": "user", "content": "What is 1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    example = tokenize_conversation(tok, messages, max_len=512)
    targets = tok.decode([t for t, m in zip(example.input_ids, example.loss_mask) if m])
    assert targets == "2<|im_end|>4<|im_end|>"


def ex(n, targets=1):
    return TokenizedExample(list(range(n)), [0] * (n - targets) + [1] * targets)


def test_token_budget_and_right_padding():
    lengths = [10, 3, 7, 2, 9]
    groups = split_by_token_budget([[i] for i in range(5)], lengths, token_budget=20)
    for group in groups:
        assert len(group) * max(lengths[u[0]] for u in group) <= 20
    assert sorted(lengths[u[0]] for g in groups for u in g) == [2, 3, 7, 9, 10]
    batch = collate([ex(4, 2), ex(2, 1)], pad_id=99)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]


def test_token_values_and_scalars_are_aligned_with_targets():
    example = TokenizedExample([5, 6, 7], [0, 1, 1], token_values={"gen_lp": [0.0, -0.5, -0.7]}, scalars={"adv": 2.0})
    batch = collate([example, ex(2, 1)], pad_id=0, indices=[4, 9])
    assert torch.allclose(batch["gen_lp"], torch.tensor([[-0.5, -0.7], [0.0, 0.0]]))
    assert batch["adv"].tolist() == [2.0, 0.0]
    assert batch["index"].tolist() == [4, 9]


def test_pairs_stay_together_and_indices_cover_every_example():
    examples = [ex(n, 1) for n in (9, 3, 4, 8, 2, 2, 7, 7)]
    plans, _ = plan_step(examples, world_size=2, token_budget=16, pad_id=0, group_size=2)
    seen = []
    for plan in plans:
        for mb in plan:
            indices = [i for i in mb["index"].tolist() if i >= 0]
            assert all(indices[k] // 2 == indices[k + 1] // 2 for k in range(0, len(indices), 2))
            seen += indices
    assert sorted(seen) == list(range(8))


def test_plan_step_gives_every_rank_the_same_micro_batch_count():
    examples = [ex(n, 2) for n in (30, 5, 5, 5, 4)]
    plans, tokens = plan_step(examples, world_size=2, token_budget=16, pad_id=0)
    assert len(plans[0]) == len(plans[1])
    assert tokens == 10
    masked = sum(float(mb["loss_mask"].sum()) for plan in plans for mb in plan)
    assert masked == 10  # fillers add no targets


def test_long_sequence_alone_exceeds_budget_but_still_runs():
    groups = split_by_token_budget([[0], [1]], [50, 3], token_budget=16)
    assert [len(g) for g in groups] == [1, 1]


def test_packed_rows_fit_the_budget_keep_units_together_and_cover_every_example():
    lengths = [9, 3, 4, 8, 2, 2, 7, 7, 1, 5]
    units = [[i, i + 1] for i in range(0, 10, 2)]
    batches = pack_by_token_budget(units, lengths, token_budget=36)
    seen = []
    for rows in batches:
        width = max(lengths[i] for row in rows for i in row)
        assert all(sum(lengths[i] for i in row) <= width for row in rows)
        assert len(rows) * width <= 36
        members = {i for row in rows for i in row}
        assert all((i ^ 1) in members for i in members)  # a pair never splits across micro-batches
        seen += members
    assert sorted(seen) == list(range(10))
    padded = split_by_token_budget(units, lengths, token_budget=36)
    assert len(batches) < len(padded)  # packing needs fewer micro-batches for the same budget


def test_packed_layout_restarts_positions_and_unpacks_to_the_padded_layout():
    examples = [ex(n, 2) for n in (5, 2, 3)]
    batch = collate_packed(examples, rows=[[0], [2, 1]], pad_id=99)
    assert batch["packed_input_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert batch["packed_position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1]]
    assert batch["index"].tolist() == [0, 2, 1]
    padded = collate([examples[i] for i in (0, 2, 1)], pad_id=99, indices=[0, 2, 1])
    for key in ("input_ids", "attention_mask", "loss_mask"):
        assert torch.equal(batch[key], padded[key])
    # a stand-in model that "predicts" each next token exactly: the unpacked values are the padded targets
    packed_next = batch["packed_input_ids"][:, 1:].float()
    unpacked = unpack_token_values(packed_next, batch)
    assert torch.equal(
        unpacked, torch.where(padded["attention_mask"][:, 1:].bool(), padded["input_ids"][:, 1:], 0).float()
    )


def test_packed_plan_has_the_same_targets_and_equal_micro_batch_counts():
    examples = [ex(n, 2) for n in (30, 5, 5, 5, 4, 12, 3)]
    plans, tokens = plan_step(examples, world_size=2, token_budget=32, pad_id=0, packing=True)
    assert len(plans[0]) == len(plans[1]) and tokens == 14
    assert sum(float(mb["loss_mask"].sum()) for plan in plans for mb in plan) == 14
    indices = sorted(i for plan in plans for mb in plan for i in mb["index"].tolist() if i >= 0)
    assert indices == list(range(7))


def test_observation_tokens_continue_a_generated_turn(tiny_model_dir):
    from transformers import AutoTokenizer

    from engine.data.chat import tokenize_observation

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "<calc>1+1</calc>"}]
    generated = tokenize_prompt(tok, messages[:1]) + tok("<calc>1+1</calc>", add_special_tokens=False)["input_ids"]
    generated.append(tok.eos_token_id)
    observation = {"role": "tool", "content": "2"}
    full = generated + tokenize_observation(tok, messages, observation)
    expected = tok.apply_chat_template(messages + [observation], tokenize=False, add_generation_prompt=True)
    assert tok.decode(full) == expected


def test_synthetic_rows_normalize_to_prompt_demonstration_answer_and_pair(tiny_model_dir):
    from transformers import AutoTokenizer

    from engine.data.preferences import pair_examples
    from engine.data.synthetic import normalized_rows

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train, _ = make_arithmetic(SyntheticDataConfig(num_train=10, num_val=2, tool_use_fraction=0.5))
    assert sum("messages" in r for r in train) == 5
    rows = normalized_rows(train, system_prompt=None)
    assert rows[0]["prompt"] == [{"role": "user", "content": train[0]["prompt"]}]
    assert rows[0]["completion"][0]["content"].startswith("<calc>") and rows[0]["completion"][1]["role"] == "tool"
    assert rows[9]["completion"] == [{"role": "assistant", "content": train[9]["answer"]}]
    assert rows[1]["rejected"][0]["content"] == train[1]["wrong_answers"][1 % len(train[1]["wrong_answers"])]
    assert all(r["answer"] == t["answer"] and r["columns"] == {"answer": t["answer"]} for r, t in zip(rows, train))
    pairs = pair_examples(tok, rows[:3], 64, "train")
    assert len(pairs) == 6
    decode = [tok.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m]) for e in pairs]
    assert decode[0] == train[0]["answer"] + "<|im_end|>" and decode[1] != decode[0]
    with_system = normalized_rows(train[:1], system_prompt="Be brief.")
    assert with_system[0]["prompt"][0] == {"role": "system", "content": "Be brief."}


def test_rounded_demonstrations_change_only_what_sft_imitates():
    exact_train, exact_val = make_arithmetic(SyntheticDataConfig(num_train=2000, operations=["+", "-"]))
    train, val = make_arithmetic(SyntheticDataConfig(num_train=2000, operations=["+", "-"], rounded_answer_rate=0.7))
    assert val == exact_val
    assert [{k: r[k] for k in ("prompt", "answer", "wrong_answers")} for r in train] == [
        {k: r[k] for k in ("prompt", "answer", "wrong_answers")} for r in exact_train
    ]
    rounded = [r for r in train if "messages" in r]
    assert 0.65 < len(rounded) / len(train) < 0.75
    for row in rounded:
        answer, estimate = int(row["answer"]), int(row["messages"][-1]["content"])
        assert estimate % 10 == 0 and abs(answer - estimate) < 10 and abs(estimate) <= abs(answer)
