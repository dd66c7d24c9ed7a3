"""The soak's settings: one frozen record, built from the command line and written into soak.json.

The defaults live in one place, the flags (``cellserve.client.bench.options``); this module imports
nothing heavy.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

DEFAULT_MINUTES = 10.0  # without --minutes or --seconds (its --help says so)
# flags whose dest is not the field's name (every other flag with a field's name sets that field)
FLAG_FIELDS = {
    "warmup": "warmup_fraction",
    "sample_every": "sample_every_s",
    "settle_timeout": "settle_timeout_s",
    "max_rss_growth": "max_rss_growth_pct",
}


@dataclass(frozen=True)
class SoakPlan:
    """The churn and sampling settings (all written into soak.json)."""

    duration_s: float
    # the churn: concurrent sessions, each open → messages → close or drop
    workers: int
    min_messages: int
    max_messages: int
    max_t: int
    p_drop: float
    p_bad_step: float
    think_ms: float
    # sampling, and the checks at the end
    warmup_fraction: float
    sample_every_s: float
    settle_timeout_s: float
    max_rss_growth_pct: float
    # the inputs and the model they go to
    seed: int
    model: str

    @property
    def warmup_s(self) -> float:
        return self.duration_s * self.warmup_fraction

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> SoakPlan:
        """The plan the ``cellserve bench soak`` flags describe (``--minutes`` or ``--seconds`` give its length)."""
        names = {f.name for f in fields(cls)}
        given = {FLAG_FIELDS.get(dest, dest): v for dest, v in vars(args).items()}
        minutes = args.minutes if args.minutes is not None else DEFAULT_MINUTES  # 0: refused below
        duration_s = args.seconds if args.seconds is not None else 60.0 * minutes
        return cls(**{k: v for k, v in given.items() if k in names}, duration_s=duration_s)

    def problems(self) -> list[str]:
        """What is wrong with the settings, as messages naming the flags (empty when all is well)."""
        checks = [
            (self.duration_s > 0, "the soak length must be > 0"),
            (self.workers >= 1, "--workers must be >= 1"),
            (1 <= self.min_messages <= self.max_messages, "need 1 <= --min-messages <= --max-messages"),
            (self.max_t >= 1, "--max-t must be >= 1"),
            (0 <= self.p_drop <= 1 and 0 <= self.p_bad_step <= 1, "probabilities must be in [0, 1]"),
            (self.think_ms >= 0, "--think-ms must be >= 0"),
            (0 <= self.warmup_fraction < 1, "--warmup must be in [0, 1)"),
            (self.sample_every_s > 0 and self.settle_timeout_s > 0, "--sample-every and --settle-timeout must be > 0"),
        ]
        return [msg for ok, msg in checks if not ok]
