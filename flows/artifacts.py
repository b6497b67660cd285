"""What a pipeline run publishes in Prefect: a markdown summary and links to the committed models."""

from __future__ import annotations

import re
from typing import Any

MODEL_STAGES = ("sft", "reward_model", "grpo", "dpo")
TRACKER_NAMES = {"tensorboard": "TensorBoard", "wandb": "W&B"}


def summary_markdown(summary: dict[str, Any], config: str, mlflow_url: str | None, tracking_uri: str | None) -> str:
    """The stage table of a run summary (see ``PipelineRun.finish``)."""
    lines = [
        f"# {summary['pipeline']}: {summary['status']}",
        "",
        f"- config: `{config}`",
        f"- wall time: {summary['wall_seconds']:.1f} s",
    ]
    for sink, link in summary["tracking"].items():
        if sink == "mlflow":
            run = f"[{link}]({mlflow_url})" if mlflow_url else f"`{link}` (tracking URI `{tracking_uri}`)"
            lines.append(f"- MLflow run: {run}")
        else:
            lines.append(f"- {TRACKER_NAMES[sink]} run: `{link}`")
    lines += [
        "",
        "| stage | status | artifact | key metrics |",
        "|---|---|---|---|",
    ]
    for name, stage in summary["stages"].items():
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in stage["metrics"].items()) or "-"
        status = "cached" if stage["cached"] else "ran"
        lines.append(f"| {name} | {status} | `{stage['artifact']}` | {metrics} |")
    return "\n".join(lines) + "\n"


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def publish(summary: dict[str, Any], config: str, mlflow_url: str | None, tracking_uri: str | None) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    pipeline = summary["pipeline"]
    create_markdown_artifact(
        key=artifact_key(pipeline, "summary"),
        markdown=summary_markdown(summary, config, mlflow_url, tracking_uri),
        description=f"{pipeline} run summary",
    )
    for name, stage in summary["stages"].items():
        if name in MODEL_STAGES:
            create_link_artifact(
                key=artifact_key("model", name),  # keyed by stage: its versions span runs
                link=stage["artifact"],
                link_text=f"{name} model",
                description=f"committed {name} model ({'cached' if stage['cached'] else 'trained in this run'})",
            )
