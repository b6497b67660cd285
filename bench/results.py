"""bench/RESULTS.md: one section per benchmark, each replaced in place when its script runs again."""

from __future__ import annotations

import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Benchmark results\n\nEach section is written by the script it names; rerun that command to refresh it.\n"


def write_section(key: str, title: str, command: str, machine: str, body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    section = (
        f"<!-- {key}:start -->\n## {title}\n\n"
        f"Command: `{command}`  \nMachine: {machine}  \n"
        f"Measured: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n\n"
        f"{body}\n<!-- {key}:end -->\n"
    )
    pattern = re.compile(rf"<!-- {key}:start -->.*?<!-- {key}:end -->\n", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    RESULTS.write_text(text)
