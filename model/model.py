"""The torch LSTM: input projection (token embedding or linear) → nn.LSTM (L layers, H hidden) → head.

The config is a frozen dataclass stored *inside* the checkpoint as a plain dict next to the
``state_dict``; a checkpoint is loaded with ``torch.load(weights_only=True)`` only — never a pickled module.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

InputKind = Literal["tokens", "features"]
BYTE_VOCAB = 256  # byte-level language model: any UTF-8 text is a sequence of tokens in [0, 256)


@dataclass(frozen=True)
class LSTMConfig:
    """Shape of an :class:`LSTMModel`. ``input_size`` is the vocabulary (tokens) or feature width (features)."""

    input_kind: InputKind = "tokens"
    input_size: int = BYTE_VOCAB
    output_size: int = BYTE_VOCAB
    layers: int = 2
    hidden: int = 256
    embed: int = 64  # width of the input projection: token embedding, or Linear map of the features

    def __post_init__(self) -> None:
        if self.input_kind not in ("tokens", "features"):
            raise ValueError(f"input_kind must be 'tokens' or 'features', got {self.input_kind!r}")
        for key in ("input_size", "output_size", "layers", "hidden", "embed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LSTMConfig.{key} must be a positive integer, got {value!r}")


State = tuple[torch.Tensor, torch.Tensor]


class LSTMModel(nn.Module):
    """``forward(x, (h0, c0)) -> (y, (hn, cn))``; x is [B, T] int64 tokens or [B, T, I] float features.

    Both kinds project the input to ``embed`` wide vectors first (Embedding for tokens, Linear for features).
    """

    def __init__(self, cfg: LSTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        if cfg.input_kind == "tokens":
            self.encoder: nn.Module = nn.Embedding(cfg.input_size, cfg.embed)
        else:
            self.encoder = nn.Linear(cfg.input_size, cfg.embed)
        self.lstm = nn.LSTM(cfg.embed, cfg.hidden, num_layers=cfg.layers, batch_first=True)
        self.head = nn.Linear(cfg.hidden, cfg.output_size)

    def init_state(self, batch: int) -> State:
        """Zero h and c, each [L, B, H], on the model's device and dtype."""
        p = self.head.weight
        shape = (self.cfg.layers, batch, self.cfg.hidden)  # [L, B, H]
        return torch.zeros(shape, dtype=p.dtype, device=p.device), torch.zeros(shape, dtype=p.dtype, device=p.device)

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        h0, c0 = state  # [L, B, H] each
        e = self.encoder(x)  # [B, T] or [B, T, I] -> [B, T, E]
        out, (hn, cn) = self.lstm(e, (h0, c0))  # out [B, T, H]; hn, cn [L, B, H]
        y = self.head(out)  # [B, T, O]
        return y, (hn, cn)


def save_checkpoint(model: LSTMModel, path: Path | str, extra: dict[str, Any] | None = None) -> None:
    """Write ``{"state_dict", "config", **extra}`` — tensors and plain data only, loadable with weights_only."""
    payload: dict[str, Any] = {"state_dict": model.state_dict(), "config": asdict(model.cfg)}
    if extra:
        payload.update(extra)
    torch.save(payload, Path(path))


def load_checkpoint(path: Path | str, map_location: str = "cpu") -> tuple[LSTMModel, dict[str, Any]]:
    """Rebuild an :class:`LSTMModel` from a checkpoint (``weights_only=True``); returns (model, payload)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or "state_dict" not in payload or "config" not in payload:
        raise ValueError(f"{path} is not a cellserve checkpoint (expected keys 'state_dict' and 'config')")
    model = LSTMModel(LSTMConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload
