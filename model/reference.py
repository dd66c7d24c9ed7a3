"""The oracle: a numpy float64 LSTM implementing exactly the equations below, the standard LSTM cell.

For each layer and time step, with ``[h, x]`` the concatenation of the previous hidden state and the input
(σ the logistic sigmoid, ``*`` the element-wise product)::

    f  = σ(W_f·[h, x] + b_f)        forget gate: what to throw away from the cell state
    i  = σ(W_i·[h, x] + b_i)        input gate: which values to update
    C̃  = tanh(W_C·[h, x] + b_C)     candidate values
    C  = f * C + i * C̃              cell-state update
    o  = σ(W_o·[h, x] + b_o)        output gate
    h  = o * tanh(C)

Layer ``l > 0`` takes layer ``l-1``'s ``h`` as its ``x``. The input is first projected (token embedding row,
or ``A·x + a`` for feature models) and the top ``h`` goes through the head ``W_y·h + b_y``.

**PyTorch's packed layout**, mapped explicitly in :func:`layer_from_torch`: ``nn.LSTM`` stores
``weight_ih_l{k}`` [4H, I], ``weight_hh_l{k}`` [4H, H], ``bias_ih_l{k}`` and ``bias_hh_l{k}`` [4H], each
the four gates stacked in the order **(i, f, g, o)** — input gate, forget gate, candidate ("g" = C̃), output
gate. So rows ``[0:H]`` are i, ``[H:2H]`` f, ``[2H:3H]`` C̃, ``[3H:4H]`` o; ``W_gate = [W_hh | W_ih]`` (h
first, as in ``[h, x]``) and ``b_gate = b_ih + b_hh``.

No torch at module level: the server imports this module without torch installed; ``from_torch`` and
``from_checkpoint`` import torch lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# The order in which nn.LSTM packs its gates along the 4H axis.
TORCH_GATE_ORDER = ("i", "f", "g", "o")


def sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) = 1 / (1 + e^-z), computed without overflow for large |z|."""
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


@dataclass(frozen=True)
class LayerWeights:
    """One LSTM layer in the notation above: each ``W_*`` is [H, H + I] acting on ``[h, x]``, each ``b_*`` [H]."""

    W_f: np.ndarray
    W_i: np.ndarray
    W_C: np.ndarray
    W_o: np.ndarray
    b_f: np.ndarray
    b_i: np.ndarray
    b_C: np.ndarray
    b_o: np.ndarray

    @property
    def hidden(self) -> int:
        return int(self.W_f.shape[0])


def cell_step(layer: LayerWeights, x: np.ndarray, h: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One time step of one layer: x [B, I], h and c [B, H] -> (h', c') [B, H]. The equations above, verbatim."""
    hx = np.concatenate([h, x], axis=1)  # [B, H + I]
    f = sigmoid(hx @ layer.W_f.T + layer.b_f)  # [B, H]
    i = sigmoid(hx @ layer.W_i.T + layer.b_i)  # [B, H]
    c_tilde = np.tanh(hx @ layer.W_C.T + layer.b_C)  # [B, H]
    c_new = f * c + i * c_tilde  # [B, H]
    o = sigmoid(hx @ layer.W_o.T + layer.b_o)  # [B, H]
    h_new = o * np.tanh(c_new)  # [B, H]
    return h_new, c_new


def run_layers(
    layers: list[LayerWeights], e: np.ndarray, h0: np.ndarray, c0: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run the stack over time: e [B, T, E], h0/c0 [L, B, H] -> (top h [B, T, H], hn [L, B, H], cn [L, B, H])."""
    h = [h0[k] for k in range(len(layers))]  # L x [B, H]
    c = [c0[k] for k in range(len(layers))]  # L x [B, H]
    batch, steps = e.shape[0], e.shape[1]
    top = np.empty((batch, steps, layers[-1].hidden), dtype=np.float64)  # [B, T, H]
    for t in range(steps):
        inp = e[:, t, :]  # [B, E]
        for k, layer in enumerate(layers):
            h[k], c[k] = cell_step(layer, inp, h[k], c[k])  # [B, H] each
            inp = h[k]  # the next layer's x: [B, H]
        top[:, t, :] = inp
    return top, np.stack(h), np.stack(c)  # [B, T, H], [L, B, H], [L, B, H]


def layer_from_torch(sd: dict[str, np.ndarray], k: int) -> LayerWeights:
    """Unpack layer ``k`` of an nn.LSTM state dict (arrays, keys without the ``lstm.`` prefix).

    nn.LSTM packs gates as (i, f, g, o) along axis 0; the equations write W·[h, x], so the hidden-to-hidden
    block comes first in each gate's matrix.
    """
    w_ih = sd[f"weight_ih_l{k}"]  # [4H, I]
    w_hh = sd[f"weight_hh_l{k}"]  # [4H, H]
    b = sd[f"bias_ih_l{k}"] + sd[f"bias_hh_l{k}"]  # [4H]
    hidden = w_hh.shape[1]
    w = np.concatenate([w_hh, w_ih], axis=1)  # [4H, H + I]
    gate = {name: slice(n * hidden, (n + 1) * hidden) for n, name in enumerate(TORCH_GATE_ORDER)}
    return LayerWeights(
        W_f=w[gate["f"]], W_i=w[gate["i"]], W_C=w[gate["g"]], W_o=w[gate["o"]],
        b_f=b[gate["f"]], b_i=b[gate["i"]], b_C=b[gate["g"]], b_o=b[gate["o"]],
    )  # fmt: skip


class ReferenceLSTM:
    """The whole model in numpy float64: input projection → LSTM layers → head."""

    def __init__(self, config: dict[str, Any], state_dict: dict[str, np.ndarray]) -> None:
        sd = {k: np.asarray(v, dtype=np.float64) for k, v in state_dict.items()}
        self.config = dict(config)
        self.input_kind: str = config["input_kind"]
        self.input_size = int(config["input_size"])
        self.output_size = int(config["output_size"])
        self.num_layers = int(config["layers"])
        self.hidden = int(config["hidden"])
        if self.input_kind == "tokens":
            self.embedding = sd["encoder.weight"]  # [V, E]
        else:
            self.proj_w = sd["encoder.weight"]  # [E, I]
            self.proj_b = sd["encoder.bias"]  # [E]
        lstm = {k.removeprefix("lstm."): v for k, v in sd.items() if k.startswith("lstm.")}
        self.layers = [layer_from_torch(lstm, k) for k in range(self.num_layers)]
        self.head_w = sd["head.weight"]  # [O, H]
        self.head_b = sd["head.bias"]  # [O]

    @classmethod
    def from_torch(cls, module: Any) -> ReferenceLSTM:
        """Copy the weights of a ``cellserve.model.model.LSTMModel`` (any dtype/device) as float64."""
        from dataclasses import asdict

        sd = {k: v.detach().cpu().double().numpy() for k, v in module.state_dict().items()}
        return cls(asdict(module.cfg), sd)

    @classmethod
    def from_checkpoint(cls, path: Path | str) -> ReferenceLSTM:
        """Load a training/export checkpoint (``torch.load(weights_only=True)``; torch imported lazily)."""
        import torch

        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
        sd = {k: v.double().numpy() for k, v in payload["state_dict"].items()}
        return cls(payload["config"], sd)

    def init_state(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """Zero (h, c), each [L, B, H] float64."""
        shape = (self.num_layers, batch, self.hidden)  # [L, B, H]
        return np.zeros(shape), np.zeros(shape)

    def encode(self, x: np.ndarray) -> np.ndarray:
        """x [B, T] int tokens or [B, T, I] floats -> e [B, T, E] float64."""
        x = np.asarray(x)
        if self.input_kind == "tokens":
            if x.ndim != 2 or not np.issubdtype(x.dtype, np.integer):
                raise ValueError(f"token model expects integer x [B, T], got {x.dtype} {list(x.shape)}")
            if x.size and (x.min() < 0 or x.max() >= self.input_size):
                raise ValueError(f"tokens must be in [0, {self.input_size})")
            return self.embedding[x]  # [B, T, E]
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise ValueError(f"feature model expects x [B, T, {self.input_size}], got {list(x.shape)}")
        return x.astype(np.float64) @ self.proj_w.T + self.proj_b  # [B, T, E]

    def sequence(self, x: np.ndarray | list[int]) -> np.ndarray:
        """y [T, O] of one sequence x ([T] tokens or [T, I] features) from the zero state."""
        a = np.asarray(x)
        return self.run((a.astype(np.int64) if self.input_kind == "tokens" else a)[None])[0][0]

    def run(
        self, x: np.ndarray, h0: np.ndarray | None = None, c0: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """x [B, T] or [B, T, I]; h0, c0 [L, B, H] (zeros if None) -> (y [B, T, O], hn [L, B, H], cn [L, B, H])."""
        e = self.encode(x)  # [B, T, E]
        if h0 is None or c0 is None:
            h0, c0 = self.init_state(e.shape[0])
        h0 = np.asarray(h0, dtype=np.float64)
        c0 = np.asarray(c0, dtype=np.float64)
        expected = (self.num_layers, e.shape[0], self.hidden)
        if h0.shape != expected or c0.shape != expected:
            raise ValueError(f"h0/c0 must be {list(expected)}, got {list(h0.shape)} and {list(c0.shape)}")
        top, hn, cn = run_layers(self.layers, e, h0, c0)  # [B, T, H], [L, B, H], [L, B, H]
        y = top @ self.head_w.T + self.head_b  # [B, T, O]
        return y, hn, cn
