"""Triton-style sequence ids and flags, from a request's parameters.

A sequence id (uint64 or string, from the request's ``sequence_id`` parameter) names a cellserve
session while its stream lives (see :mod:`cellserve.server.oip.stream`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cellserve.server.errors import InvalidArgument
from cellserve.server.oip.tensors import ParamValue

SequenceKey = tuple[str, int | str]  # ("uint64", 42) or ("string", "user-7"): 42 and "42" differ


@dataclass(frozen=True)
class SequenceFlags:
    """The sequence part of one request."""

    key: SequenceKey
    start: bool
    end: bool

    @property
    def label(self) -> str:
        return repr(self.key[1]) if self.key[0] == "string" else str(self.key[1])


def sequence_flags(params: Mapping[str, ParamValue]) -> SequenceFlags | None:
    """The request's sequence id and flags, or None for a request outside any sequence.

    As in Triton, an id of 0 or "" means "no sequence"; tritonclient sends integer ids as
    ``int64_param``, other clients as ``uint64_param``; both are accepted, negative ones are not.
    """
    sid = params.get("sequence_id")
    start, end = params.get("sequence_start", False), params.get("sequence_end", False)
    for name, flag in (("sequence_start", start), ("sequence_end", end)):
        if not isinstance(flag, bool):
            raise InvalidArgument(f"parameter {name} must be a bool_param, got {type(flag).__name__}")
    if sid is None or sid == 0 or sid == "":
        if start or end:
            raise InvalidArgument("sequence_start/sequence_end need a non-zero or non-empty sequence_id")
        return None
    if isinstance(sid, str):
        return SequenceFlags(("string", sid), start, end)
    if isinstance(sid, bool) or not isinstance(sid, int) or sid < 0:
        raise InvalidArgument(f"sequence_id must be a non-negative integer or a string, got {sid!r}")
    return SequenceFlags(("uint64", sid), start, end)
