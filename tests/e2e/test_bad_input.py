"""Bad input, as a user meets it at the command line: one line naming the field, file, row or function, exit 2,
no traceback, no retry, and nothing committed for the stage that refused it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from engine.storage import ArtifactStore
from tests.conftest import free_port, run_cli
from tests.fixtures.hub_datasets import make_gsm8k

pytestmark = pytest.mark.slow


def assert_one_line_error(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "AwaitingRetry" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-2000:]


def committed(workdir: Path, prefix: str) -> list[str]:
    return ArtifactStore(f"file://{workdir}/.posttrain/store", workdir / "cache").list(prefix)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["sft.max_step=3"], "unknown config key 'sft.max_step' (did you mean 'sft.max_steps'?)"),
        (["sft.batch_size=many"], "invalid config value for 'sft.batch_size'"),
        (["data.source=/nonexistent/train.jsonl"], "dataset file not found: /nonexistent/train.jsonl (data.source)"),
        (
            ["storage.root=s3://unreachable-bucket/x", "storage.endpoint_url=http://127.0.0.1:DEAD"],
            "cannot reach storage root s3://unreachable-bucket/x",
        ),
        (["grpo.reward_functions=[{function: /nope/rewards.py:fn}]"], "file not found: /nope/rewards.py"),
        (["grpo.reward_functions=[{function: BROKEN:score}]"], "cannot import BROKEN:score: ZeroDivisionError"),
        (["grpo.environments={spelling: math_nope:Env}"], "grpo.environments.spelling: cannot import math_nope:Env"),
    ],
    ids=["unknown key", "bad value", "missing file", "unreachable store", "missing code", "code raises", "no module"],
)
def test_fails_before_any_stage_starts(tmp_path, overrides, expected):
    broken = tmp_path / "broken.py"
    broken.write_text("1 / 0\n")
    values = {"DEAD": str(free_port()), "BROKEN": str(broken)}

    def filled(text: str) -> str:
        for name, value in values.items():
            text = text.replace(name, value)
        return text

    args = ["run", "sft"] + [a for o in overrides for a in ("--set", filled(o))]
    result = run_cli(args, cwd=tmp_path, timeout=120)
    assert_one_line_error(result, filled(expected))
    assert not (tmp_path / ".posttrain/store/stages").exists()


def write_rows(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "case,expected",
    [
        ("malformed row", "train.jsonl[train] row 1: 'prompt' is missing or empty"),
        ("missing answer column", "row 0: no 'solution' column for the reference answer (data.answer_field)"),
        # the same path with other messages (each also checked by the unit tier's data tests)
        *(
            pytest.param(case, expected, marks=pytest.mark.extended)
            for case, expected in [
                ("not json", "train.jsonl could not be parsed"),
                ("empty file", "train.jsonl has no rows (its file is empty)"),
                ("unknown subset", "has no subset 'nope' (data.subset); available: main, socratic"),
            ]
        ),
    ],
)
@pytest.mark.timeout(600)  # services 300, 300
def test_bad_data_fails_in_the_data_stage_and_commits_nothing(tmp_path, services, case, expected):
    good = {"prompt": "What is 1+1?", "completion": "2"}
    data = tmp_path / "train.jsonl"
    extra: list[str] = []
    if case == "malformed row":
        write_rows(data, [good, {"prompt": None, "completion": "3"}])
    elif case == "not json":
        write_rows(data, [good, "{not json"])
    elif case == "empty file":
        data.write_text("")
    elif case == "missing answer column":
        write_rows(data, [good, good])
        extra = ["--set", "data.answer_field=solution"]
    else:
        data = make_gsm8k(tmp_path / "gsm8k", train=4, test=2)
        extra = ["--set", "data.subset=nope"]
    args = ["run", "sft", "--set", f"data.source={data}", *extra]
    result = run_cli(args, cwd=tmp_path, timeout=300, env=services.prefect_env)
    assert_one_line_error(result, expected)
    assert committed(tmp_path, "datasets") == []


@pytest.mark.timeout(800)  # services 300, 500
def test_a_reward_function_that_raises_stops_grpo_naming_it_and_the_row(tmp_path, services):
    (tmp_path / "rewards.py").write_text(
        "def picky(prompts, completions, answer, **columns):\n"
        "    return [1.0 / (int(a) < 100) for a in answer]  # answers of 100 and more divide by zero\n"
    )
    args = ["run", "grpo", "--set", "stages.sft=false", "--set", "generation.backend=hf", "--set", "grpo.max_steps=2"]
    args += ["--set", f"grpo.reward_functions=[{{function: {tmp_path / 'rewards.py'}:picky}}]"]
    result = run_cli(args, cwd=tmp_path, timeout=500, env=services.prefect_env)
    store = ArtifactStore(f"file://{tmp_path}/.posttrain/store", tmp_path / "cache")
    (dataset,) = committed(tmp_path, "datasets")  # the stages before GRPO did their work
    validation = [json.loads(line) for line in (store.download(dataset) / "val.jsonl").read_text().splitlines()]
    first = next(i for i, row in enumerate(validation) if int(row["answer"]) >= 100)  # GRPO validates first
    assert_one_line_error(result, f"reward function picky raised ZeroDivisionError on dataset row {first}: ")
    assert not list((tmp_path / ".posttrain/store/stages/grpo").glob("*/model/MANIFEST.json"))
