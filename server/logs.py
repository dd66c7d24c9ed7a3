"""Log output that keeps every field: key=value text (default) or one JSON object per line.

Code logs with ``log.info("serving", extra={"port": 50051, ...})``; the formatters here render the
message *and* every ``extra`` field, which a plain ``%(message)s`` format drops.

    time=2026-12-01T19:42:26.402Z level=INFO logger=cellserve.server.app msg=serving port=50051 tls=off
    {"time": "2026-12-01T19:42:26.402Z", "level": "INFO", "logger": "cellserve.server.app", "msg": "serving", ...}

Lines logged inside a session also carry that session's ``session_id`` (and ``trace_id``/``span_id`` when it is
traced): its handler binds them once with :func:`bind_log_fields`, a context variable, so that every line logged
in the handler's task, by any module, carries them without each call passing them.

Text values are quoted when they hold spaces, quotes or ``=``; lists become ``a,b``, mappings
``k:v,k:v`` (JSON keeps them as they are). A traceback follows a text line on its own lines and is
the ``exc_info`` field of a JSON line.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from typing import Any, Literal, TextIO

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LogFormat = Literal["text", "json"]

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
_BASE_KEYS = ("time", "level", "logger", "msg")


# The fields of the session whose handler logs (an asyncio task has its own copy: one stream's never leak into
# another's). A call's own ``extra`` wins over them.
_SESSION_FIELDS: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar(
    "cellserve_session_log_fields", default=None
)


def bind_log_fields(fields: Mapping[str, str] | None) -> contextvars.Token[Mapping[str, str] | None]:
    """From now on, in this task (and tasks and callbacks it starts), every log line carries ``fields``."""
    return _SESSION_FIELDS.set(fields)


def reset_log_fields(token: contextvars.Token[Mapping[str, str] | None]) -> None:
    """Undo :func:`bind_log_fields`."""
    _SESSION_FIELDS.reset(token)


@contextlib.contextmanager
def session_log_fields(fields: Mapping[str, str] | None) -> Iterator[None]:
    """Log lines inside the block carry ``fields`` instead of the task's: code that works for many sessions at
    once (the scheduler runs a batch in whichever session's task completed it) names the right one, or none."""
    token = _SESSION_FIELDS.set(fields)
    try:
        yield
    finally:
        _SESSION_FIELDS.reset(token)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    bound = _SESSION_FIELDS.get()
    extra = extra_fields(record)
    return {**bound, **extra} if bound else extra


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call passed in ``extra`` (renamed ``extra_<key>`` where they would shadow a base key)."""
    fields = {}
    for key, value in vars(record).items():
        if key not in _RECORD_ATTRS and not key.startswith("_"):
            fields[f"extra_{key}" if key in _BASE_KEYS else key] = value
    return fields


def _timestamp(record: logging.LogRecord) -> str:
    t = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _text_value(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, Mapping):
        text = ",".join(f"{k}:{_text_value(v)}" for k, v in value.items())
    elif isinstance(value, list | tuple | set | frozenset):
        text = ",".join(_text_value(v) for v in value)
    else:
        text = str(value)
    if text == "" or any(c in text for c in ' "=\\\n\t'):
        return json.dumps(text, ensure_ascii=False)  # double quotes, backslash escapes: logfmt-style
    return text


class KeyValueFormatter(logging.Formatter):
    """``time=… level=… logger=… msg=… key=value …``: readable, and parsed by logfmt parsers."""

    def format(self, record: logging.LogRecord) -> str:
        pairs = {"time": _timestamp(record), "level": record.levelname, "logger": record.name}
        pairs["msg"] = record.getMessage()
        pairs.update(_fields(record))
        line = " ".join(f"{key}={_text_value(value)}" for key, value in pairs.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line (for log shippers); values JSON cannot hold are written as strings."""

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {"time": _timestamp(record), "level": record.levelname, "logger": record.name}
        fields["msg"] = record.getMessage()
        fields.update(_fields(record))
        if record.exc_info:
            fields["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            fields["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(fields, default=str, ensure_ascii=False)


def check_level(level: str) -> str:
    """``level`` in upper case, or ValueError naming the accepted ones."""
    name = level.strip().upper()
    if name not in LEVELS:
        raise ValueError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    return name


def configure_logging(level: str = "INFO", fmt: LogFormat = "text", stream: TextIO | None = None) -> logging.Handler:
    """Route the root logger to ``stream`` (stderr) at ``level`` in ``fmt``; replaces earlier set-ups."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    logging.basicConfig(level=check_level(level), handlers=[handler], force=True)
    return handler
