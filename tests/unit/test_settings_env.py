"""Settings read from the environment: the forms an operator writes, and one-line errors for the rest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from cellserve.server.settings import Settings


@pytest.mark.parametrize(
    ("value", "dirs"),
    [
        ("/models/a", ["/models/a"]),
        ("/models/a, /models/b", ["/models/a", "/models/b"]),
        ('["/models/a", "/models/b"]', ["/models/a", "/models/b"]),
    ],
)
def test_model_dirs_from_the_environment_as_a_path_a_list_or_json(monkeypatch, value, dirs):
    monkeypatch.setenv("CELLSERVE_MODEL_DIRS", value)
    assert Settings().model_dirs == [Path(d) for d in dirs]


def test_model_dirs_of_broken_json_is_a_validation_error_naming_the_forms(monkeypatch):
    monkeypatch.setenv("CELLSERVE_MODEL_DIRS", '["/models/a"')
    with pytest.raises(ValidationError, match="give one path, a,b or a JSON list"):
        Settings()


def test_serve_names_the_flag_and_the_variable_of_a_bad_env_value_in_one_line(tmp_path):
    env = {"CELLSERVE_OIP": "maybe", "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-m", "cellserve.server.cli", "serve"], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cellserve serve: error: --oip / CELLSERVE_OIP: "), done.stderr
