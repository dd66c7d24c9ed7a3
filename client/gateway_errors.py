"""A gateway call's partial failure (``GatewayError``: the failed keys' errors and the others' results), and
the per-entry errors of a ``Multiplex`` answer as the client's typed exceptions."""

from __future__ import annotations

from typing import Any

import grpc

from cellserve.client.errors import CellserveClientError, error_class, status_code, step_rejected
from cellserve.v1 import cellserve_pb2 as pb

SHOWN = 3  # errors quoted in a GatewayError's message


class GatewayError(CellserveClientError):
    """Some sessions of a gateway call failed; every other one succeeded and its result is in ``result``.

    ``errors`` maps each failed key to its error, one of the client's typed exceptions: ``InvalidInputError``
    (a bad row: the client's check, nothing sent, or the server's), ``StepRejected``, ``SessionClosedError``
    (``reason`` "idle": the server closed it after its idle timeout), ``DataLossError``/``UnavailableError``
    (it was lost with its server and no other could continue it), ``ResourceExhaustedError`` (an open beyond
    capacity), ... A failed key's state is unchanged by the call.

    ``result`` is what the call would have returned, for the keys that succeeded: ``step`` a dict without
    the failed keys, ``step_arrays`` the ``[N, T, *out]`` array with zero rows for them, ``snapshot`` a dict
    of tokens, ``open`` the keys opened. ``code`` is the errors' code when they share one, else UNKNOWN.
    """

    def __init__(self, errors: dict[str, CellserveClientError], result: Any, total: int) -> None:
        self.errors = errors
        self.result = result
        codes = {e.code for e in errors.values()}
        code = codes.pop() if len(codes) == 1 else grpc.StatusCode.UNKNOWN
        shown = "; ".join(f"{key!r}: {e}" for key, e in list(errors.items())[:SHOWN])
        more = f"; and {len(errors) - SHOWN} more (see .errors)" if len(errors) > SHOWN else ""
        super().__init__(f"{len(errors)} of {total} sessions failed: {shown}{more}", code)


def entry_error(e: pb.EntryError, *, step: int | None = None) -> CellserveClientError:
    """An entry's error: a step's as ``step_rejected`` makes it (``step``: the request's seq), else by code."""
    code = status_code(e.code)
    if step is not None:
        return step_rejected(step, code, e.message)
    return error_class(code)(e.message, code)


def request_error(e: pb.StepError, *, step: bool) -> CellserveClientError:
    """The error of a request the server answered ``error`` as a whole (each of its entries gets it)."""
    code = status_code(e.code)
    if step:
        return step_rejected(e.seq, code, e.message)
    return error_class(code)(e.message, code)
