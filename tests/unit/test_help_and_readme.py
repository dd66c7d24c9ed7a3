"""Every `--help` reads cleanly, and the README's settings table is exactly what `serve --help` says."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from cellserve.server.cli import build_parser
from cellserve.server.security import is_loopback
from cellserve.server.serve import settings_from_args
from cellserve.server.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every (sub)command's parser by its command line: "serve", "bench soak", ..."""
    found: dict[str, argparse.ArgumentParser] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        found[prefix] = parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())

    walk(build_parser(), "")
    return found


def _flat(help_text: str) -> str:
    return re.sub(r"\s+", " ", help_text)


@pytest.mark.parametrize("command", sorted(_parsers()))
def test_help_states_each_default_once_and_never_an_empty_one(command):
    text = _flat(_parsers()[command].format_help())
    for bad in ("(default: None)", "(default: )", "(default: [])", "(default: False)"):
        assert bad not in text, f"`cellserve {command} --help` says {bad}"
    options = re.split(r" (?=-{1,2}[a-zA-Z][\w-]* )", text)
    for option in options:
        assert option.count("default:") <= 1, f"`cellserve {command} --help`: {option!r}"


def _default_shown(name: str, default: object) -> str:
    return "the shipped model" if name == "model_dirs" else str(default)


def settings_table() -> list[str]:
    """The README's settings table rows, generated from the Settings fields (as `serve --help` is)."""
    rows = []
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        flags = f"`{flag}` / `--no-{flag[2:]}`" if field.annotation is bool else f"`{flag}`"
        default = _default_shown(name, field.get_default(call_default_factory=True))
        rows.append(f"| {flags} | `CELLSERVE_{name.upper()}` | `{default}` | {_flat(field.description or '')} |")
    return rows


def test_readme_settings_table_is_generated_from_the_settings():
    lines = README.read_text().splitlines()
    start = lines.index("| flag | env | default | meaning |") + 2
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    assert lines[start:end] == settings_table(), "regenerate the README settings table from Settings"


def test_serve_help_shows_each_settings_docstring_env_and_default():
    text = _flat(_parsers()["serve"].format_help())
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = [str(p) for p in default] if isinstance(default, list) else default
        assert _flat(f"{field.description} [env CELLSERVE_{name.upper()}; default: {shown}]") in text, name
    for flag in ("--log-level", "--log-format"):
        assert flag in text
    assert "Stream, Generate, OIP ModelStreamInfer" in text  # --max-streams covers all streaming RPCs


def _section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    return text[start : text.index("\n## ", start + 1)]


def test_readme_quick_start_says_it_binds_every_interface_and_how_to_stay_local():
    quick = _section("Quick start")
    host, port, metrics_host, metrics_port = (
        Settings.model_fields[name].default for name in ("host", "port", "metrics_host", "metrics_port")
    )
    assert f"`{host}:{port}`" in quick and f"`{metrics_host}:{metrics_port}`" in quick
    assert not is_loopback(host) and not is_loopback(metrics_host), "the warning must stay true"
    assert "no TLS and no authentication" in quick
    (flags,) = re.findall(r'ARGS="([^"]+)"', quick)
    local = settings_from_args(build_parser().parse_args(["serve", *flags.split()]))
    assert is_loopback(local.host) and is_loopback(local.metrics_host)


def test_readme_oip_table_covers_every_triton_rpc():
    from tritonclient.grpc import service_pb2 as triton

    table = _section("Triton / Open Inference Protocol compatibility")
    for method in triton.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        name = method.name
        family = name.replace("Status", "*").replace("Unregister", "*").replace("Register", "*")
        assert f"`{name}`" in table or f"`{family}`" in table, name
    assert "inference.GRPCInferenceService/ServerLive" in table and "perf_analyzer" in table


@pytest.mark.parametrize("doc", ["README.md", "deploy/README.md"])
def test_every_file_a_readme_links_or_names_exists(doc):
    """Links (``](path)``) and backticked repo paths (``tests/…``, ``server/…``) resolve: moving a file
    (the bench results, a module) means updating the docs that point at it."""
    root = README.parent
    text = (root / doc).read_text()
    linked = [(root / doc).parent / t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t]
    named = [root / t for t in re.findall(r"`((?:tests|client|server|model|deploy|proto)/[\w./-]+)`", text)]
    assert linked or named
    missing = sorted({str(p.relative_to(root)) for p in linked + named if not p.exists()})
    assert not missing, f"{doc} points at files that are not in the repo: {missing}"
