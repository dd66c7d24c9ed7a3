"""Train the byte-level LSTM language model with truncated BPTT, carrying h/c across batches.

The training text is cut into ``batch`` contiguous streams (one row each); every step feeds the next
``bptt`` bytes of every stream and carries the (detached) h/c into the next step — the same stateful regime
the server runs. Losses are reported in bits per byte (cross-entropy in nats / ln 2). Writes into ``out``:
``checkpoint.pt`` (state_dict + config + training summary; plain data, loadable with weights_only),
``metrics.json`` and ``training_curve.png``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import lzma
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cellserve.model.data import Corpus, load_corpus
from cellserve.model.model import BYTE_VOCAB, LSTMConfig, LSTMModel, load_checkpoint, save_checkpoint
from cellserve.model.train_config import TrainConfig

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CURVE_FILE = "training_curve.png"


def streams(data: bytes, batch: int, device: torch.device) -> torch.Tensor:
    """Cut ``data`` into ``batch`` contiguous rows: [B, N // B] int64 (the tail that does not fit is dropped)."""
    arr = np.frombuffer(data, dtype=np.uint8)  # [N]
    per = len(arr) // batch
    return torch.from_numpy(arr[: per * batch].astype(np.int64)).view(batch, per).to(device)  # [B, N // B]


@torch.no_grad()
def evaluate_bpb(model: LSTMModel, data: bytes, *, batch: int = 16, bptt: int = 256) -> float:
    """Bits per byte of ``data`` under ``model``, scored statefully: ``batch`` contiguous streams, h/c carried.

    Every byte except each stream's first is predicted from everything before it in its stream.
    """
    model.eval()
    device = next(model.parameters()).device
    batch = max(1, min(batch, len(data) // 2))
    rows = streams(data, batch, device)  # [B, N]
    if rows.shape[1] < 2:
        raise ValueError(f"need at least {2 * batch} bytes to evaluate, got {len(data)}")
    state = model.init_state(batch)
    total, count = 0.0, 0
    for i in range(0, rows.shape[1] - 1, bptt):
        x = rows[:, i : i + bptt]  # [B, T]
        y = rows[:, i + 1 : i + 1 + bptt]  # [B, T']
        logits, state = model(x[:, : y.shape[1]], state)  # [B, T', V]
        total += nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        ).item()
        count += y.numel()
    return total / count / LN2


def compressor_bpb(data: bytes) -> dict[str, float]:
    """Bits per byte of ``gzip -9`` and ``xz -9`` (Python's gzip/lzma at those presets) on ``data``."""
    n = len(data)
    return {"gzip_9": len(gzip.compress(data, 9)) * 8 / n, "xz_9": len(lzma.compress(data, preset=9)) * 8 / n}


def _lr_at(cfg: TrainConfig, progress: float, step: int) -> float:
    """Linear warm-up over 100 steps, then cosine decay to 10% as ``progress`` (0..1 of the budget) runs out."""
    warm = min(1.0, (step + 1) / 100)
    return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    cfg: TrainConfig,
    out: Path | str,
    *,
    data_dir: Path | str | None = None,
    corpus: Corpus | None = None,
    init_from: Path | str | None = None,
) -> dict:
    """Run one training job; returns the metrics dict also written to ``out/metrics.json``.

    ``init_from``: continue from a checkpoint written by this function (same architecture flags). With its
    ``metrics.json`` beside it and the same train text and ``batch``, the streams continue where that run
    stopped, and the step/bytes counters and curve carry on; the optimiser restarts (warm-up, new schedule).
    """
    cfg.validate()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device cuda was asked for but torch {torch.__version__} sees no CUDA device; use --device cpu"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus or load_corpus(data_dir)
    train_text = corpus.text["train"][: cfg.max_train_bytes or None]
    if len(train_text) < cfg.batch * (cfg.bptt + 1):
        raise ValueError(f"train split has {len(train_text)} bytes; --batch {cfg.batch} x --bptt {cfg.bptt} needs at "
                         f"least {cfg.batch * (cfg.bptt + 1)}")  # fmt: skip
    val_text = corpus.text["val"][: cfg.val_bytes]
    test_text = corpus.text["test"][: cfg.test_bytes or None]

    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device(cfg.device)
    model_cfg = LSTMConfig("tokens", BYTE_VOCAB, BYTE_VOCAB, cfg.layers, cfg.hidden, cfg.embed)
    model = LSTMModel(model_cfg)
    rows = streams(train_text, cfg.batch, device)  # [B, N]
    prev = _Previous()
    if init_from is not None:
        prev = _load_previous(Path(init_from), model, cfg, hashlib.sha256(train_text).hexdigest(), rows.shape[1])
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    log.info("training %s on %d bytes (%d streams x %d), %d parameters, budget %.2f min, device %s",
             model_cfg, len(train_text), cfg.batch, rows.shape[1], sum(p.numel() for p in model.parameters()),
             cfg.minutes, device)  # fmt: skip

    budget_s = cfg.minutes * 60.0
    history: list[dict[str, float | None]] = list(prev.history)
    state = model.init_state(cfg.batch)
    pos, step, epoch, seen = prev.pos, 0, prev.epoch, 0
    run_loss, run_count = 0.0, 0
    start = time.perf_counter()
    next_eval = min(cfg.eval_every_s, budget_s / 4)
    bar = tqdm(total=round(budget_s), unit="s", desc="train", dynamic_ncols=True, mininterval=1.0)

    def record(elapsed: float) -> dict[str, float | None]:
        train_bpb = run_loss / run_count / LN2 if run_count else None
        point = {"step": prev.steps + step, "elapsed_s": round(prev.seconds + elapsed, 2),
                 "bytes_seen": prev.bytes_seen + seen, "train_bpb": train_bpb,
                 "val_bpb": evaluate_bpb(model, val_text)}  # fmt: skip
        model.train()
        history.append(point)
        bar.set_postfix(step=step, train_bpb=f"{train_bpb or 0:.3f}", val_bpb=f"{point['val_bpb']:.3f}")
        return point

    def so_far(elapsed: float) -> dict[str, Any]:
        """The run so far as plain data (metrics.json without the held-out score)."""
        return {
            "config": asdict(cfg),
            "model": asdict(model_cfg),
            "parameters": sum(p.numel() for p in model.parameters()),
            "steps": prev.steps + step,
            "epochs_completed": epoch,
            "bytes_seen": prev.bytes_seen + seen,
            "train_seconds": round(prev.seconds + elapsed, 1),
            "this_run": {
                "steps": step,
                "bytes_seen": seen,
                "train_seconds": round(elapsed, 1),
                "init_from": str(init_from) if init_from else None,
            },
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "data": corpus.summary(),
            "val_bpb": history[-1]["val_bpb"],
            "history": history,
        }

    first = record(0.0)
    log.info("initial val %.3f bits/byte", first["val_bpb"])
    model.train()
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s or (cfg.max_steps and step >= cfg.max_steps):
            break
        if pos + 2 > rows.shape[1]:  # end of the stream: a new epoch starts from zero state
            pos, epoch = 0, epoch + 1
            state = model.init_state(cfg.batch)
        x = rows[:, pos : pos + cfg.bptt]  # [B, T]
        y = rows[:, pos + 1 : pos + 1 + cfg.bptt]  # [B, T']
        x = x[:, : y.shape[1]]  # [B, T']
        progress = max(elapsed / budget_s, step / cfg.max_steps if cfg.max_steps else 0.0)
        for group in opt.param_groups:
            group["lr"] = _lr_at(cfg, progress, step)
        state = (state[0].detach(), state[1].detach())  # truncate the graph, keep the values
        logits, state = model(x, state)  # [B, T', V]
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training diverged at step {step} (loss {loss.item()}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        run_loss += loss.item() * y.numel()
        run_count += y.numel()
        seen += y.numel()
        pos += y.shape[1]
        step += 1
        if step % 20 == 0:
            bar.n = min(round(time.perf_counter() - start), bar.total)
            bar.set_postfix(step=step, batch_bpb=f"{loss.item() / LN2:.3f}", val_bpb=f"{history[-1]['val_bpb']:.3f}")
        if time.perf_counter() - start >= next_eval:
            record(time.perf_counter() - start)
            run_loss, run_count = 0.0, 0
            # a resumable snapshot (weights + progress) so a cut-off run can go on with --init-from
            _write_snapshot(model, so_far(time.perf_counter() - start), out)
            next_eval = time.perf_counter() - start + cfg.eval_every_s
    train_s = time.perf_counter() - start
    if run_count or len(history) == len(prev.history) + 1:
        record(train_s)
    bar.close()

    log.info("scoring %d held-out bytes", len(test_text))
    test_bpb = evaluate_bpb(model, test_text)
    metrics = so_far(train_s)
    metrics["held_out"] = {
        "split": "test",
        "bytes": len(test_text),
        "sha256": hashlib.sha256(test_text).hexdigest(),
        "model_bpb": test_bpb,
        **{f"{k}_bpb": v for k, v in compressor_bpb(test_text).items()},
    }
    model.cpu()
    save_checkpoint(model, out / CHECKPOINT_FILE, extra={"training": training_summary(metrics)})
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    plot_curve(history, metrics["held_out"], out / CURVE_FILE)
    log.info("held-out %.3f bits/byte (gzip -9 %.3f, xz -9 %.3f); wrote %s", test_bpb,
             metrics["held_out"]["gzip_9_bpb"], metrics["held_out"]["xz_9_bpb"], out)  # fmt: skip
    return metrics


def _write_snapshot(model: LSTMModel, metrics: dict[str, Any], out: Path) -> None:
    """Checkpoint + metrics.json of a run in progress, each replaced atomically."""
    tmp = out / (CHECKPOINT_FILE + ".tmp")
    save_checkpoint(model, tmp)
    os.replace(tmp, out / CHECKPOINT_FILE)
    tmp = out / (METRICS_FILE + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, out / METRICS_FILE)


@dataclass
class _Previous:
    """Where an earlier run (``init_from``) stopped: counters, stream position and curve."""

    steps: int = 0
    bytes_seen: int = 0
    seconds: float = 0.0
    pos: int = 0
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def _load_previous(path: Path, model: LSTMModel, cfg: TrainConfig, train_sha256: str, per_stream: int) -> _Previous:
    """Load ``path``'s weights into ``model``; recover the run's position from the ``metrics.json`` beside it."""
    old, _ = load_checkpoint(path)
    if old.cfg != model.cfg:
        raise ValueError(f"--init-from {path} holds a model {old.cfg}; the flags ask for {model.cfg}")
    model.load_state_dict(old.state_dict())
    metrics_path = path.parent / METRICS_FILE
    if not metrics_path.is_file():
        log.warning(
            "no %s beside %s: continuing from its weights only, at the start of the streams", METRICS_FILE, path
        )
        return _Previous()
    m = json.loads(metrics_path.read_text())
    prev = _Previous(m["steps"], m["bytes_seen"], m["train_seconds"], history=m["history"])
    same_text = m["data"]["splits"]["train"]["sha256"] == train_sha256 and not m["config"]["max_train_bytes"]
    if same_text and m["config"]["batch"] == cfg.batch:
        consumed = prev.bytes_seen // cfg.batch  # bytes each stream has been trained on
        prev.epoch, prev.pos = divmod(consumed, per_stream - 1)
    else:
        log.warning("%s trained on other text or --batch: its streams restart from the beginning", path)
    log.info("continuing from %s: step %d, %d bytes seen, stream position %d (epoch %d)", path, prev.steps,
             prev.bytes_seen, prev.pos, prev.epoch)  # fmt: skip
    return prev


def training_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a manifest records about training: data hashes, held-out bits/byte, budget (plain data only)."""
    return {
        "data": {s: dict(v) for s, v in metrics["data"]["splits"].items()},
        "held_out_bpb": metrics["held_out"]["model_bpb"],
        "held_out_bytes": metrics["held_out"]["bytes"],
        "held_out_gzip_9_bpb": metrics["held_out"]["gzip_9_bpb"],
        "held_out_xz_9_bpb": metrics["held_out"]["xz_9_bpb"],
        "val_bpb": metrics["val_bpb"],
        "steps": metrics["steps"],
        "bytes_seen": metrics["bytes_seen"],
        "train_seconds": metrics["train_seconds"],
        "device": metrics["device"],
        "seed": metrics["config"]["seed"],
    }


def plot_curve(history: list[dict[str, float]], held_out: dict[str, Any], path: Path) -> None:
    """Train/val bits per byte against bytes seen, with the held-out compressor baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    seen = [p["bytes_seen"] / 1e6 for p in history]
    trained = [(x, p["train_bpb"]) for x, p in zip(seen, history, strict=True) if p["train_bpb"] is not None]
    ax.plot([x for x, _ in trained], [b for _, b in trained], label="train (running mean since last point)")
    ax.plot(seen, [p["val_bpb"] for p in history], marker="o", ms=3, label="validation")
    ax.axhline(
        held_out["gzip_9_bpb"], color="grey", ls="--", label=f"gzip -9 on held-out ({held_out['gzip_9_bpb']:.2f})"
    )
    ax.axhline(held_out["xz_9_bpb"], color="grey", ls=":", label=f"xz -9 on held-out ({held_out['xz_9_bpb']:.2f})")
    ax.set_xlabel("training bytes seen (millions)")
    ax.set_ylabel("bits per byte")
    ax.set_ylim(0, min(8.5, max(p["val_bpb"] for p in history) + 0.5))
    ax.set_title(f"held-out: {held_out['model_bpb']:.3f} bits/byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
