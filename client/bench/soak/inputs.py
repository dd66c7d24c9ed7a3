"""What the soak sends: valid chunks, and invalid steps the server must answer with INVALID_ARGUMENT."""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from cellserve.client.bench.load import DYNAMIC_DIM
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


def step_shape(info: ModelInfo, t: int) -> tuple[int, ...]:
    """A valid step's shape: ``[T, *frame]``, a dynamic frame dim at the load generator's size."""
    return (t, *(DYNAMIC_DIM if d < 0 else d for d in info.frame or ()))


def bad_step(info: ModelInfo, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """An invalid step input for ``info``'s model, and the name of what is wrong with it.

    Every kind breaks the model's own contract (its dtype, rank, fixed frame dims, vocabulary or finiteness),
    so the server must refuse it whatever the model: token models get ids out of range, float models NaN, Inf
    and a wrong width (only where the frame has a fixed dim to get wrong).
    """
    t = int(rng.integers(1, 5))
    shape = step_shape(info, t)
    if info.input_kind == "tokens":
        ids = rng.integers(0, info.input_size, size=shape, dtype=np.int64)
        first, last = np.zeros(ids.shape, bool), np.zeros(ids.shape, bool)
        first.flat[0] = last.flat[-1] = True
        kinds = {
            "token_out_of_range": lambda: np.where(last, info.input_size, ids),
            "negative_token": lambda: np.where(first, -1, ids),
            "wrong_rank": lambda: ids[..., None],
            "float_tokens": lambda: ids.astype(np.float32),
            "int32_tokens": lambda: ids.astype(np.int32),
            "empty": lambda: np.zeros((0, *shape[1:]), dtype=np.int64),
        }
    else:
        dtype = np.dtype(info.input_dtype)
        feats = rng.standard_normal(shape).astype(dtype)
        steps = np.arange(t).reshape(t, *(1,) * (len(shape) - 1))  # broadcasts over a step's frame
        kinds = {
            "nan": lambda: np.where(steps == 0, np.nan, feats).astype(dtype),
            "inf": lambda: np.where(steps == t - 1, np.inf, feats).astype(dtype),
            "float64": lambda: feats.astype(np.float64),
            "wrong_rank": lambda: feats.reshape(-1) if len(shape) > 1 else feats[:, None],
            "empty": lambda: np.zeros((0, *shape[1:]), dtype=dtype),
        }
        fixed = [i for i, d in enumerate(info.frame or ()) if d > 0]
        if fixed:  # a fixed frame dim one too wide (a dynamic one takes any size)
            wide = list(shape)
            wide[1 + fixed[-1]] += 1
            kinds["wrong_width"] = lambda: rng.standard_normal(wide).astype(dtype)
    name = str(rng.choice(sorted(kinds)))
    return name, np.asarray(kinds[name]())


def good_step(info: ModelInfo, t: int, rng: np.random.Generator) -> np.ndarray:
    """A valid chunk of ``t`` steps, ``[T, *frame]``: token ids in the vocabulary, or normal values of the model's
    float dtype."""
    shape = step_shape(info, t)
    if info.input_kind == "tokens":
        return rng.integers(0, info.input_size, size=shape, dtype=np.int64)
    return rng.standard_normal(shape).astype(info.input_dtype)


def output_fits(y: np.ndarray, info: ModelInfo, t: int) -> bool:
    """Whether ``y`` is a step's output for ``t`` steps: ``[T, *output_frame]`` (a dynamic dim any size >= 1)."""
    frame = info.output_frame or ()
    if y.ndim != 1 + len(frame) or y.shape[0] != t:
        return False
    return all(d == w or (w < 0 and d >= 1) for d, w in zip(y.shape[1:], frame, strict=True))
