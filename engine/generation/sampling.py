"""Per-sample seeds: a function of (seed, global prompt index, sample index) only.

Independent of how prompts are split over workers and batched, so a seeded run is reproducible at any
data-parallel size, and the n samples of one prompt are distinct draws.
"""

from __future__ import annotations

import hashlib


def sample_seed(seed: int | None, prompt_index: int, sample_index: int) -> int:
    if seed is None:
        import random

        return random.getrandbits(63)
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
