"""The `cellserve` command: one entry point, subcommands registered by the part that owns them.

Registration modules import nothing heavy at import time (no torch, no onnxruntime), so
``cellserve --help`` works in the serving image and in the training environment alike.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from cellserve import __version__
from cellserve.cli_help import fail
from cellserve.server.logs import configure_logging

# Each module has `register(subparsers)`, adding its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "cellserve.server.serve",
    "cellserve.server.engine_bench",
    "cellserve.server.path_bench",
    "cellserve.model.cli",
    "cellserve.client.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellserve",
        description="Stateful LSTM serving: train, export, serve over gRPC streams, and benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"cellserve {__version__}")
    # The same dest names as the serve settings: `cellserve --log-level X serve` reaches Settings too,
    # and `cellserve serve --log-level X` wins over it. SUPPRESS: unset flags leave the environment in force.
    parser.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL, for every subcommand [env CELLSERVE_LOG_LEVEL; default: INFO]",
    )
    parser.add_argument(
        "--log-format",
        default=argparse.SUPPRESS,
        choices=("text", "json"),
        help="key=value text or one JSON object per line [env CELLSERVE_LOG_FORMAT; default: text]",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # A command may check the words it was given, where the parsed namespace cannot tell (flag order).
    check = getattr(args, "check_argv", None)
    problem = check(sys.argv[1:] if argv is None else argv, args) if check is not None else None
    if problem:
        return fail(args.command, problem)
    # Before any subcommand runs; `serve` sets it again from its Settings (where `serve --log-*` land).
    level = getattr(args, "log_level", None) or os.environ.get("CELLSERVE_LOG_LEVEL") or "INFO"
    fmt = getattr(args, "log_format", None) or os.environ.get("CELLSERVE_LOG_FORMAT") or "text"
    # One line naming where the bad value came from, as every setting error (not the top-level usage).
    if fmt not in ("text", "json"):
        return fail(args.command, f"CELLSERVE_LOG_FORMAT: {fmt!r} is not text or json")
    try:
        configure_logging(level, "json" if fmt == "json" else "text")
    except ValueError as e:
        where = "--log-level" if getattr(args, "log_level", None) else "CELLSERVE_LOG_LEVEL"
        return fail(args.command, f"{where}: {e}")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
