"""The `cellserve` command: one entry point, subcommands registered by the part that owns them.

Registration modules import nothing heavy at import time (no torch, no onnxruntime), so
``cellserve --help`` works in the serving image and in the training environment alike.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from cellserve import __version__

# Each module has `register(subparsers)`, adding its subcommands with `set_defaults(func=...)`.
COMMAND_MODULES = (
    "cellserve.server.serve",
    "cellserve.server.engine_bench",
    "cellserve.model.cli",
    "cellserve.client.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellserve",
        description="Stateful LSTM serving: train, export, serve over gRPC streams, and benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"cellserve {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
