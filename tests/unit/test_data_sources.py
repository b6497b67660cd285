"""Real datasets through the ``datasets`` library: every TRL format in both forms, column mapping and reference
answers, hub-shaped folders with subsets and splits, the hub's own cache, save_to_disk, globs, and the errors a user
meets (one line each, naming the file, row or field)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.config import DataConfig
from engine.data.datasets import build_splits, resolve_sources
from engine.errors import DataError
from tests.fixtures.hub_datasets import as_hub_snapshot, make_gsm8k, make_ultrafeedback

USER = {"role": "user", "content": "What is 2+2?"}
REPLY = {"role": "assistant", "content": "4"}


def splits(tmp_path: Path, **data):
    cfg = DataConfig(**data)
    return build_splits(cfg, resolve_sources(cfg, tmp_path / "cache"), seed=0)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_row(tmp_path: Path, row: dict, **data) -> dict:
    path = write_jsonl(tmp_path / "d.jsonl", [row] * 4)
    train, val = splits(tmp_path, source=str(path), val_fraction=0.25, **data)
    return train[0]


@pytest.mark.parametrize(
    "row,expected",
    [
        ({"text": "2+2=4"}, {"text": "2+2=4"}),
        ({"messages": [USER, REPLY]}, {"prompt": [USER], "completion": [REPLY], "answer": "4"}),
        ({"prompt": "2+2=", "completion": "4"}, {"prompt": "2+2=", "completion": "4", "answer": "4"}),
        ({"prompt": [USER], "completion": [REPLY]}, {"prompt": [USER], "completion": [REPLY], "answer": "4"}),
        ({"prompt": "2+2="}, {"prompt": "2+2="}),
        ({"prompt": [USER]}, {"prompt": [USER]}),
        (
            {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
            {"prompt": "2+2=", "chosen": "4", "rejected": "5", "completion": "4"},
        ),
        (
            {"prompt": [USER], "chosen": [REPLY], "rejected": [{**REPLY, "content": "5"}]},
            {"prompt": [USER], "chosen": [REPLY], "rejected": [{**REPLY, "content": "5"}]},
        ),
        (  # implicit prompt: the shared prefix of the two conversations
            {"chosen": [USER, REPLY], "rejected": [USER, {**REPLY, "content": "5"}]},
            {"prompt": [USER], "chosen": [REPLY], "rejected": [{**REPLY, "content": "5"}]},
        ),
        (  # implicit prompt in plain text: the common prefix
            {"chosen": "2+2=4", "rejected": "2+2=5"},
            {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        ),
    ],
    ids=[
        "text",
        "messages",
        "prompt-completion text",
        "prompt-completion chat",
        "prompt-only text",
        "prompt-only chat",
        "preference explicit text",
        "preference explicit chat",
        "preference implicit chat",
        "preference implicit text",
    ],
)
def test_every_trl_format_is_detected_and_normalized(tmp_path, row, expected):
    got = one_row(tmp_path, row)
    assert {key: got[key] for key in expected} == expected
    assert ("answer" in got) == ("answer" in expected)  # a preference pair's chosen reply is no reference answer


def test_column_mapping_reference_answers_and_the_other_columns(tmp_path):
    row = {"question": "Tom has 2 and gets 2. How many?", "answer": "2+2=4\n#### 4", "level": 3}
    got = one_row(tmp_path, row, prompt_field="question", response_field="answer", answer_pattern="#### (.+)$")
    assert got["prompt"] == row["question"] and got["completion"] == row["answer"]  # SFT imitates the whole answer
    assert got["answer"] == "4"  # verifiers compare with the extracted one
    assert got["columns"] == {"answer": row["answer"], "level": 3}  # reward functions get the dataset's columns
    chat = one_row(tmp_path, row, prompt_field="question", response_field="answer", as_chat=True, system_prompt="S")
    assert chat["prompt"] == [{"role": "system", "content": "S"}, {"role": "user", "content": row["question"]}]
    assert chat["completion"] == [{"role": "assistant", "content": row["answer"]}]
    separate = one_row(
        tmp_path, {"prompt": "q", "solution": "x = 7"}, answer_field="solution", answer_pattern=r"= (\d+)"
    )
    assert separate["answer"] == "7" and "completion" not in separate
    tasks = one_row(tmp_path, {"prompt": [USER], "kind": "calculator"}, task_field="kind")
    assert tasks["task"] == "calculator"


def test_a_uk_style_dataset_ultrafeedback_shape(tmp_path):
    """UltraFeedback binarized: a text prompt beside full chats; the prompt is their shared prefix (as TRL does)."""
    folder = make_ultrafeedback(tmp_path / "uf", train=10, test=4)
    train, val = splits(tmp_path, source=str(folder), split="train_prefs", val_split="test_prefs")
    assert (len(train), len(val)) == (10, 4)
    row = train[0]
    assert row["prompt"][-1]["role"] == "user" and [m["role"] for m in row["chosen"]] == ["assistant"]
    assert row["chosen"] != row["rejected"] and row["completion"] == row["chosen"]
    assert set(row["columns"]) == {"prompt_id", "score_chosen", "score_rejected"}


def test_gsm8k_shape_as_a_local_folder_and_through_the_hub_cache(tmp_path, monkeypatch):
    folder = make_gsm8k(tmp_path / "gsm8k", train=12, test=5)
    gsm8k = {"subset": "main", "val_split": "test", "prompt_field": "question", "response_field": "answer"}
    gsm8k["answer_pattern"] = "#### (.+)$"
    train, val = splits(tmp_path, source=str(folder), **gsm8k)
    assert (len(train), len(val)) == (12, 5) and train[0]["answer"].isdigit()
    with pytest.raises(DataError, match="has no subset 'nope' \\(data.subset\\); available: .*main.*socratic"):
        splits(tmp_path, source=str(folder), **{**gsm8k, "subset": "nope"})
    with pytest.raises(DataError, match="Unknown split"):
        splits(tmp_path, source=str(folder), **{**gsm8k, "val_split": "validation"})

    hub = tmp_path / "hf-hub"
    as_hub_snapshot(folder, hub, "openai/gsm8k")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    cfg = DataConfig(source="openai/gsm8k", **gsm8k)
    resolved = resolve_sources(cfg, tmp_path / "cache")
    assert resolved.train.fingerprint == "openai/gsm8k@0123456789abcdef0123456789abcdef01234567"
    hub_train, hub_val = build_splits(cfg, resolved, seed=0)
    assert hub_train == train and hub_val == val  # the hub and a local folder read the same rows
    with pytest.raises(DataError, match="cannot load dataset 'someone/missing' from the Hugging Face hub"):
        resolve_sources(DataConfig(source="someone/missing"), tmp_path / "cache")


def test_save_to_disk_folders_globs_and_csv(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])}
    ).save_to_disk(str(tmp_path / "saved"))
    train, val = splits(tmp_path, source=str(tmp_path / "saved"), val_split="test")
    assert (len(train), len(val)) == (6, 2)
    with pytest.raises(DataError, match="has no split 'dev'; splits: train, test"):
        splits(tmp_path, source=str(tmp_path / "saved"), split="dev")
    (tmp_path / "shards").mkdir()
    for k in range(3):
        write_jsonl(tmp_path / "shards" / f"part-{k}.jsonl", rows[2 * k : 2 * k + 2])
    train, val = splits(tmp_path, source=str(tmp_path / "shards" / "*.jsonl"), val_fraction=0.2)
    assert len(train) + len(val) == 6
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"))
    train, val = splits(tmp_path, source=str(tmp_path / "d.csv"), val_fraction=0.2)
    assert sorted(r["prompt"] for r in train + val) == sorted(r["prompt"] for r in rows)


def test_the_fingerprint_follows_the_bytes(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a"}] * 3)
    first = resolve_sources(DataConfig(source=str(path)), tmp_path).fingerprints()
    assert resolve_sources(DataConfig(source=str(path)), tmp_path).fingerprints() == first
    write_jsonl(path, [{"prompt": "q", "completion": "a"}] * 2 + [{"prompt": "q", "completion": "b"}])
    assert resolve_sources(DataConfig(source=str(path)), tmp_path).fingerprints() != first


@pytest.mark.parametrize(
    "content,message",
    [
        ("", "has no rows"),
        ('{"question": "q"}\n', "has columns \\['question'\\] but none of TRL's formats"),
        ('{"prompt": "q", "completion": "a"}\n{"prompt": null, "completion": "b"}\n', "row 1: 'prompt' is missing"),
        ('{"prompt": "q", "completion": "a"}\nnot json\n', "could not be parsed"),
        ('{"messages": [{"role": "robot", "content": "x"}]}\n', "row 0: 'messages' message 0 needs a role"),
        ('{"prompt": "q", "completion": "a"}\n', "'#### x' does not match"),
    ],
    ids=["empty file", "no format", "missing value", "malformed line", "bad role", "answer pattern"],
)
def test_bad_data_fails_in_one_line_naming_file_and_row(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    pattern = "#### x" if "pattern" in message or "####" in message else None
    with pytest.raises(DataError, match=message) as raised:
        splits(tmp_path, source=str(path), answer_pattern=pattern)
    assert "\n" not in str(raised.value) and "bad.jsonl" in str(raised.value)


def test_missing_sources_name_what_is_missing(tmp_path):
    with pytest.raises(DataError, match="dataset file not found: .*nope.jsonl"):
        splits(tmp_path, source=str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="matches no file"):
        splits(tmp_path, source=str(tmp_path / "*.parquet"))
