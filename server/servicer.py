"""The native ``cellserve.v1.CellServe`` service: protobuf ↔ domain objects, and nothing else.

Every handler works through the :class:`~cellserve.server.dataplane.DataPlane` it is given, as OIP's do.
Each handler is a coroutine wrapped in the one error boundary (:func:`~cellserve.server.errors.rpc`).
A ``Stream`` is served by its own :class:`~cellserve.server.stream.StreamHandler`, a ``Multiplex`` (a gateway's
many sessions) by its :class:`~cellserve.server.multiplex.MultiplexHandler`; ``Generate``
writes its tokens with ``context.write()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

import grpc
import numpy as np

from cellserve.server.dataplane import DataPlane
from cellserve.server.errors import ErrorBoundary, FailedPrecondition, InvalidArgument, rpc
from cellserve.server.limits import StreamLimit
from cellserve.server.models import LoadedModel
from cellserve.server.multiplex import MultiplexHandler
from cellserve.server.stream import StreamHandler, trace_carrier
from cellserve.v1 import cellserve_pb2 as pb
from cellserve.v1 import cellserve_pb2_grpc as pb_grpc
from cellserve.wire import PB_DTYPES, SUMMARY_FIELDS, tensor_spec

SERVICE = pb.DESCRIPTOR.services_by_name["CellServe"].full_name
ONE_PROCESS = (0, 1)  # a server's (worker index, workers) without --workers: ListModels says 0 of 1


def serialize_response(response: pb.StreamResponse | pb.MultiplexResponse | bytes) -> bytes:
    """Stream's and Multiplex's responses: a message, or an output already serialized (``tensors.encode_output``,
    ``encode_sessions_output``)."""
    return response if type(response) is bytes else response.SerializeToString()


def add_to_server(servicer: CellServeServicer, server: grpc.aio.Server) -> None:
    """Register the native service (as the generated ``add_CellServeServicer_to_server``, but Stream and
    Multiplex write pre-serialized outputs)."""
    handlers = {
        "Stream": grpc.stream_stream_rpc_method_handler(
            servicer.Stream, request_deserializer=pb.StreamRequest.FromString, response_serializer=serialize_response
        ),
        "Multiplex": grpc.stream_stream_rpc_method_handler(
            servicer.Multiplex,
            request_deserializer=pb.MultiplexRequest.FromString,
            response_serializer=serialize_response,
        ),
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=pb.GenerateRequest.FromString,
            response_serializer=pb.GenerateResponse.SerializeToString,
        ),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=pb.ListModelsRequest.FromString,
            response_serializer=pb.ListModelsResponse.SerializeToString,
        ),
        "ModelInfo": grpc.unary_unary_rpc_method_handler(
            servicer.ModelInfo,
            request_deserializer=pb.ModelInfoRequest.FromString,
            response_serializer=pb.ModelInfoResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


@dataclass(eq=False)
class CellServeServicer(pb_grpc.CellServeServicer):
    """Native API servicer: its dependencies, passed in by the app."""

    plane: DataPlane
    errors: ErrorBoundary
    streams: StreamLimit
    worker: tuple[int, int] = ONE_PROCESS  # (index, count) of this process among those sharing the port

    @rpc
    async def Stream(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.StreamRequest], context: grpc.aio.ServicerContext
    ) -> None:
        with self.streams.hold():
            await StreamHandler(self.plane, self.errors, context).run()

    @rpc
    async def Multiplex(  # type: ignore[override]
        self, request_iterator: AsyncIterator[pb.MultiplexRequest], context: grpc.aio.ServicerContext
    ) -> None:
        with self.streams.hold():
            await MultiplexHandler(self.plane, self.errors, context).run()

    @rpc
    async def Generate(  # type: ignore[override]
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> None:
        from cellserve.model.sampling import Sampler

        with self.streams.hold():
            plane = self.plane
            model = plane.model(request.model, or_default=True)
            _check_generate(request, model, plane.settings.max_generate_tokens)
            sampler = Sampler(request.temperature, request.top_k, request.seed if request.HasField("seed") else None)
            prompt = np.frombuffer(request.prompt.encode("utf-8"), dtype=np.uint8).astype(np.int64)  # [T]
            carrier = trace_carrier(context) if plane.tracing else None
            generated = plane.generate(model, prompt, request.max_tokens, sampler.next_token, trace_carrier=carrier)
            async with aclosing(generated) as tokens:
                async for token in tokens:
                    await context.write(pb.GenerateResponse(token_ids=[token], text=bytes([token])))

    @rpc
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        limit = self.plane.settings.max_message_bytes
        index, count = self.worker
        summaries = [model_summary(m, limit) for m in self.plane.models()]
        return pb.ListModelsResponse(models=summaries, worker=index, workers=count)

    @rpc
    async def ModelInfo(self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        model = self.plane.model(request.model)
        summary = model_summary(model, self.plane.settings.max_message_bytes)
        return pb.ModelInfoResponse(model=summary, manifest_json=model.manifest.to_json())


def _check_generate(request: pb.GenerateRequest, model: LoadedModel, max_tokens: int) -> None:
    m = model.manifest
    if m.vocab is None:
        raise FailedPrecondition(f"model {m.name!r} takes features, not tokens; Generate needs a token model")
    if len(m.output.frame) != 1 or m.output.frame[0] is None:
        raise FailedPrecondition(
            f"model {m.name!r} outputs {m.describe_output()} per step; Generate needs one logit per token id [V]"
        )
    if not request.prompt:
        raise InvalidArgument("prompt is empty; Generate needs at least one byte of prompt")
    if not 1 <= request.max_tokens <= max_tokens:
        raise InvalidArgument(f"max_tokens is {request.max_tokens}; it must be in [1, {max_tokens}]")
    if not (np.isfinite(request.temperature) and request.temperature >= 0):
        raise InvalidArgument(f"temperature is {request.temperature}; it must be a finite number >= 0")
    if request.top_k > m.output_size:
        raise InvalidArgument(f"top_k is {request.top_k}; model {m.name!r} has {m.output_size} tokens")


def model_summary(model: LoadedModel, max_message_bytes: int) -> pb.ModelSummary:
    m = model.manifest
    return pb.ModelSummary(
        **{f: getattr(m, f) for f in SUMMARY_FIELDS},
        inputs=[tensor_spec(t.name, t.role, t.dtype, t.shape) for t in m.inputs],
        outputs=[tensor_spec(t.name, t.role, t.dtype, t.shape) for t in m.outputs],
        input_dtype=PB_DTYPES[m.input.dtype],
        frame=[-1 if d is None else d for d in m.input.frame],
        time_axis=m.input.time_axis,
        output_frame=[-1 if d is None else d for d in m.output.frame],
        example_frame=list(m.input.example_shape),
        max_message_bytes=max_message_bytes,
    )
