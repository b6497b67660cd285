"""The API reference `make docs` renders from the docstrings (pdoc): every module renders without a warning about
our code, and every reference a docstring makes to our code (``engine.storage.ArtifactStore``) names something."""

from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ["engine", "tasks", "flows"]
REFERENCE = re.compile(r"`{1,2}((?:engine|tasks|flows)(?:\.[A-Za-z_]\w*)+)`{1,2}")


def resolves(dotted: str) -> bool:
    """``dotted`` is a module, or attributes reached from the longest importable module prefix."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False


def test_every_reference_in_a_docstring_or_comment_names_something():
    sources = sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py"))
    broken = [
        f"{path.relative_to(REPO)}: {reference}"
        for path in sources
        for reference in REFERENCE.findall(path.read_text())
        if not resolves(reference)
    ]
    assert not broken, broken


def test_pdoc_renders_every_module_and_warns_about_none_of_ours(tmp_path):
    import pdoc

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*PACKAGES, output_directory=tmp_path)
    # pdoc hides a default equal to an environment variable's value, as a guard against leaking one: the CLI sets
    # PREFECT_LOGGING_EXTRA_LOGGERS=posttrain, the name of the default experiment and logger too
    ours = [
        str(w.message)
        for w in caught
        if re.search(r"\b(engine|tasks|flows)\.", str(w.message)) and "environment variable" not in str(w.message)
    ]
    assert not ours, ours
    modules = {
        ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for package in PACKAGES
        for path in (REPO / package).rglob("*.py")
    }
    rendered = {".".join(path.relative_to(tmp_path).with_suffix("").parts) for path in tmp_path.rglob("*.html")}
    assert modules <= rendered, sorted(modules - rendered)
