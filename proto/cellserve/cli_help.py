"""argparse help shared by every ``cellserve`` subcommand (stdlib only: the client, model and server use it)."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where X says something: not for None, "", False or [], nor where the help
    already states its default ("default: the shipped model")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, "", False, []) or "default:" in text:
            return action.help
        return super()._get_help_string(action)
