"""Synthetic data, chat formatting with assistant-only masks, dynamic batching, dataset loading."""

import json

import pytest
import torch

from engine.config import DataConfig, SyntheticDataConfig
from engine.data.batching import collate, plan_step, split_by_token_budget
from engine.data.chat import TokenizedExample, tokenize_conversation, tokenize_prompt
from engine.data.datasets import build_splits
from engine.data.synthetic import make_arithmetic
from engine.errors import DataError


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


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_jsonl_with_prompt_answer_and_messages(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": i} for i in range(20)]
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    train, val = build_splits(DataConfig(source=str(path), val_fraction=0.1), tmp_path / "cache", {}, seed=0)
    assert len(train) + len(val) == 21 and len(val) == 2
    assert all(r["messages"][-1]["role"] == "assistant" for r in train + val)


def test_parquet_and_separate_val_file(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"q": "a", "r": "b"}] * 4).to_parquet(tmp_path / "t.parquet")
    val = write_jsonl(tmp_path / "v.jsonl", [{"q": "c", "r": "d"}])
    cfg = DataConfig(source=str(tmp_path / "t.parquet"), val_source=str(val), prompt_field="q", response_field="r")
    train, val_rows = build_splits(cfg, tmp_path / "cache", {}, seed=0)
    assert len(train) == 4 and val_rows[0]["answer"] == "d"


def test_missing_file_and_malformed_rows_name_the_file_and_row(tmp_path):
    with pytest.raises(DataError, match="dataset file not found: .*nope.jsonl"):
        build_splits(DataConfig(source=str(tmp_path / "nope.jsonl")), tmp_path, {}, seed=0)
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "q", "answer": "a"}, {"question": "q"}])
    with pytest.raises(DataError, match=r"bad.jsonl row 1: row has neither 'messages' nor 'prompt' \+ 'answer'"):
        build_splits(DataConfig(source=str(path)), tmp_path, {}, seed=0)
    path = write_jsonl(tmp_path / "roles.jsonl", [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match="roles.jsonl row 0: message 0 needs a role"):
        build_splits(DataConfig(source=str(path)), tmp_path, {}, seed=0)


def test_hub_dataset_offline_fails_with_one_line(tmp_path):
    with pytest.raises(DataError, match="cannot load dataset 'someone/no-such-dataset'"):
        build_splits(DataConfig(source="someone/no-such-dataset"), tmp_path, {}, seed=0)


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


def test_preference_pairs_and_tool_demonstrations(tiny_model_dir):
    from transformers import AutoTokenizer

    from engine.data.preferences import pair_examples

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    train, _ = make_arithmetic(SyntheticDataConfig(num_train=10, num_val=2, tool_use_fraction=0.5))
    assert sum("messages" in r for r in train) == 5
    assert train[0]["messages"][1]["content"].startswith("<calc>") and train[0]["messages"][2]["role"] == "tool"
    pairs = pair_examples(tok, train[:3], 64, None)
    assert len(pairs) == 6
    decode = [tok.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m]) for e in pairs]
    assert decode[0] == train[0]["answer"] + "<|im_end|>" and decode[1] != decode[0]
    rows = [{"prompt": "p", "chosen": "good", "rejected": "bad"}]
    chosen, rejected = pair_examples(tok, rows, 64, None)
    assert tok.decode([t for t, m in zip(chosen.input_ids, chosen.loss_mask) if m]) == "good<|im_end|>"


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
