"""``cellserve serve``: flags generated from :class:`Settings`, then one serving process or a supervisor.

Every ``Settings`` field is a flag (its help the field's docstring) and a ``CELLSERVE_*`` variable;
flags win. ``--workers 1`` (the default) serves in this process; ``--workers N`` starts N serving
processes on the one port under a supervisor (``workers.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import types
import typing
from typing import Any

from pydantic import ValidationError

from cellserve.cli_help import add_command
from cellserve.server.logs import configure_logging
from cellserve.server.settings import Settings


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, its help the field's docstring (flags override CELLSERVE_* env)."""
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = [str(p) for p in default] if isinstance(default, list) else default
        help_text = f"{field.description} [env CELLSERVE_{name.upper()}; default: {shown}]"
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        annotation = field.annotation
        if typing.get_origin(annotation) is typing.Literal:
            kwargs["choices"] = typing.get_args(annotation)
        if typing.get_origin(annotation) is list:
            kwargs.update(action="append", metavar="DIR")
        elif annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
            kwargs["metavar"] = name.upper()
        parser.add_argument(_flag(name), **kwargs)


def settings_from_args(args: argparse.Namespace) -> Settings:
    given = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**given)


def _serve(args: argparse.Namespace) -> int:
    """Serve exported models. Every flag can also be set by its CELLSERVE_* environment variable."""
    # Imported here: registering the flags (`cellserve --help`) loads neither gRPC nor onnxruntime.
    from cellserve.server.app import run_until_signal
    from cellserve.server.errors import EngineUnavailable
    from cellserve.server.workers import Supervisor

    try:
        settings = settings_from_args(args)
    except ValidationError as e:
        for err in e.errors():
            field = str(err["loc"][0]) if err["loc"] else ""
            where = f"{_flag(field)} / CELLSERVE_{field.upper()}" if field in Settings.model_fields else "settings"
            print(f"cellserve serve: error: {where}: {err['msg']} (got {err.get('input')!r})", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)  # `serve --log-*` land in Settings
    try:
        if settings.workers > 1:
            return Supervisor(settings).run()
        asyncio.run(run_until_signal(settings))
    except (OSError, ValueError, EngineUnavailable) as e:
        print(f"cellserve serve: error: {e}", file=sys.stderr)
        return 1
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    summary = "serve models over gRPC (native API, health, reflection) with Prometheus metrics"
    # Each flag's help states its default and its CELLSERVE_* variable itself.
    _add_setting_flags(add_command(sub, "serve", _serve, summary, formatter_class=argparse.HelpFormatter))
