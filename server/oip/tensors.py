"""Open Inference Protocol tensors ↔ numpy, and request parameters ↔ Python values.

Inputs may come as ``raw_input_contents`` (one little-endian buffer per input, what tritonclient
sends) or as typed ``contents``; outputs always go back as ``raw_output_contents``. Every
malformed tensor is an INVALID_ARGUMENT that names the tensor and says what was expected.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cellserve.model.manifest import Manifest
from cellserve.oip import grpc_service_pb2 as oip
from cellserve.server.errors import InvalidArgument
from cellserve.wire import element_count

# OIP datatype name → little-endian numpy dtype (BYTES and BF16 have no use for an LSTM).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPE_NAMES: dict[str, str] = {dt.name: name for name, dt in DATATYPES.items()}

# Which InferTensorContents field carries each datatype (the protocol's rule).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

ParamValue = bool | int | str | float


def datatype_of(dtype: np.dtype | str) -> str:
    """The OIP datatype name of a numpy dtype ("int64" → "INT64")."""
    return DATATYPE_NAMES[np.dtype(dtype).name]


def tensor_datatype(m: Manifest, name: str) -> str:
    """The OIP datatype of the model's graph tensor ``name``."""
    return datatype_of(next(t.dtype for t in (*m.inputs, *m.outputs) if t.name == name))


def decode_inputs(request: oip.ModelInferRequest) -> dict[str, np.ndarray]:
    """All input tensors of ``request`` by name, as native-endian numpy arrays."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "give one per input, in the order of `inputs`"
        )
    tensors: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        if t.name in tensors:
            raise InvalidArgument(f"input '{t.name}' is given twice")
        tensors[t.name] = _decode(t, raw[i] if raw else None)
    return tensors


def _decode(t: oip.ModelInferRequest.InferInputTensor, raw: bytes | None) -> np.ndarray:
    dtype = DATATYPES.get(t.datatype)
    if dtype is None:
        raise InvalidArgument(f"input '{t.name}' has datatype '{t.datatype}'; supported: {', '.join(DATATYPES)}")
    shape = tuple(t.shape)
    count = element_count(shape, InvalidArgument, f"input '{t.name}'")  # exact: never wraps as int64 would
    if raw is not None:
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(
                f"input '{t.name}' has {len(raw)} bytes of raw data; shape {list(shape)} of {t.datatype} "
                f"needs {count * dtype.itemsize}"
            )
        flat = np.frombuffer(raw, dtype=dtype)
    else:
        field = _CONTENTS_FIELD.get(t.datatype)
        if field is None:
            raise InvalidArgument(f"input '{t.name}' of datatype {t.datatype} must be sent as raw_input_contents")
        values = getattr(t.contents, field)
        if len(values) != count:
            raise InvalidArgument(
                f"input '{t.name}' has {len(values)} values in contents.{field}; shape {list(shape)} needs {count}"
            )
        flat = np.asarray(values, dtype=dtype)
    return flat.reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def infer_response(
    request: oip.ModelInferRequest, name: str, version: str, outputs: list[str], tensors: Mapping[str, np.ndarray]
) -> oip.ModelInferResponse:
    """The response to ``request`` from model ``name``: the ``outputs`` asked for, out of ``tensors`` by name."""
    response = oip.ModelInferResponse(model_name=name, model_version=version, id=request.id)
    for output in outputs:
        add_output(response, output, tensors[output])
    return response


def add_output(response: oip.ModelInferResponse, name: str, array: np.ndarray) -> None:
    """Append one output tensor (metadata in ``outputs``, little-endian bytes in ``raw_output_contents``)."""
    a = np.ascontiguousarray(array)
    response.outputs.add(name=name, datatype=datatype_of(a.dtype), shape=list(a.shape))
    response.raw_output_contents.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


def parameters(params: Mapping[str, oip.InferParameter]) -> dict[str, ParamValue]:
    """Request parameters as plain Python values (whichever oneof member each one carries)."""
    out: dict[str, ParamValue] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is not None:
            out[key] = getattr(p, which)
    return out
