"""Loaded models: manifest + state pool + engine + scheduler per model, and checks of step inputs."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cellserve.model.manifest import Manifest, ManifestError, load_manifest
from cellserve.server.arrays import ArrayOps, array_ops
from cellserve.server.engine import Engine
from cellserve.server.errors import InvalidArgument, NotFound
from cellserve.server.metrics import Metrics
from cellserve.server.scheduler import Scheduler
from cellserve.server.settings import Settings
from cellserve.server.state_pool import StatePool

if TYPE_CHECKING:
    from cellserve.server.tracing import Tracing

log = logging.getLogger(__name__)

RESPONSE_OVERHEAD = 1024  # bytes of a response besides the output tensor's raw data (generous)


@dataclass
class LoadedModel:
    """Everything that serves one model."""

    manifest: Manifest
    model_dir: Path
    pool: StatePool
    engine: Engine
    scheduler: Scheduler
    max_output_steps: int  # most steps whose [T, O] float32 output fits in one response message
    max_steps: int  # most steps one step input may carry: max_chunk_steps, and what fits a reply

    def __post_init__(self) -> None:
        # What check_input compares against, per step: looked up once here, never through the manifest.
        m = self.manifest
        self.input_dtype = np.dtype(m.input_dtype)
        self._step_dims = m.step_dims
        self._dynamic = any(d is None for d in m.step_dims)  # frame dims any size: checked one by one
        self._vocab = m.vocab
        # ids of a chunk of up to this many steps are checked in Python (cheaper than two numpy reductions)
        self._small = 64 if not m.step_dims else 0
        # one time step's output as served (float32), sized by its fixed dims where a dim is dynamic
        self.output_step_bytes = 4 * (m.output_elements or max(1, math.prod(d or 1 for d in m.output.frame)))

    @property
    def name(self) -> str:
        return self.manifest.name

    def _frame_fits(self, frame: tuple[int, ...]) -> bool:
        """A frame with dynamic dims: the fixed ones equal, the dynamic ones at least 1."""
        want = self._step_dims
        return (
            self._dynamic
            and len(frame) == len(want)
            and all(d >= 1 if w is None else d == w for d, w in zip(frame, want, strict=True))
        )

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """Validate one session's step input; returns it ready for the engine or raises InvalidArgument."""
        shape = x.shape
        self._check_form(x, 0)
        vocab = self._vocab
        if vocab is not None:
            lo, hi = (min(v := x.tolist()), max(v)) if shape[0] <= self._small else (int(x.min()), int(x.max()))
            if lo < 0 or hi >= vocab:
                raise self._token_error(lo if lo < 0 else hi)
        elif not np.isfinite(x).all():
            raise self._not_finite()
        return x

    def check_rows(self, x: np.ndarray) -> dict[int, Exception]:
        """Validate a gateway message's steps x ``[N, T, *frame]`` (row i: one session's step). A problem of the
        whole message (shape, dtype, T) raises InvalidArgument; rows with bad values (token ids out of range,
        NaN or Inf) are returned, each with its own error, so the others can run."""
        self._check_form(x, 1, "row i of [N, T, *frame] is one session's step: ")
        flat = x.reshape(x.shape[0], -1)
        vocab = self._vocab
        if vocab is not None:
            if flat.view(np.uint64).max() < vocab:  # one reduction: a negative id is huge as uint64
                return {}
            lo, hi = flat.min(axis=1), flat.max(axis=1)
            bad = np.flatnonzero((lo < 0) | (hi >= vocab))
            return {int(i): self._token_error(int(lo[i]) if lo[i] < 0 else int(hi[i])) for i in bad}
        if np.isfinite(flat.sum(dtype=np.float64)):  # one reduction: NaN or Inf anywhere makes the sum not finite
            return {}
        return {int(i): self._not_finite() for i in np.flatnonzero(~np.isfinite(flat).all(axis=1))}

    def _check_form(self, x: np.ndarray, lead: int, prefix: str = "") -> None:
        """InvalidArgument (saying what the model takes, after ``prefix``) unless ``x`` is ``[*lead dims, T, *frame]``
        of the input dtype, with 1 <= T <= max_steps."""
        shape = x.shape
        frame = shape[lead + 1 :]
        if len(shape) <= lead or (frame != self._step_dims and not self._frame_fits(frame)):
            problem = f"shape {list(shape)}"
        elif x.dtype != self.input_dtype:
            problem = f"dtype {x.dtype}"
        elif not 1 <= shape[lead] <= self.max_steps:
            problem = f"T={shape[lead]} steps"
        else:
            return
        raise InvalidArgument(f"input has {problem}; {prefix}{self.manifest.describe_input(self.max_steps)}")

    def _token_error(self, bad: int) -> InvalidArgument:
        return InvalidArgument(f"token id {bad} is out of range; model {self.name!r} has vocabulary [0, {self._vocab})")

    def _not_finite(self) -> InvalidArgument:
        return InvalidArgument(f"input contains NaN or Inf; model {self.name!r} needs finite features")


class ModelRepository:
    """Name → LoadedModel for every model directory in the settings."""

    def __init__(self, models: dict[str, LoadedModel]) -> None:
        self._models = models

    @classmethod
    def load(cls, settings: Settings, metrics: Metrics, tracing: Tracing | None = None) -> ModelRepository:
        """Every model in ``settings``; ``tracing`` (on) gives each scheduler its step and batch spans."""
        ops = array_ops(settings.device, settings.device_id)
        models: dict[str, LoadedModel] = {}
        for model_dir in settings.model_dirs:
            try:
                manifest = load_manifest(model_dir)
            except ManifestError as e:
                raise ManifestError(f"cannot serve {model_dir}: {e}") from e
            if manifest.name in models:
                raise ManifestError(f"two model directories are both named {manifest.name!r}")
            # An output may carry a checkpoint resume token (every state tensor, plus its header): keep room for it.
            reserve = RESPONSE_OVERHEAD + manifest.state_bytes
            # y is served as float32; an output with a dynamic dim is sized by its fixed dims only
            step_bytes = 4 * (manifest.output_elements or max(1, math.prod(d or 1 for d in manifest.output.frame)))
            output_steps = (settings.max_message_bytes - reserve) // step_bytes
            if output_steps < 1:
                raise ManifestError(
                    f"cannot serve {model_dir}: one step's output ({step_bytes} bytes) and a resume "
                    f"token ({reserve} bytes, from the state's size) do not fit max_message_bytes "
                    f"({settings.max_message_bytes}); raise --max-message-bytes or check the manifest's sizes"
                )
            pool = _state_pool(manifest, Path(model_dir), settings, ops)
            engine = Engine(manifest, Path(model_dir), pool, intra_op_threads=settings.intra_op_threads)
            scheduler = Scheduler(
                engine,
                metrics,
                max_batch=min(settings.max_batch, manifest.fixed_batch or settings.max_batch),
                max_wait_us=settings.max_wait_us,
                max_queued=settings.max_queued_steps,
                mode=settings.engine_mode,
                max_batch_steps=settings.max_batch_steps,
                live_sessions=lambda pool=pool: pool.used,
                tracer=(
                    tracing.step_tracer(manifest.name, metrics.step_latency.labels(manifest.name))
                    if tracing is not None
                    else None
                ),
            )
            max_steps = min(settings.max_chunk_steps, output_steps)
            models[manifest.name] = LoadedModel(
                manifest, Path(model_dir), pool, engine, scheduler, output_steps, max_steps
            )
            metrics.state_pool_bytes.labels(model=manifest.name).set(pool.nbytes)
            metrics.state_pool_slots.labels(model=manifest.name, state="used").set(0)
            metrics.state_pool_slots.labels(model=manifest.name, state="free").set(pool.capacity)
            log.info(
                "model loaded",
                extra={"model": manifest.name, "sha256": manifest.sha256, "device": settings.device},
            )
        return cls(models)

    def get(self, name: str) -> LoadedModel:
        model = self._models.get(name)
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFound(f"model {name!r} is not loaded on this server (loaded: {known})")
        return model

    def default_name(self) -> str:
        return next(iter(self._models))

    def __iter__(self) -> Iterator[LoadedModel]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)


def _state_pool(manifest: Manifest, model_dir: Path, settings: Settings, ops: ArrayOps) -> StatePool:
    """The model's state pool, or one line saying why it cannot have one (never a MemoryError's traceback)."""
    need = StatePool.bytes_needed(manifest.states, settings.capacity)
    why = (
        f"cannot serve {model_dir}: its state pool would need {need} bytes (capacity {settings.capacity} × "
        f"{manifest.state_bytes} bytes of state per session)"
    )
    have = _host_memory() if ops.device_type == "cpu" else None
    if have is not None and need > have:
        raise ManifestError(f"{why}, more than this machine's {have} bytes of memory; lower --capacity")
    try:
        return StatePool(manifest.states, settings.capacity, ops)
    except MemoryError as e:  # numpy's, and CuPy's OutOfMemoryError (a MemoryError)
        raise ManifestError(f"{why}, which could not be allocated ({type(e).__name__}); lower --capacity") from None


def _host_memory() -> int | None:
    """Physical memory in bytes, where the OS says (Linux, macOS)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
