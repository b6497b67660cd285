"""Synthetic data, chat formatting with assistant-only masks, dynamic batching, dataset loading."""

import json

import pytest

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
    examples = [ex(10), ex(3), ex(7), ex(2), ex(9)]
    groups = split_by_token_budget(examples, token_budget=20)
    for group in groups:
        assert len(group) * max(len(e) for e in group) <= 20
    assert sorted(len(e) for g in groups for e in g) == [2, 3, 7, 9, 10]
    batch = collate([ex(4, 2), ex(2, 1)], pad_id=99)
    assert batch["input_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 99, 99]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]


def test_plan_step_gives_every_rank_the_same_micro_batch_count():
    examples = [ex(n, 2) for n in (30, 5, 5, 5, 4)]
    plans, tokens = plan_step(examples, world_size=2, token_budget=16, pad_id=0)
    assert len(plans[0]) == len(plans[1])
    assert tokens == 10
    masked = sum(float(mb["loss_mask"].sum()) for plan in plans for mb in plan)
    assert masked == 10  # fillers add no targets


def test_long_sequence_alone_exceeds_budget_but_still_runs():
    groups = split_by_token_budget([ex(50), ex(3)], token_budget=16)
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
