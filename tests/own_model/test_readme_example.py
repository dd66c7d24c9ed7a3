"""The README's "Serve your own model" examples run as written (the server address aside)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

README = Path(__file__).resolve().parents[2] / "README.md"


def _section(title: str) -> str:
    text = README.read_text().split("## Serve your own model", 1)[1].split("\n## ", 1)[0]
    return text.split(title, 1)[1].split("\n### ", 1)[0]


def test_the_export_module_example_exports_and_serves(tmp_path, monkeypatch, running_server, capsys):
    export_block, client_block = re.findall(r"```python\n(.*?)```", _section("### From your own PyTorch module"), re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(export_block, "README export_module example", "exec"), {"__name__": "readme"})  # our own docs
    assert capsys.readouterr().out.strip() == "exported_module 2 16"  # what the example's comment says
    with running_server(model_dirs=[tmp_path / "models/sensor"]) as srv:
        scope: dict = {"__name__": "readme", "np": np}
        exec(compile(client_block.replace("localhost:50051", srv.address), "README client example", "exec"), scope)
    assert scope["y"].shape == (10, 3) and scope["y"].dtype == np.float32


def test_the_import_onnx_example_output_is_what_the_command_prints(sensor_onnx, tmp_path, monkeypatch, capsys):
    from cellserve.server.cli import main

    shown = re.findall(r"```\n(detected .*?)```", _section("### From an ONNX file"), re.S)[0].splitlines()
    (tmp_path / "sensor.onnx").write_bytes(sensor_onnx.read_bytes())
    monkeypatch.chdir(tmp_path)
    args = ["import-onnx", "sensor.onnx", "--out", "models/sensor", "--name", "sensor"]
    assert main(["--log-level", "WARNING", *args]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[:-1] == shown[:-1]  # roles and checks exactly; the last line carries this export's sha256
    assert re.sub(r"sha256 \w+…", "", printed[-1]) == re.sub(r"sha256 \w+…", "", shown[-1])


def test_each_worked_example_prints_what_the_readme_shows(tmp_path, monkeypatch, capsys):
    """Every `$ cellserve import-onnx CLASS.onnx ...` example, run on that class's state_models builder: each line
    the README shows (but those it shortens with …) is a line the command prints."""
    import shlex

    import state_models as sm

    from cellserve.server.cli import main

    block = re.findall(r"```\n(\$ cellserve import-onnx .*?)```", _section("### From an ONNX file"), re.S)[0]
    examples = [e.strip().splitlines() for e in re.split(r"\n(?=\$ )", block)]
    assert {shlex.split(e[0], comments=True)[3].removesuffix(".onnx") for e in examples} == set(sm.MODELS)
    monkeypatch.chdir(tmp_path)
    for command, *shown in examples:
        args = shlex.split(command, comments=True)[2:]  # after "$ cellserve"
        sm.MODELS[args[1].removesuffix(".onnx")].build(tmp_path)
        assert main(["--log-level", "WARNING", *args]) == 0, command
        printed = capsys.readouterr().out.splitlines()
        for line in shown:
            if "…" not in line:
                assert line in printed, f"{command}: {line!r} not printed"
