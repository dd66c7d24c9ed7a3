"""Data split, training (loss really goes down), hyper-parameter errors, and the train/export CLI end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellserve.model.data import DataError, default_data_dir, list_sources, load_corpus, split_of
from cellserve.model.manifest import load_manifest
from cellserve.model.train import TrainConfig, compressor_bpb, train


@pytest.fixture(scope="module")
def tiny_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 real stdlib sources of 3–12 kB (deterministic choice), ~250 kB in all."""
    src = default_data_dir()
    out = tmp_path_factory.mktemp("tiny-corpus")
    picked = [rel for rel in list_sources(src) if 3_000 <= (src / rel).stat().st_size <= 12_000][:40]
    for rel in picked:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, out / rel)
    return out


def _cellserve() -> str:
    exe = Path(sys.executable).parent / "cellserve"
    return str(exe) if exe.exists() else "cellserve"


def test_stdlib_corpus_is_split_by_file_deterministically() -> None:
    files = list_sources(default_data_dir())
    assert files == sorted(files) and len(files) > 500
    assert not any("site-packages" in f.split("/") for f in files)
    corpus = load_corpus()
    split = corpus.files
    assert set(split["train"]).isdisjoint(split["val"]) and set(split["val"]).isdisjoint(split["test"])
    assert sorted(split["train"] + split["val"] + split["test"]) == files
    assert 0.03 < len(split["test"]) / len(files) < 0.07
    summary = corpus.summary()["splits"]
    assert summary["test"]["sha256"] == load_corpus().sha256("test")  # same list, same bytes, same hash
    assert all(summary[s]["bytes"] > 0 for s in ("train", "val", "test"))


def test_split_positions() -> None:
    assert [split_of(i, 100) for i in range(20)] == ["train"] * 18 + ["val", "test"]
    assert [split_of(i, 3) for i in range(3)] == ["train", "val", "test"]


def test_missing_and_empty_data_dirs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    with pytest.raises(DataError, match=r"has no \.py files"):
        load_corpus(tmp_path)
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="need at least 3"):
        load_corpus(tmp_path)
    for name in ("b.py", "c.py"):
        (tmp_path / name).write_text("")
    with pytest.raises(DataError, match=r"split .* is empty"):
        load_corpus(tmp_path)


@pytest.mark.parametrize(
    ("change", "match"),
    [({"hidden": 0}, "--hidden must be >= 1"), ({"lr": -1.0}, "--lr must be a positive"),
     ({"minutes": 0.0}, "--minutes must be > 0"), ({"bptt": 0}, "--bptt must be >= 1"),
     ({"device": "tpu"}, "--device must be"), ({"batch": 10_000}, r"train split has .* bytes")],
)  # fmt: skip
def test_bad_hyper_parameters_are_clear_errors(change: dict, match: str, tiny_corpus_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=match):
        train(TrainConfig(**{"minutes": 0.1, **change}), tmp_path, data_dir=tiny_corpus_dir)


def test_short_training_run_lowers_validation_loss(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    """From ~8 bits/byte (uniform over 256) to at least 3 bits/byte lower in 150 steps on ~250 kB of code."""
    cfg = TrainConfig(layers=1, hidden=64, embed=16, batch=8, bptt=64, lr=1e-2, minutes=5, max_steps=150,
                      eval_every_s=1000, val_bytes=8_000, test_bytes=8_000, seed=3)  # fmt: skip
    metrics = train(cfg, tmp_path, data_dir=tiny_corpus_dir)
    first, last = metrics["history"][0], metrics["history"][-1]
    assert first["step"] == 0 and last["step"] == metrics["steps"] == 150
    assert first["val_bpb"] > 7.5
    assert last["val_bpb"] <= first["val_bpb"] - 3.0, metrics["history"]
    assert metrics["held_out"]["model_bpb"] < 5.0
    assert metrics["bytes_seen"] == 150 * 8 * 64
    for name in ("checkpoint.pt", "metrics.json", "training_curve.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 150


def test_compressor_baselines_are_real_compressors() -> None:
    text = b"def f(x):\n    return x + 1\n" * 200
    rnd = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    assert compressor_bpb(text)["gzip_9"] < 0.5 and compressor_bpb(text)["xz_9"] < 0.5
    assert compressor_bpb(rnd)["gzip_9"] > 7.9


def test_train_and_export_cli_end_to_end(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    run, model_dir = tmp_path / "run", tmp_path / "model"
    train_cmd = [_cellserve(), "train", "--data-dir", str(tiny_corpus_dir), "--out", str(run), "--minutes", "0.2",
                 "--layers", "1", "--hidden", "32", "--embed", "8", "--batch", "8", "--bptt", "32",
                 "--val-bytes", "4000", "--test-bytes", "4000", "--eval-every-s", "5", "--seed", "1"]  # fmt: skip
    proc = subprocess.run(train_cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["held_out_bpb"] < 8.0
    assert "train:" in proc.stderr  # the progress bar
    export_cmd = [_cellserve(), "export", "--checkpoint", str(run / "checkpoint.pt"), "--out", str(model_dir),
                  "--name", "cli-tiny"]  # fmt: skip
    proc = subprocess.run(export_cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    manifest = load_manifest(model_dir)
    assert manifest.name == "cli-tiny" and manifest.layers == 1 and manifest.hidden == 32
    assert manifest.training["held_out_bpb"] == pytest.approx(summary["held_out_bpb"], abs=1e-4)
    assert manifest.training["data"]["test"]["sha256"] == load_corpus(tiny_corpus_dir).sha256("test")
    assert (model_dir / "metrics.json").is_file() and (model_dir / "training_curve.png").is_file()


def test_train_cli_reports_bad_arguments_without_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([_cellserve(), "train", "--out", str(tmp_path), "--data-dir", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([_cellserve(), "export", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_training_continues_from_a_checkpoint_where_it_stopped(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(layers=1, hidden=32, embed=8, batch=4, bptt=32, minutes=5, max_steps=20, eval_every_s=1000,
                      val_bytes=2_000, test_bytes=2_000, seed=1)  # fmt: skip
    first = train(cfg, tmp_path / "a", data_dir=tiny_corpus_dir)
    second = train(cfg, tmp_path / "b", data_dir=tiny_corpus_dir, init_from=tmp_path / "a" / "checkpoint.pt")
    assert second["steps"] == 40 and second["bytes_seen"] == 2 * first["bytes_seen"]
    assert second["this_run"]["steps"] == 20
    assert second["history"][: len(first["history"])] == first["history"]
    resumed = second["history"][len(first["history"])]
    assert resumed["step"] == 20 and resumed["train_bpb"] is None
    # the resumed model starts from the first run's weights, not from scratch (~8 bits/byte)
    assert resumed["val_bpb"] == pytest.approx(first["history"][-1]["val_bpb"], abs=1e-6)
    with pytest.raises(ValueError, match="holds a model"):
        train(TrainConfig(**{**cfg.__dict__, "hidden": 16}), tmp_path / "c", data_dir=tiny_corpus_dir,
              init_from=tmp_path / "a" / "checkpoint.pt")  # fmt: skip


def test_each_evaluation_leaves_a_resumable_snapshot(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(layers=1, hidden=16, embed=4, batch=2, bptt=16, minutes=5, max_steps=4, eval_every_s=1e-3,
                      val_bytes=500, test_bytes=500, seed=1)  # fmt: skip
    metrics = train(cfg, tmp_path, data_dir=tiny_corpus_dir)
    assert [p["step"] for p in metrics["history"]] == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "metrics.json", "training_curve.png"]
