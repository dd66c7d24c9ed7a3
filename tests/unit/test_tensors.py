"""Tensor codecs of the server: the hand-serialized output equals protobuf's own bytes; decode errors are exact."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellserve.server.errors import InvalidArgument
from cellserve.server.tensors import encode_output, encode_sessions_output, to_numpy
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.wire import to_proto


@settings(max_examples=200, deadline=None)
@given(
    seq=st.integers(0, 2**64 - 1),
    t=st.integers(1, 300),
    o=st.integers(1, 600),
    token=st.binary(max_size=400),
)
def test_encode_output_is_byte_identical_to_protobuf(seq: int, t: int, o: int, token: bytes) -> None:
    y = np.random.default_rng(seq % 1000).standard_normal((t, o)).astype(np.float32)
    want = pb.StreamResponse(output=pb.Output(seq=seq, output=to_proto(y), resume_token=token))
    got = encode_output(seq, y, token)
    assert got == want.SerializeToString()
    back = pb.StreamResponse.FromString(got)
    assert back.output.seq == seq and back.output.resume_token == token
    np.testing.assert_array_equal(to_numpy(back.output.output), y)


def test_encode_output_of_a_batch_row_view():
    y = np.arange(4 * 3 * 5, dtype=np.float32).reshape(4, 3, 5)  # [B, T, O]: rows are what the scheduler hands out
    decoded = to_numpy(pb.StreamResponse.FromString(encode_output(9, y[2])).output.output)
    np.testing.assert_array_equal(decoded, y[2])


@pytest.mark.parametrize(
    ("shape", "raw", "words"),
    [
        ([], b"", "no shape"),
        ([2, -1], b"", "negative dimension"),
        ([-2, -3], b"\0" * 48, "negative dimension"),  # two negatives multiply to a positive count
        ([0], b"", "empty"),
        ([3], b"\0" * 16, "needs 24"),
    ],
)
def test_to_numpy_names_what_is_wrong(shape, raw, words):
    with pytest.raises(InvalidArgument, match=words):
        to_numpy(pb.Tensor(dtype=pb.DTYPE_INT64, shape=shape, raw=raw))


def test_a_tensor_without_a_dtype_is_told_the_enum_names_to_write():
    with pytest.raises(InvalidArgument) as e:
        to_numpy(pb.Tensor(shape=[1], raw=bytes(8)))  # grpcurl JSON without "dtype"
    assert "DTYPE_UNSPECIFIED (0) is not supported" in e.value.message
    assert "DTYPE_INT64 (int64)" in e.value.message and "DTYPE_FLOAT32 (float32)" in e.value.message


@pytest.mark.parametrize(("seq", "n", "t", "o"), [(0, 1, 1, 1), (1, 64, 1, 256), (300, 3, 7, 5), (2**40, 2, 2, 2)])
def test_encode_sessions_output_is_byte_identical_to_protobuf(seq: int, n: int, t: int, o: int) -> None:
    y = np.random.default_rng(seq % 97).standard_normal((n, t, o)).astype(np.float32)
    want = pb.MultiplexResponse(
        seq=seq,
        output=pb.SessionsOutput(output=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=y.shape, raw=y.tobytes())),
    ).SerializeToString()
    assert encode_sessions_output(seq, y) == want
