"""The numpy oracle for a model directory that has no checkpoint: its weights read from the ONNX graph.

The shipped model (model/default, /models/default in the image) is the ONNX file and its manifest only, so
``ReferenceLSTM.from_checkpoint`` has nothing to load. The export (torch.onnx of ``LSTMModel``) leaves every
weight as an initializer in a fixed pattern, read back here into nn.LSTM's state-dict names:

- ``Gather(encoder.weight [V, E], x)`` — the token embedding (token models);
- one ONNX ``LSTM`` node per layer, in order: ``W`` [1, 4H, I], ``R`` [1, 4H, H], ``B`` [1, 8H] (``Wb`` then
  ``Rb``), gates stacked **(i, o, f, c)** (ONNX) where nn.LSTM stacks **(i, f, g, o)**;
- ``MatMul(h, head.weight.T [H, O])`` then ``Add(·, head.bias [O])`` — the head.

``test_image.test_onnx_oracle_is_the_checkpoint_oracle`` proves the mapping on a model exported with its
checkpoint, so the image's check against the shipped model compares with the same oracle the other tests use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cellserve.model.manifest import load_manifest
from cellserve.model.reference import ReferenceLSTM

# Rows of ONNX's (i, o, f, c) blocks, taken in nn.LSTM's order (i, f, g=c, o).
ONNX_TO_TORCH_GATES = (0, 2, 3, 1)


def _torch_gates(a: np.ndarray, hidden: int) -> np.ndarray:
    """[4H, ...] in ONNX gate order -> the same rows in nn.LSTM's order."""
    return np.concatenate([a[g * hidden : (g + 1) * hidden] for g in ONNX_TO_TORCH_GATES])


def reference_from_onnx(model_dir: Path) -> ReferenceLSTM:
    """The oracle (float64) of ``model_dir``'s manifest.json + ONNX file, from the graph's initializers."""
    import onnx
    from onnx import numpy_helper

    m = load_manifest(model_dir)
    if m.input_kind != "tokens":
        raise NotImplementedError("only token models: feature models' projection is not mapped here")
    graph = onnx.load(str(model_dir / m.onnx_file)).graph
    init = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    hidden = m.hidden
    sd: dict[str, np.ndarray] = {}

    (gather,) = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in init]
    sd["encoder.weight"] = init[gather.input[0]]  # [V, E]
    lstms = [n for n in graph.node if n.op_type == "LSTM"]
    assert len(lstms) == m.layers, f"{len(lstms)} LSTM nodes for {m.layers} layers"
    for k, node in enumerate(lstms):
        w, r, b = (init[name][0] for name in node.input[1:4])  # [4H, I], [4H, H], [8H]
        sd[f"lstm.weight_ih_l{k}"] = _torch_gates(w, hidden)
        sd[f"lstm.weight_hh_l{k}"] = _torch_gates(r, hidden)
        sd[f"lstm.bias_ih_l{k}"] = _torch_gates(b[: 4 * hidden], hidden)
        sd[f"lstm.bias_hh_l{k}"] = _torch_gates(b[4 * hidden :], hidden)
    (matmul,) = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in init]
    sd["head.weight"] = init[matmul.input[1]].T  # [O, H]
    (add,) = [n for n in graph.node if n.op_type == "Add" and matmul.output[0] in n.input]
    (bias,) = [name for name in add.input if name in init]
    sd["head.bias"] = init[bias]  # [O]
    config = {k: getattr(m, k) for k in ("input_kind", "input_size", "output_size", "layers", "hidden")}
    return ReferenceLSTM(config, sd)
