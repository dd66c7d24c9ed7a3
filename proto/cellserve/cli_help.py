"""argparse help shared by every ``cellserve`` subcommand (stdlib only: the client, model and server use it)."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable
from typing import Any


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where X says something: not for None, "", False or [], nor where the help
    already states its default ("default: the shipped model")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, "", False, []) or "default:" in text:
            return action.help
        return super()._get_help_string(action)


def add_command(
    subparsers: argparse._SubParsersAction, name: str, run: Callable[[argparse.Namespace], int], summary: str,
    **kwargs: Any,
) -> argparse.ArgumentParser:
    """Add the subcommand ``name``: ``summary`` is its line in the parent's ``--help``, ``run``'s docstring (if any)
    the description its own ``--help`` opens with, and ``run(args)`` returns its exit status."""
    kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
    parser = subparsers.add_parser(name, help=summary, description=inspect.getdoc(run), **kwargs)
    parser.set_defaults(func=run)
    return parser


def fail(command: str, message: str, code: int = 2) -> int:
    """One line on stderr, worded as argparse words its own errors (``cellserve <command>: error: …``)."""
    print(f"cellserve {command}: error: {message}", file=sys.stderr)
    return code
