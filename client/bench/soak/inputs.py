"""What the soak sends: valid chunks, and invalid steps the server must answer with INVALID_ARGUMENT."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from cellserve.client.model_info import ModelInfo


@dataclass(frozen=True)
class UncheckedInfo(ModelInfo):
    """The model's description with the SDK's client-side input check turned off.

    Installed on a session for one injected step only, so the invalid input reaches the server
    (the SDK would refuse it before sending) and the server's own validation is what is soaked.
    """

    @classmethod
    def of(cls, info: ModelInfo) -> UncheckedInfo:
        return cls(**{f.name: getattr(info, f.name) for f in fields(info)})

    def check_input(self, x: object) -> np.ndarray:
        return np.asarray(x)


def bad_step(info: ModelInfo, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """An invalid step input for ``info``'s model, and the name of what is wrong with it."""
    t = int(rng.integers(1, 5))
    if info.input_kind == "tokens":
        ids = rng.integers(0, info.input_size, size=t, dtype=np.int64)
        kinds = {
            "token_out_of_range": lambda: np.where(np.arange(t) == t - 1, info.input_size, ids),
            "negative_token": lambda: np.where(np.arange(t) == 0, -1, ids),
            "wrong_rank": lambda: ids.reshape(t, 1),
            "float_tokens": lambda: ids.astype(np.float32),
            "int32_tokens": lambda: ids.astype(np.int32),
            "empty": lambda: np.zeros(0, dtype=np.int64),
        }
    else:
        feats = rng.standard_normal((t, info.input_size)).astype(np.float32)
        kinds = {
            "nan": lambda: np.where(np.arange(t)[:, None] == 0, np.nan, feats).astype(np.float32),
            "inf": lambda: np.where(np.arange(t)[:, None] == t - 1, np.inf, feats).astype(np.float32),
            "wrong_width": lambda: rng.standard_normal((t, info.input_size + 1)).astype(np.float32),
            "float64": lambda: feats.astype(np.float64),
            "wrong_rank": lambda: feats.reshape(-1),
            "empty": lambda: np.zeros((0, info.input_size), dtype=np.float32),
        }
    name = str(rng.choice(sorted(kinds)))
    return name, np.asarray(kinds[name]())


def good_step(info: ModelInfo, t: int, rng: np.random.Generator) -> np.ndarray:
    """A valid chunk of ``t`` steps: [T] token ids or [T, I] float32 features."""
    if info.input_kind == "tokens":
        return rng.integers(0, info.input_size, size=t, dtype=np.int64)
    return rng.standard_normal((t, info.input_size)).astype(np.float32)
