"""TRL's own environment for the comparison benchmarks: never a dependency of the project itself.

.venv/bin/python -m bench.trl_env     # builds (or reuses) it and prints its path
"""

from __future__ import annotations

from engine.worker_envs import WorkerEnvSpec, build_spec, spec_path

TRL_ENV = WorkerEnvSpec(
    kind="bench-trl",
    first=("torch==2.13.0",),
    requirements=(
        "trl==1.16.0",
        "transformers==5.19.0",
        "accelerate>=1.10",
        "datasets>=3",
        "tqdm",
        "math-verify==0.9.0",  # the reward: engine.environments.math_verifier, as ours scores
    ),
    remove=("torchvision", "torchaudio", "torchcodec", "triton"),
    check_import="trl",
)


def trl_python(build: bool = True) -> str:
    path = build_spec(TRL_ENV) if build else spec_path(TRL_ENV)
    return str(path / "bin" / "python")


if __name__ == "__main__":
    print(trl_python())
