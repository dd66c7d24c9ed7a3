"""A session's portable state: what a resume token carries, and what a snapshot or drain reads out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ResumeState:
    """One session's model, model file, step count and recurrent state (host copies)."""

    model: str
    model_sha256: str
    steps: int
    h: np.ndarray  # [L, H] float32
    c: np.ndarray  # [L, H] float32
