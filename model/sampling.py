"""Next-token sampling shared by offline ``cellserve generate`` and the server's Generate RPC.

Torch-free, numpy only, so that served and offline generation with the same seed pick the same tokens.
The exact algorithm for one logits row ``z`` (length V), in float64:

1. ``temperature == 0``: greedy — ``argmax(z)`` (the lowest index on ties); the generator is not used.
2. otherwise ``z = z / temperature``; if ``0 < top_k < V``, every logit outside the ``top_k`` largest
   (ranked by a stable sort of ``-z``, so ties keep the lower index) is set to ``-inf``;
3. ``p = exp(z - max(z)); p = p / sum(p)``;
4. one draw ``u = rng.random()`` from ``numpy.random.default_rng(seed)``; the token is the first index
   whose cumulative probability exceeds ``u`` (``searchsorted(cumsum(p), u, side="right")``, clamped to
   V-1 against rounding), never an index whose probability is 0.

Exactly one uniform draw per sampled token, so a seed fixes the whole sequence.
"""

from __future__ import annotations

import numpy as np


class Sampler:
    """Stateful sampler: ``Sampler(temperature, top_k, seed).next_token(logits_row) -> int``."""

    def __init__(self, temperature: float = 1.0, top_k: int = 0, seed: int | None = None) -> None:
        if not np.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k cut), got {top_k!r}")
        self.temperature = float(temperature)
        self.top_k = int(top_k)
        self.seed = seed
        self.rng = np.random.default_rng(seed)

    def probabilities(self, logits_row: np.ndarray) -> np.ndarray:
        """Steps 2–3 above: the float64 distribution a non-greedy draw samples from ([V])."""
        z = np.asarray(logits_row, dtype=np.float64).reshape(-1) / self.temperature  # [V]
        if 0 < self.top_k < z.size:
            keep = np.argsort(-z, kind="stable")[: self.top_k]  # [k]
            masked = np.full_like(z, -np.inf)  # [V]
            masked[keep] = z[keep]
            z = masked
        p = np.exp(z - z.max())  # [V]
        return p / p.sum()

    def next_token(self, logits_row: np.ndarray) -> int:
        """Pick the next token id from one row of logits ([V])."""
        z = np.asarray(logits_row, dtype=np.float64).reshape(-1)  # [V]
        if z.size == 0 or not np.all(np.isfinite(z)):
            raise ValueError("logits must be a non-empty row of finite numbers")
        if self.temperature == 0.0:
            return int(np.argmax(z))
        p = self.probabilities(z)  # [V]
        u = self.rng.random()
        cdf = np.cumsum(p)  # [V]
        token = int(np.searchsorted(cdf, u, side="right"))
        token = min(token, z.size - 1)
        while p[token] == 0.0:  # rounding at the top of the cdf: step back to the last possible token
            token -= 1
        return token
