"""Manifests as older releases wrote them: format 1 (our LSTM contract, one role per tensor), which still loads."""

from __future__ import annotations

import json
from typing import Any

from cellserve.model.manifest import FORMAT_1, Manifest


def format1_dict(m: Manifest) -> dict[str, Any]:
    """``m`` (an LSTM-shaped model) as a format-1 ``manifest.json`` would hold it."""
    d = json.loads(m.to_json())
    for key in ("input", "output", "states", "consts", "fixed_batch", "lstm"):
        d.pop(key, None)
    d.update(
        format=FORMAT_1,
        input_kind=m.input_kind,
        input_size=m.input_size,
        output_size=m.output_size,
        layers=m.layers,
        hidden=m.hidden,
        inputs=[{"name": t.name, "role": t.role, "dtype": t.dtype, "shape": t.shape} for t in m.inputs],
        outputs=[{"name": t.name, "role": t.role, "dtype": t.dtype, "shape": t.shape} for t in m.outputs],
    )
    return d
