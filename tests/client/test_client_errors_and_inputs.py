"""Client unit tests: status → exception mapping, the exception hierarchy, tensor encoding, input checks."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cellserve.client import errors
from cellserve.client.model_info import ModelInfo
from cellserve.client.tensors import to_numpy, to_proto

EXPECTED = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhaustedError,
    grpc.StatusCode.UNAUTHENTICATED: errors.UnauthenticatedError,
    grpc.StatusCode.UNAVAILABLE: errors.UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceededError,
    grpc.StatusCode.UNIMPLEMENTED: errors.UnimplementedError,
    grpc.StatusCode.INTERNAL: errors.InternalError,
}


@pytest.mark.parametrize("code", list(grpc.StatusCode)[1:])
def test_every_status_code_maps_to_its_typed_error_with_the_message(code):
    rpc_error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"why {code.name}")
    err = errors.from_rpc_error(rpc_error)
    assert isinstance(err, errors.CellserveClientError)
    assert err.code is code
    assert err.details == f"why {code.name}"
    if code in EXPECTED:
        assert type(err) is EXPECTED[code]
    assert type(err) is errors.error_class(code)


def test_step_error_numbers_map_to_status_codes():
    assert errors.status_code(3) is grpc.StatusCode.INVALID_ARGUMENT
    assert errors.status_code(8) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert errors.status_code(999) is grpc.StatusCode.UNKNOWN


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.float16]),
        shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=5),
    )
)
def test_tensor_round_trip_is_exact(a):
    t = to_proto(a)
    assert len(t.raw) == a.nbytes
    b = to_numpy(t)
    assert b.dtype == a.dtype and b.shape == a.shape
    np.testing.assert_array_equal(b, a)


def test_tensor_with_wrong_byte_count_is_refused():
    t = to_proto(np.zeros(4, np.float32))
    t.raw = t.raw[:-1]
    with pytest.raises(ValueError, match="15 bytes"):
        to_numpy(t)


TOKENS = ModelInfo("m", "1", "sha", "tokens", 2, 8, 256, 256)
FEATURES = ModelInfo("f", "1", "sha", "features", 1, 4, 3, 2)


def test_token_input_accepts_ids_and_adds_the_time_axis():
    assert TOKENS.check_input(7).tolist() == [7]
    out = TOKENS.check_input(np.array([1, 2, 3], np.int32))
    assert out.dtype == np.int64 and out.tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.array([1.0, 2.0]), "input has dtype float64; model 'm' expects integer token ids in \\[0, 256\\)"),
        (np.array([[1, 2]]), "input has shape \\[1, 2\\]; .* int64 \\[T\\]"),
        (np.array([], np.int64), "input is empty \\(shape \\[0\\]\\); .* T >= 1"),
        ([], "input is empty"),  # not "dtype float64": np.asarray([]) is float64
        ([[1], [1, 2]], "not a rectangular array of numbers"),
        (np.array([True]), "input has dtype bool"),
        (np.array([0, 256]), "token id 256 is out of range"),
        (np.array([-1]), "token id -1 is out of range"),
    ],
)
def test_bad_token_inputs_are_refused_before_sending(x, message):
    with pytest.raises(errors.InvalidInputError, match=message) as info:
        TOKENS.check_input(x)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT and info.value.seq is None
    assert isinstance(info.value, ValueError) and isinstance(info.value, errors.StepRejected)


@pytest.mark.parametrize("x", [b"def ", bytearray(b"def ")])
def test_a_token_model_takes_bytes_as_one_token_id_per_byte(x):
    out = TOKENS.check_input(x)
    assert out.dtype == np.int64 and out.tolist() == list(b"def ")


@pytest.mark.parametrize(
    ("model", "x", "message"),
    [
        (TOKENS, "def ", r"input is a str; encode it first, e.g. list\('def '.encode\(\)\) .*; model 'm' expects"),
        (TOKENS, None, r"^INVALID_ARGUMENT: input is None; model 'm' expects integer token ids"),
        (TOKENS, object(), r"input of Python type object is not numbers \(numpy reads it as dtype object\)"),
        (TOKENS, ["d", "e"], r"input of Python type list is not numbers \(numpy reads it as dtype <U1\)"),
        (TOKENS, b"", r"input is empty \(shape \[0\]\)"),
        (FEATURES, b"abc", r"input has Python type bytes \(length 3\), not numbers; model 'f' expects finite float32"),
        (FEATURES, "abc", r"input has Python type str \(length 3\), not numbers; model 'f'"),
        (FEATURES, None, r"input is None; model 'f'"),
    ],
)
def test_python_values_that_are_not_numbers_are_named_by_their_python_type(model, x, message):
    with pytest.raises(errors.InvalidInputError, match=message) as info:
        model.check_input(x)
    assert "dtype |S" not in str(info.value) and "dtype <U4" not in str(info.value)


def test_a_feature_vector_of_the_wrong_width_is_quoted_as_given():
    with pytest.raises(errors.InvalidInputError, match=r"input has shape \[2\] \(a 1-D input is read as one step "
                                                      r"of 2 features\); model 'f' expects .*\[T, 3\]"):  # fmt: skip
        FEATURES.check_input([1, 2])


def test_feature_input_checks_width_and_finiteness():
    assert FEATURES.check_input([1, 2, 3]).shape == (1, 3)
    assert FEATURES.check_input(np.ones((4, 3))).dtype == np.float32
    with pytest.raises(errors.InvalidInputError, match=r"shape \[2, 4\]; model 'f' expects finite float32 .*\[T, 3"):
        FEATURES.check_input(np.ones((2, 4)))
    with pytest.raises(errors.InvalidInputError, match="NaN"):
        FEATURES.check_input([1.0, np.nan, 0.0])
    with pytest.raises(errors.InvalidInputError, match=r"input is empty \(shape \[0, 3\]\)"):
        FEATURES.check_input(np.zeros((0, 3)))


def test_a_step_the_server_rejects_as_invalid_is_the_same_type_as_one_the_client_refuses():
    server_side = errors.step_rejected(4, grpc.StatusCode.INVALID_ARGUMENT, "T=5 exceeds max_chunk_steps 4")
    client_side = errors.InvalidInputError("input is empty")
    assert type(server_side) is type(client_side) is errors.InvalidInputError
    assert server_side.seq == 4 and client_side.seq is None
    for e in (server_side, client_side):
        assert isinstance(e, errors.StepRejected) and isinstance(e, errors.InvalidArgumentError)
        assert e.code is grpc.StatusCode.INVALID_ARGUMENT and not e.retryable
    full = errors.step_rejected(5, grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
    assert type(full) is errors.StepRejected and full.retryable


def test_both_sdks_step_bytes_on_a_token_model_and_name_a_str(sdk, running_server):
    with (
        running_server() as srv,
        sdk.client(srv.address) as client,
        client.session("tiny") as a,
        client.session("tiny") as b,
    ):
        np.testing.assert_array_equal(a.step(b"def "), b.step(list(b"def ")))
        with pytest.raises(errors.InvalidInputError, match=r"input is a str; encode it first"):
            a.step("def ")
        assert a.steps == 4  # the refused step changed nothing


@pytest.mark.parametrize("bad", [-5, 2.5, 2**32])
def test_both_sdks_refuse_a_bad_idle_timeout_naming_it_and_its_range(sdk, bad):
    message = rf"idle_timeout_s is {bad}; use whole seconds >= 0 \(0 = the server's default; .*--max-idle-timeout-s\)"
    with sdk.client("127.0.0.1:1") as client, pytest.raises(ValueError, match=message):  # refused before sending
        client.session("tiny", idle_timeout_s=bad)
