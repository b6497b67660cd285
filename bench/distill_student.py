"""On-policy distillation into a smaller student: a 4-layer GRPO model teaches the 2-layer tiny model.

    .venv/bin/python -m bench.distill_student      # writes bench/RESULTS.md (about 10 minutes on 2 cores)

In one fresh folder: `posttrain run grpo-pipeline --set model.tiny.num_layers=4` trains the teacher (SFT on the
rounded answers, then GRPO with the exact-answer verifier); `posttrain run distill-pipeline --set
distill.teacher=<its grpo artifact>` trains the student (SFT from scratch, then distillation on no reward) and reports
the held-out greedy accuracy of its SFT start and of the distilled model.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from bench.grpo_vs_trl import POSTTRAIN
from bench.results import write_section

TEACHER_LAYERS = 4


def run(pipeline: str, workdir: Path, *overrides: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    args = [POSTTRAIN, "run", pipeline, "--json", *(a for o in overrides for a in ("--set", o))]
    out = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def parameters(workdir: Path, stage: str) -> int:
    """The parameter count the stage's MLflow run logged."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/.posttrain/mlflow.db")
    experiment = client.get_experiment_by_name("posttrain")
    (stage_run,) = client.search_runs([experiment.experiment_id], f"tags.`posttrain.stage` = '{stage}'")
    return int(stage_run.data.params["model/parameters"])


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        teacher = run("grpo-pipeline", workdir, f"model.tiny.num_layers={TEACHER_LAYERS}")
        uri = teacher["stages"]["grpo"]["artifact"]
        student = run("distill-pipeline", workdir, f"distill.teacher={uri}")
        counts = {"grpo": parameters(workdir, "grpo"), "distill": parameters(workdir, "distill")}
    taught, learnt = teacher["stages"]["evaluate"]["metrics"], student["stages"]["evaluate"]["metrics"]
    gain = learnt["accuracy_final"] - learnt["accuracy_sft"]
    rows = [
        "| model | layers | parameters | held-out accuracy after SFT | after GRPO / distillation |",
        "|---|---|---|---|---|",
        f"| teacher (grpo-pipeline) | {TEACHER_LAYERS} | {counts['grpo'] / 1e6:.2f} M "
        f"| {taught['accuracy_sft']:.3f} | {taught['accuracy_final']:.3f} |",
        f"| student (distill-pipeline) | 2 | {counts['distill'] / 1e6:.2f} M "
        f"| {learnt['accuracy_sft']:.3f} | {learnt['accuracy_final']:.3f} |",
        "",
        f"The student gains {gain:+.3f} held-out accuracy over its own SFT start (the gate: >= 0.3), trained on the "
        "teacher's per-token logprobs alone (no reward), 50 steps of 32 prompts x 4 samples. 256 held-out problems, "
        "greedy; both SFTs imitate a writer who rounds 60 % of the answers to the tens.",
    ]
    import torch

    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    write_section(
        "distill_student",
        "On-policy distillation into a smaller student",
        ".venv/bin/python -m bench.distill_student",
        machine,
        "\n".join(rows),
    )
    print("\n".join(rows))


if __name__ == "__main__":
    main()
