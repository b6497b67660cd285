"""The `posttrain` command line.

    posttrain run grpo-pipeline --config configs/grpo_tiny.yaml --set grpo.max_steps=20 [--json]
    posttrain config show --config sft_tiny --set policy.world_size=1
    posttrain export <artifact URI> OUT [--dtype bf16]
    posttrain make-tiny-model OUT --arch qwen2
    posttrain convert hf-to-megatron HF_DIR OUT --tensor-parallel 2 | megatron-to-hf MEGATRON_DIR OUT
    posttrain env build vllm
    posttrain server up|down|status

User errors (bad config, missing file, unreachable bucket, malformed row) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any, Callable

for _key, _value in {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "TOKENIZERS_PARALLELISM": "false",
    # Prefect's temporary server gets 20 s to answer by default; a busy 2-core machine can need more.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # posttrain's own log lines (resumed from step N, why a stage starts afresh) go where Prefect's do: the terminal,
    # and the task's log in the Prefect UI
    "PREFECT_LOGGING_EXTRA_LOGGERS": "posttrain",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",  # a line logged outside a run stays on the terminal
}.items():
    os.environ.setdefault(_key, _value)

from engine.errors import InfrastructureError, PosttrainError  # noqa: E402

EXIT_USER_ERROR = 2
EXIT_INFRASTRUCTURE = 1


PIPELINES = ("grpo-pipeline", "dpo-pipeline", "distill-pipeline", "sft", "reward-model", "grpo", "dpo", "distill")
DEFAULT_CONFIGS = {
    "grpo-pipeline": "grpo_tiny",
    "dpo-pipeline": "dpo_tiny",
    "distill-pipeline": "distill_tiny",
    "distill": "distill_tiny",
    "sft": "sft_tiny",
    "reward-model": "grpo_tiny",
    "grpo": "grpo_tiny",
    "dpo": "dpo_tiny",
}


def _flow(pipeline: str) -> Callable[..., dict[str, Any]]:
    """The pipeline's Prefect flow (imported late: Prefect and the trainers take seconds to import)."""
    from flows.pipelines import FLOWS

    return FLOWS[pipeline]


class _HideUserErrorTracebacks(logging.Filter):
    """A user error is reported by the CLI in one line; Prefect need not print its traceback too."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], PosttrainError):
            record.exc_info, record.exc_text = None, None
        return True


def _quiet_user_error_tracebacks() -> None:
    user_filter = _HideUserErrorTracebacks()
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(user_filter)


def cmd_run(args: argparse.Namespace) -> int:
    from engine.config import RunParameters
    from engine.secrets import OVERRIDES_ENV, holds_secret
    from engine.stages import preflight
    from tasks.prefect_api import prepare_prefect_api

    if args.pipeline not in PIPELINES:
        raise PosttrainError(f"unknown pipeline {args.pipeline!r}; choose from {', '.join(PIPELINES)}")
    overrides = dict(_split_override(o) for o in args.set)
    # secret overrides reach the flow through this process's environment, not as Prefect parameters
    secret = {key: value for key, value in overrides.items() if holds_secret(key, value)}
    os.environ[OVERRIDES_ENV] = json.dumps(secret)
    params = RunParameters(
        config=args.config or DEFAULT_CONFIGS[args.pipeline],
        overrides={key: value for key, value in overrides.items() if key not in secret},
        resume=args.resume,
    )
    cfg = params.resolve()
    preflight(cfg)  # a bad config, store or input path fails here, before Prefect starts
    startup_timeout_s = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    use_api = prepare_prefect_api(startup_timeout_s)  # a temporary server starts up while the flow imports...
    flow = _flow(args.pipeline)
    from engine.tracking import open_store  # imported with the flow: MLflow takes 2 s

    open_store(cfg.tracking)  # ...and MLflow opens its store
    _quiet_user_error_tracebacks()  # after the import: Prefect installs its log handlers then
    with use_api():
        summary = flow(**params.model_dump())
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        _print_summary(summary)
    return 0


def _split_override(text: str) -> tuple[str, Any]:
    from engine.config import parse_override

    keys, value = parse_override(text)
    return ".".join(keys), value


def _print_summary(summary: dict[str, Any]) -> None:
    runs = ", ".join(f"{sink} {link}" for sink, link in summary["tracking"].items())
    print(f"{summary['pipeline']}: {summary['status']} in {summary['wall_seconds']:.1f}s ({runs or 'not tracked'})")
    for name, stage in summary["stages"].items():
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in stage["metrics"].items())
        print(f"  {name:<12} {'cached' if stage['cached'] else 'ran':<6} {stage['artifact']}  {metrics}")


def cmd_config_show(args: argparse.Namespace) -> int:
    from engine.config import load_config

    print(load_config(args.config, args.set).to_yaml(), end="")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from engine.config import TinyModelConfig, first_error_line
    from engine.errors import ConfigError
    from engine.models.tiny import make_tiny_model

    fields = {k: v for k, v in vars(args).items() if k in TinyModelConfig.model_fields and v is not None}
    try:
        tiny = TinyModelConfig(**fields)
    except ValidationError as exc:
        raise ConfigError(first_error_line(exc)) from None
    out = make_tiny_model(args.out, tiny)
    print(out)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.models import megatron_convert

    source, target = Path(args.source).expanduser(), Path(args.out).expanduser()
    if not source.is_dir():
        raise PosttrainError(f"model folder not found: {args.source}")
    if args.direction == "hf-to-megatron":
        out = megatron_convert.convert_hf_folder(source, target, args.tensor_parallel, args.pipeline_parallel)
    else:
        out = megatron_convert.convert_megatron_folder(source, target)
    print(out)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """A committed model (a store URI, or any model name) as a plain Hugging Face folder."""
    from pathlib import Path

    from engine.config import load_config
    from engine.models.export import export_folder, stage_of
    from engine.models.loading import resolve_model
    from engine.stages import open_store

    cfg = load_config(args.config, args.set)
    store = open_store(cfg)
    source = resolve_model(args.artifact, store, Path(cfg.workdir) / "cache")
    manifest = store.manifest(args.artifact) if args.artifact.startswith(store.root + "/") else None
    metrics = manifest.metadata.get("metrics", {}) if manifest is not None else {}
    print(export_folder(source, Path(args.out).expanduser(), args.dtype, metrics, stage_of(args.artifact)))
    return 0


def cmd_env_build(args: argparse.Namespace) -> int:
    from engine import worker_envs

    for kind in args.kinds:
        print(worker_envs.build(kind, force=args.force))
    return 0


def _default_workdir() -> str:
    from engine.config import PipelineConfig

    return PipelineConfig.model_fields["workdir"].default


def cmd_server(args: argparse.Namespace) -> int:
    from flows import services

    workdir = args.workdir or _default_workdir()
    if args.action == "up":
        urls = services.up(workdir, services.Ports(args.prefect_port, args.mlflow_port), worker=not args.no_worker)
        print(f"Prefect UI: {urls['prefect_ui']}")
        print(f"MLflow UI:  {urls['mlflow_ui']}")
        print(f"work pool '{services.WORK_POOL}' {'with a worker' if not args.no_worker else '(no worker started)'}")
        print(f"in your shell: source {services.state_dir(workdir) / 'env'}")
    elif args.action == "down":
        stopped = services.down(workdir)
        print("stopped: " + (", ".join(stopped) or "nothing was running"))
    else:
        for name, pid in services.status(workdir).items():
            print(f"{name:<15} {'running (pid %d)' % pid if pid else 'stopped'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="Post-training pipelines on Prefect + Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline (as a Prefect flow)")
    run.add_argument("pipeline", help=" | ".join(PIPELINES))
    run.add_argument("--config", help="YAML file or name in configs/ (default: <pipeline>_tiny)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="dotted override, repeatable")
    run.add_argument("--resume", help="auto | never | <checkpoint URI>")
    run.add_argument("--json", action="store_true", help="print the run summary as JSON on the last line")
    run.set_defaults(handler=cmd_run)

    config = sub.add_parser("config", help="inspect configs")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved config")
    show.add_argument("--config")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(handler=cmd_config_show)

    export = sub.add_parser("export", help="a committed model as a plain Hugging Face folder")
    export.add_argument("artifact", help="the model's URI (the `artifact` of a stage in the run summary)")
    export.add_argument("out", help="the folder to write (new or empty)")
    export.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast the weights (default: as committed)")
    export.add_argument("--config", help="config whose storage settings reach the artifact (default: the defaults)")
    export.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    export.set_defaults(handler=cmd_export)

    env = sub.add_parser("env", help="isolated worker environments")
    env_sub = env.add_subparsers(dest="env_command", required=True)
    env_build = env_sub.add_parser("build", help="build (or reuse) the venv of a worker kind, e.g. vllm")
    env_build.add_argument("kinds", nargs="+")
    env_build.add_argument("--force", action="store_true", help="rebuild even if it exists")
    env_build.set_defaults(handler=cmd_env_build)

    server = sub.add_parser("server", help="local Prefect + MLflow servers and a worker, on 127.0.0.1")
    server.add_argument("action", choices=["up", "down", "status"])
    server.add_argument("--workdir", help="where their state and logs go (default: the config's workdir)")
    server.add_argument("--prefect-port", type=int, default=4200)
    server.add_argument("--mlflow-port", type=int, default=5000)
    server.add_argument("--no-worker", action="store_true", help="start no worker for the 'local' pool")
    server.set_defaults(handler=cmd_server)

    tiny = sub.add_parser("make-tiny-model", help="build a random-init model + BPE tokenizer in HF format")
    tiny.add_argument("out")
    tiny.add_argument("--arch", choices=["llama", "qwen2"])
    tiny.add_argument("--hidden-size", dest="hidden_size", type=int)
    tiny.add_argument("--layers", dest="num_layers", type=int)
    tiny.add_argument("--heads", dest="num_heads", type=int)
    tiny.add_argument("--kv-heads", dest="num_kv_heads", type=int)
    tiny.add_argument("--intermediate-size", dest="intermediate_size", type=int)
    tiny.add_argument("--vocab-size", dest="vocab_size", type=int)
    tiny.add_argument("--seed", type=int)
    tiny.set_defaults(handler=cmd_make_tiny_model)

    convert = sub.add_parser("convert", help="Hugging Face <-> Megatron weights (Llama, Qwen2)")
    convert.add_argument("direction", choices=["hf-to-megatron", "megatron-to-hf"])
    convert.add_argument("source", help="a Hugging Face folder, or a Megatron folder written by this command")
    convert.add_argument("out", help="the folder to create (must not exist)")
    convert.add_argument("--tensor-parallel", type=int, default=1, help="hf-to-megatron: tensor ranks")
    convert.add_argument("--pipeline-parallel", type=int, default=1, help="hf-to-megatron: pipeline stages")
    convert.set_defaults(handler=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    from engine.logs import show_on_stderr

    args = build_parser().parse_args(argv)
    show_on_stderr()
    try:
        return args.handler(args)
    except PosttrainError as exc:
        print("error: " + " ".join(str(exc).split("\n")), file=sys.stderr)  # one line, whatever it quotes
        return EXIT_USER_ERROR
    except InfrastructureError as exc:  # retries spent (Prefect's, the stage's own): one line, not a traceback
        print("error: " + " ".join(str(exc).split("\n")), file=sys.stderr)
        return EXIT_INFRASTRUCTURE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
