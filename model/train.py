"""Train the byte-level LSTM language model with truncated BPTT, carrying h/c across batches.

The training text is cut into ``batch`` contiguous streams (one row each); every step feeds the next
``bptt`` bytes of every stream and carries the (detached) h/c into the next step — the same stateful regime
the server runs. Losses are reported in bits per byte (cross-entropy in nats / ln 2). Writes into ``out``:
``checkpoint.pt`` (state_dict + config + training summary; plain data, loadable with weights_only),
``metrics.json`` and ``training_curve.png``.
"""

from __future__ import annotations

import gzip
import json
import logging
import lzma
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from cellserve.model.data import Corpus, load_corpus
from cellserve.model.model import BYTE_VOCAB, LSTMConfig, LSTMModel, save_checkpoint
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
    cfg: TrainConfig, out: Path | str, *, data_dir: Path | str | None = None, corpus: Corpus | None = None
) -> dict:
    """Run one training job; returns the metrics dict also written to ``out/metrics.json``."""
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
    model = LSTMModel(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rows = streams(train_text, cfg.batch, device)  # [B, N]
    log.info("training %s on %d bytes (%d streams x %d), %d parameters, budget %.2f min, device %s",
             model_cfg, len(train_text), cfg.batch, rows.shape[1], sum(p.numel() for p in model.parameters()),
             cfg.minutes, device)  # fmt: skip

    budget_s = cfg.minutes * 60.0
    history: list[dict[str, float]] = []
    state = model.init_state(cfg.batch)
    pos, step, epoch, seen = 0, 0, 0, 0
    run_loss, run_count = 0.0, 0
    start = time.perf_counter()
    next_eval = min(cfg.eval_every_s, budget_s / 4)
    bar = tqdm(total=round(budget_s), unit="s", desc="train", dynamic_ncols=True, mininterval=1.0)

    def record(elapsed: float) -> dict[str, float]:
        point = {"step": step, "elapsed_s": round(elapsed, 2), "bytes_seen": seen,
                 "train_bpb": run_loss / max(run_count, 1) / LN2, "val_bpb": evaluate_bpb(model, val_text)}  # fmt: skip
        model.train()
        history.append(point)
        bar.set_postfix(step=step, train_bpb=f"{point['train_bpb']:.3f}", val_bpb=f"{point['val_bpb']:.3f}")
        return point

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
        bar.n = min(round(time.perf_counter() - start), bar.total)
        bar.refresh() if step % 20 == 0 else None
        if time.perf_counter() - start >= next_eval:
            record(time.perf_counter() - start)
            run_loss, run_count = 0.0, 0
            next_eval = time.perf_counter() - start + cfg.eval_every_s
    train_s = time.perf_counter() - start
    if run_count or len(history) == 1:
        record(train_s)
    bar.close()

    log.info("scoring %d held-out bytes", len(test_text))
    test_bpb = evaluate_bpb(model, test_text)
    metrics: dict[str, Any] = {
        "config": asdict(cfg),
        "model": asdict(model_cfg),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": step,
        "epochs_completed": epoch,
        "bytes_seen": seen,
        "train_seconds": round(train_s, 1),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "data": corpus.summary(),
        "held_out": {
            "split": "test",
            "bytes": len(test_text),
            "sha256": __import__("hashlib").sha256(test_text).hexdigest(),
            "model_bpb": test_bpb,
            **{f"{k}_bpb": v for k, v in compressor_bpb(test_text).items()},
        },
        "val_bpb": history[-1]["val_bpb"],
        "history": history,
    }
    model.cpu()
    save_checkpoint(model, out / CHECKPOINT_FILE, extra={"training": training_summary(metrics)})
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    plot_curve(history, metrics["held_out"], out / CURVE_FILE)
    log.info("held-out %.3f bits/byte (gzip -9 %.3f, xz -9 %.3f); wrote %s", test_bpb,
             metrics["held_out"]["gzip_9_bpb"], metrics["held_out"]["xz_9_bpb"], out)  # fmt: skip
    return metrics


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
    ax.plot(seen[1:], [p["train_bpb"] for p in history[1:]], label="train (running mean)")
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
