"""Bad input, generated: config overrides and dataset rows of every type, empty, huge, unicode or missing. Each case
ends in success or in one user error (a ``PosttrainError`` whose message is a single line, which the CLI prints as
`error: ...` with exit 2); never any other exception, which would be a traceback."""

from __future__ import annotations

import json
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import PipelineConfig, load_config, parse_override
from engine.data.chat import supervised_example, tokenize_prompt
from engine.data.formats import detect_format, normalize_row
from engine.data.preferences import pair_examples
from engine.errors import DataError, PosttrainError

CASES = 400  # generated cases per test


def known_keys(model=PipelineConfig, prefix="") -> list[str]:
    from engine.config import _section_type

    keys = []
    for name, field in model.model_fields.items():
        section = _section_type(field.annotation)
        keys += known_keys(section, f"{prefix}{name}.") if section else [f"{prefix}{name}"]
    return keys


KEYS = known_keys()
text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
scalars = st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=True) | text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3))
keys = st.sampled_from(KEYS) | st.text(alphabet=string.ascii_lowercase + "._", min_size=1, max_size=30)


def assert_one_line_user_error(error: PosttrainError) -> None:
    message = str(error)
    assert message and "\n" not in message, repr(message)


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, values, max_size=4))
def test_config_overrides_load_or_fail_in_one_line(overrides):
    try:
        load_config("grpo_tiny", overrides)
    except PosttrainError as error:
        assert_one_line_user_error(error)


@settings(max_examples=CASES, deadline=None)
@given(st.text(max_size=60))
def test_command_line_overrides_parse_or_fail_in_one_line(override):
    try:
        load_config(None, [override])
    except PosttrainError as error:
        assert_one_line_user_error(error)
    else:
        parse_override(override)


roles = st.sampled_from(["user", "assistant", "system", "tool", "robot", ""]) | scalars
message = st.fixed_dictionaries({"role": roles, "content": scalars}) | st.dictionaries(
    st.sampled_from(["role", "content", "name"]), roles | scalars, max_size=3
)
conversation = st.lists(message, min_size=1, max_size=4)
field_value = st.one_of(conversation, scalars, st.text(max_size=3000), st.lists(message | scalars, max_size=3))
row = st.dictionaries(
    st.sampled_from(["prompt", "completion", "chosen", "rejected", "messages", "text", "task", "answer", "x"]),
    field_value,
    min_size=1,
    max_size=5,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@settings(max_examples=CASES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(row, min_size=1, max_size=3), st.booleans())
def test_dataset_rows_normalize_and_tokenize_or_fail_in_one_line(tokenizer, rows, as_chat):
    cfg = load_config(None, {"data.as_chat": as_chat}).data
    try:
        kind = detect_format(list(rows[0]), cfg, "fuzz.jsonl")
        normalized = [normalize_row(r, kind, cfg, f"fuzz.jsonl row {i}") for i, r in enumerate(rows)]
        json.dumps(normalized)  # what the data stage writes
        for index, item in enumerate(normalized):
            if "prompt" in item:
                tokenize_prompt(tokenizer, item["prompt"])
            if "text" in item or "completion" in item:
                supervised_example(tokenizer, item, 64, f"row {index}")
            if "chosen" in item:
                pair_examples(tokenizer, [item], 64, "train")
    except DataError as error:
        assert_one_line_user_error(error)
