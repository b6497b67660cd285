"""The tested set (deployments/constraints.txt) pins every package the project and its test extra need, each inside
the range pyproject.toml declares: CI installs exactly it, users with an existing environment get the ranges."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def declared() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = project["dependencies"] + extras["trackers"] + extras["test"]
    return [r for r in map(Requirement, wanted) if r.name != "posttrain" and (r.marker is None or r.marker.evaluate())]


def tested_set() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (REPO / "deployments" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate():
                (spec,) = requirement.specifier
                assert spec.operator == "==", line
                pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def test_every_declared_requirement_is_pinned_inside_its_range():
    pins = tested_set()
    for requirement in declared():
        pinned = pins.get(canonicalize_name(requirement.name))
        assert pinned is not None, f"{requirement.name} is not in deployments/constraints.txt"
        assert requirement.specifier.contains(pinned, prereleases=True), (
            f"{requirement.name}=={pinned} vs {requirement}"
        )


def test_prefect_mlflow_and_transformers_take_ranges_and_ray_is_pinned():
    by_name = {r.name: r for r in declared()}
    for name in ("prefect", "mlflow", "transformers"):
        assert "==" not in str(by_name[name].specifier), f"{name}: a range, so an existing environment can keep its own"
    assert str(by_name["ray"].specifier).startswith("=="), "ray: a client must match the cluster's version exactly"
