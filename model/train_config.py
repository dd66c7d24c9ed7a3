"""Hyper-parameters of a training run (torch-free, so the CLI can build its flags without importing torch)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters and budget of one run (all recorded in metrics.json)."""

    layers: int = 2
    hidden: int = 256
    embed: int = 64
    batch: int = 32  # parallel streams
    bptt: int = 128  # steps per truncated-BPTT window
    lr: float = 3e-3
    weight_decay: float = 0.0
    clip: float = 1.0
    minutes: float = 10.0  # wall-clock budget for the optimisation loop
    max_steps: int = 0  # 0 = no step limit (the budget decides)
    eval_every_s: float = 60.0
    val_bytes: int = 200_000  # prefix of the val split used for the periodic validation loss
    test_bytes: int = 0  # prefix of the test split for the final held-out score; 0 = all of it
    max_train_bytes: int = 0  # 0 = the whole train split
    seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 = torch's default

    def validate(self) -> None:
        """Raise ValueError naming the first bad hyper-parameter."""
        positive = ("layers", "hidden", "embed", "batch", "bptt", "val_bytes")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(self, key)}")
        for key in ("max_steps", "test_bytes", "max_train_bytes", "threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 0, got {getattr(self, key)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if not self.clip > 0:
            raise ValueError(f"--clip must be > 0, got {self.clip}")
        if not self.minutes > 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")
        if not self.eval_every_s > 0:
            raise ValueError(f"--eval-every-s must be > 0 seconds, got {self.eval_every_s}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device must be 'cpu' or 'cuda', got {self.device!r}")
