"""manifest.json: round trip, validation, and refusal of files that do not match it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from manifest_helpers import format1_dict

from cellserve.model.manifest import FORMAT_1, MANIFEST_FILE, Manifest, ManifestError, load_manifest, save_manifest


def _copy(src: Path, dst: Path) -> Path:
    for name in ("model.onnx", MANIFEST_FILE):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_manifest_round_trips_through_json(tiny_model) -> None:
    m = tiny_model.manifest
    assert Manifest.from_dict(json.loads(m.to_json())) == m
    assert load_manifest(tiny_model.dir) == m


def test_saved_manifest_is_reloaded_identically(tiny_model, tmp_path: Path) -> None:
    _copy(tiny_model.dir, tmp_path)
    changed = replace(tiny_model.manifest, version="2", training={"note": "x"})
    save_manifest(changed, tmp_path)
    assert load_manifest(tmp_path) == changed


def test_missing_manifest_says_what_is_expected(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"no manifest.json in .*expected an exported model directory"):
        load_manifest(tmp_path)


def test_missing_onnx_file_is_refused(tiny_model, tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text(tiny_model.manifest.to_json())
    with pytest.raises(ManifestError, match=r"ONNX file .* is missing"):
        load_manifest(tmp_path)


def test_invalid_json_and_unknown_format_are_refused(tiny_model, tmp_path: Path) -> None:
    _copy(tiny_model.dir, tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)
    d = json.loads(tiny_model.manifest.to_json())
    d["format"] = "something-else/9"
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(d))
    with pytest.raises(ManifestError, match="unsupported manifest format"):
        load_manifest(tmp_path)


def test_a_format_1_manifest_still_loads_as_the_lstm_case(tiny_model) -> None:
    d = format1_dict(tiny_model.manifest)
    assert d["format"] == FORMAT_1 and "states" not in d
    m = Manifest.from_dict(d)
    assert m.states == tiny_model.manifest.states and m.input == tiny_model.manifest.input
    assert m.output == tiny_model.manifest.output and (m.layers, m.hidden) == (2, 32)


def test_a_missing_role_is_refused(tiny_model) -> None:
    d = format1_dict(tiny_model.manifest)
    d["outputs"] = [t for t in d["outputs"] if t["role"] != "next_state_c"]
    with pytest.raises(ManifestError, match="exactly one 'next_state_c'"):
        Manifest.from_dict(d)


def test_tensors_are_found_by_role_not_name(tiny_model) -> None:
    d = format1_dict(tiny_model.manifest)
    for t in d["inputs"]:  # rename so that sorting names would pair h and c wrongly
        t["name"] = {"h0": "zz_hidden", "c0": "aa_cell"}.get(t["name"], t["name"])
    m = Manifest.from_dict(d)
    assert m.tensor("state_h").name == "zz_hidden" and m.tensor("state_c").name == "aa_cell"


def test_edited_sha_is_refused(tiny_model, tmp_path: Path) -> None:
    _copy(tiny_model.dir, tmp_path)
    save_manifest(replace(tiny_model.manifest, sha256="0" * 64), tmp_path)
    with pytest.raises(ManifestError, match="changed after export — re-export the model"):
        load_manifest(tmp_path)


def test_a_model_dir_that_does_not_exist_says_so(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=r"nope does not exist or is not a directory"):
        load_manifest(tmp_path / "nope")
