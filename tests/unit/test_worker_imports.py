"""What a trainer or generation worker's process imports: transformers without scikit-learn, which it would
otherwise import (with scipy and pandas) at every worker start although no worker uses it."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

PROBE = """
import sys
from engine.models.loading import skip_sklearn_in_transformers
skip_sklearn_in_transformers()
from transformers.utils import is_sklearn_available
print(is_sklearn_available(), "scipy" in sys.modules)
"""


def test_a_worker_process_imports_transformers_without_sklearn():
    assert importlib.metadata.version("scikit-learn")  # mlflow installs it, so the probe below can fail
    probe = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    assert probe.stdout.split() == ["False", "False"]
