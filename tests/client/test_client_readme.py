"""The README's SDK examples run as written: each ```python block of "Client SDK and CLI" is executed
against a real server serving the shipped model (only the address ``localhost:50051`` is replaced by
the test server's, bound to port 0)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
ADDRESS = "localhost:50051"


def sdk_examples() -> list[str]:
    text = README.read_text()
    start = text.index("## Client SDK and CLI")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_sdk_section_has_a_sync_and_an_asyncio_example():
    blocks = sdk_examples()
    assert any("Client(" in b and "with client.session(" in b for b in blocks)
    assert any("AsyncClient(" in b and "async with client.session(" in b for b in blocks)
    assert all(ADDRESS in b for b in blocks)


@pytest.mark.parametrize("index", range(len(sdk_examples())))
def test_each_sdk_example_runs_as_written(running_server, index):
    import cellserve.model

    shipped = Path(cellserve.model.__file__).resolve().parent / "default"
    code = sdk_examples()[index]
    with running_server(model_dirs=[shipped]) as srv:
        proc = subprocess.run(
            [sys.executable, "-c", code.replace(ADDRESS, srv.address)], capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == 0, f"README example {index} failed:\n{code}\n{proc.stderr[-3000:]}"
