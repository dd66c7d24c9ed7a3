"""The wheel builds, installs into a clean venv, and `cellserve --help` runs from it (no torch needed).

Offline-friendly: the wheel is built with the dev environment's setuptools (``--no-isolation``); the clean venv
gets the wheel with ``--no-deps`` plus the ``serve`` extra's requirements, which pip resolves from whatever
index it is configured with (here the local file mirrors). No ``--system-site-packages``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "runs", "*.egg-info", "__pycache__", ".*_cache",
                                ".hypothesis", "checkpoint.pt")  # fmt: skip


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _serve_requirements(wheel: Path) -> list[str]:
    """The wheel's own ``Requires-Dist`` lines for the base install and the ``serve`` extra."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        lines = zf.read(meta).decode().splitlines()
    reqs = []
    for line in lines:
        if not line.startswith("Requires-Dist: "):
            continue
        req, _, marker = line.removeprefix("Requires-Dist: ").partition(";")
        if not marker or re.search(r"extra\s*==\s*['\"]serve['\"]", marker):
            reqs.append(req.strip())
    return reqs


def test_wheel_installs_in_a_clean_venv_and_cli_help_runs(tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    _run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--skip-dependency-check",
            "--outdir",
            str(tmp_path / "dist"),
            str(src),
        ]
    )
    wheel = next((tmp_path / "dist").glob("cellserve-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("cellserve/__init__.py", "cellserve/v1/cellserve_pb2.py", "cellserve/server/app.py",
                     "cellserve/model/reference.py", "cellserve/client/cli.py"):  # fmt: skip
        assert expected in names, expected
    assert not any(n.split("/")[0] in ("server", "model", "client", "proto", "tests") for n in names)
    if (ROOT / "model" / "default" / "model.onnx").is_file():
        assert "cellserve/model/default/model.onnx" in names and "cellserve/model/default/manifest.json" in names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True, system_site_packages=False)
    py = env_dir / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)])
    _run([str(py), "-m", "pip", "install", "-q", *_serve_requirements(wheel)])
    help_text = _run([str(env_dir / "bin" / "cellserve"), "--help"], cwd=tmp_path).stdout
    for command in ("serve", "train", "export", "generate"):
        assert re.search(rf"^\s+{command}\s", help_text, re.M), help_text
    # the clean venv has no torch, and the installed package is the wheel, not this checkout
    probe = "import importlib.util, cellserve; print(importlib.util.find_spec('torch') is None, cellserve.__file__)"
    has_no_torch, location = _run([str(py), "-c", probe], cwd=tmp_path).stdout.split()
    assert has_no_torch == "True"
    assert location.startswith(str(env_dir)), location
    shipped = _run([str(py), "-c", "from cellserve.server.settings import default_model_dir as d; print(d())"],
                   cwd=tmp_path)  # fmt: skip
    assert shipped.stdout.strip().startswith(str(env_dir))
