"""`cellserve train` and `export` under an install without the train extra (what `make serve` installs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("argv", [["train", "--minutes", "0.01"], ["export", "--checkpoint", "c.pt"]])
def test_train_and_export_without_torch_say_which_extra_in_one_line(tmp_path: Path, argv: list[str]) -> None:
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "torch.py").write_text('raise ImportError("No module named \'torch\'", name="torch")\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "cellserve.server.cli", *argv, "--out", str(tmp_path / "out")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs torch" in lines[0] and "cellserve[train]" in lines[0], done.stderr
    assert not (tmp_path / "out").exists()
