"""A session's portable state: what a resume token carries, and what a snapshot or drain reads out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ResumeState:
    """One session's model, model file, step count and state: one host array per state tensor, in the
    manifest's order, each of its session shape (the graph's without the batch axis)."""

    model: str
    model_sha256: str
    steps: int
    states: tuple[np.ndarray, ...]
    names: tuple[str, ...] = ()  # each state's graph input name; empty from a version-1 token (h, c by position)
