"""A hand-edited manifest cannot reach outside its directory or size the server absurdly: one line, at load.

Also resume tokens: a forged key id is never echoed back to the client.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from manifest_helpers import format1_dict

from cellserve.model.manifest import MANIFEST_FILE, Manifest, ManifestError, load_manifest
from cellserve.server.errors import CellserveError
from cellserve.server.resume_state import ResumeState
from cellserve.server.resume_token import MAGIC, TokenCodec, TokenKeys


def _model_dir(src: Path, dst: Path, **edits: Any) -> Path:
    """A copy of the model at ``src`` in ``dst`` whose manifest has ``edits`` (the ONNX file is untouched)."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "model.onnx").write_bytes((src / "model.onnx").read_bytes())
    d = format1_dict(load_manifest(src))  # the edits name format-1 fields
    d.update(edits)
    (dst / MANIFEST_FILE).write_text(json.dumps(d))
    return dst


def _serve_error(model_dir: Path, tmp_path: Path, *args: str) -> list[str]:
    """``cellserve serve`` on ``model_dir``, which must exit 1 before serving; its stderr lines."""
    ready = tmp_path / "ready.json"
    argv = [sys.executable, "-m", "cellserve.server.cli", "serve", "--model-dirs", str(model_dir), "--host",
            "127.0.0.1", "--port", "0", "--metrics-port", "0", "--ready-file", str(ready), *args]  # fmt: skip
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    try:
        while proc.poll() is None:
            assert not ready.exists(), "the server started serving this model"
            assert time.monotonic() < deadline, "the server neither failed nor started within 90 s"
            try:
                proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
        assert proc.stderr is not None
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == 1, err
    return err.strip().splitlines()


def _manifest(tiny_model: Any, **edits: Any) -> dict[str, Any]:
    d = format1_dict(tiny_model.manifest)
    d.update(edits)
    return d


# -- sizes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edits", "field"),
    [
        ({"layers": 10**9}, "layers"),
        ({"hidden": 10**12}, "hidden"),
        ({"input_size": 2**40}, "input_size"),
        ({"output_size": 2**40}, "output_size"),
        ({"layers": 1024, "hidden": 2**20}, "layers × hidden"),
        ({"layers": True}, "layers"),
        ({"hidden": "32"}, "hidden"),
        ({"layers": 2.0}, "layers"),
    ],
)
def test_absurd_or_mistyped_manifest_sizes_are_refused_naming_the_field_and_the_bound(tiny_model, edits, field):
    with pytest.raises(ManifestError, match=field) as e:
        Manifest.from_dict(_manifest(tiny_model, **edits))
    message = str(e.value)
    assert "\n" not in message and ("at most" in message or "1.." in message), message


def test_serve_with_absurd_layers_fails_in_one_line(tiny_model_dir, tmp_path):
    model_dir = _model_dir(tiny_model_dir, tmp_path / "huge", layers=10**9)
    lines = _serve_error(model_dir, tmp_path)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"cellserve serve: error: cannot serve {model_dir}: manifest field layers"), lines


def test_serve_whose_state_pool_cannot_fit_fails_in_one_line_saying_how_big(tiny_model_dir, tmp_path):
    # 4 × 65536 is a fine model; 10 million slots of it is 20 TB of h and c
    model_dir = _model_dir(tiny_model_dir, tmp_path / "wide", layers=4, hidden=65536)
    lines = _serve_error(model_dir, tmp_path, "--capacity", str(10**7))
    assert len(lines) == 1, lines
    assert f"cannot serve {model_dir}: its state pool would need {2 * 4 * 10**7 * 65536 * 4} bytes" in lines[0]
    assert "--capacity" in lines[0]


def test_serve_whose_step_output_cannot_fit_a_message_fails_in_one_line(tiny_model_dir, tmp_path):
    model_dir = _model_dir(tiny_model_dir, tmp_path / "wide-out", output_size=2**22)
    lines = _serve_error(model_dir, tmp_path)
    assert len(lines) == 1, lines
    assert f"cannot serve {model_dir}: one step's output" in lines[0] and "max_message_bytes" in lines[0]


# -- onnx_file -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_onnx_file_outside_the_model_directory_is_refused(tiny_model_dir, tmp_path, how):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.onnx").write_bytes((tiny_model_dir / "model.onnx").read_bytes())  # same sha256: only the place
    model_dir = _model_dir(tiny_model_dir, tmp_path / "m")
    if how == "symlink":
        (model_dir / "model.onnx").unlink()
        (model_dir / "model.onnx").symlink_to(outside / "x.onnx")
    else:
        onnx_file = "../elsewhere/x.onnx" if how == "dotdot" else str(outside / "x.onnx")
        _model_dir(tiny_model_dir, model_dir, onnx_file=onnx_file)
    with pytest.raises(ManifestError, match="onnx_file") as e:
        load_manifest(model_dir)
    assert "\n" not in str(e.value)


def test_serve_with_onnx_file_outside_fails_in_one_line_naming_directory_and_field(tiny_model_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.onnx").write_bytes((tiny_model_dir / "model.onnx").read_bytes())
    model_dir = _model_dir(tiny_model_dir, tmp_path / "m", onnx_file="../elsewhere/x.onnx")
    lines = _serve_error(model_dir, tmp_path)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"cellserve serve: error: cannot serve {model_dir}: manifest field onnx_file"), lines


def test_onnx_file_in_a_subdirectory_is_still_served(tiny_model_dir, tmp_path):
    model_dir = _model_dir(tiny_model_dir, tmp_path / "m", onnx_file="graph/model.onnx")
    (model_dir / "graph").mkdir()
    (model_dir / "model.onnx").rename(model_dir / "graph" / "model.onnx")
    assert load_manifest(model_dir).onnx_file == "graph/model.onnx"


# -- resume tokens ----------------------------------------------------------------------------------------

PAYLOAD = b"PAYLOAD-FROM-THE-TOKEN"
KEYS = TokenKeys({"main": b"k" * 32}, "main")


def _state() -> ResumeState:
    zeros = np.zeros((2, 4), np.float32)
    return ResumeState("tiny", "ab" * 32, 3, (zeros, zeros), ("h0", "c0"))


def _decode_error(token: bytes) -> CellserveError:
    with pytest.raises(CellserveError) as e:
        TokenCodec(KEYS, ttl_s=60).decode(token, model="tiny", model_sha256="ab" * 32, now_ms=1_000)
    return e.value


@pytest.mark.parametrize("kid_len", [200, 255, len(PAYLOAD)])
def test_a_forged_key_id_length_never_echoes_token_bytes(kid_len):
    token = MAGIC + bytes((1, kid_len)) + PAYLOAD * 12 + bytes(32)  # version 1, then the forged length
    error = _decode_error(token)
    assert error.code.name in ("INVALID_ARGUMENT", "UNAUTHENTICATED")
    assert b"PAYLOAD" not in error.message.encode() and "PAYLOAD" not in error.message, error.message
    assert len(error.message) < 200, error.message


def test_a_non_ascii_key_id_is_malformed_and_not_echoed():
    token = MAGIC + bytes((1, 8)) + b"\xffsecret!" + PAYLOAD * 4 + bytes(32)
    error = _decode_error(token)
    assert error.code.name == "INVALID_ARGUMENT" and "secret" not in error.message, error.message


def test_an_unknown_key_id_is_named_by_a_digest_an_operator_can_compare():
    other = TokenCodec(TokenKeys({"old-key": b"o" * 32}, "old-key"), ttl_s=60)
    error = _decode_error(other.encode(_state(), now_ms=0)[0])
    assert error.code.name == "UNAUTHENTICATED"
    assert hashlib.sha256(b"old-key").hexdigest()[:12] in error.message and "old-key" not in error.message
