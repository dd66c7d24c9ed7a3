"""``inference.GRPCInferenceService`` (the Open Inference Protocol, Triton flavour) on cellserve.

Thin: protobuf ↔ domain. Models, sessions, the state pool and the scheduler are the native API's
own, so OIP sequences are cellserve sessions (same admission, batching, idle expiry, metrics).
Unary RPCs fail with a gRPC status, as Triton's do; on ``ModelStreamInfer`` a failed request is
answered with ``error_message`` and the stream goes on, as in Triton.

The handlers are registered under Triton's service name, which is what Triton clients call, and
under the proto's own name ``cellserve.oip.GRPCInferenceService``, which server reflection
describes (see ``cellserve/oip/__init__.py`` for why the messages are not in package ``inference``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, NoReturn

import grpc
import numpy as np
from grpc_health.v1 import health_pb2

from cellserve import __version__
from cellserve.oip import grpc_service_pb2 as oip
from cellserve.oip import grpc_service_pb2_grpc as oip_grpc
from cellserve.server.errors import CellserveError, ResourceExhausted, Unavailable, Unimplemented, abort, to_status
from cellserve.server.health import SERVING
from cellserve.server.models import LoadedModel
from cellserve.server.oip_model import (
    EXTENSIONS,
    SERVER_NAME,
    Names,
    find_model,
    model_config,
    model_metadata,
    output_names,
    split_inputs,
)
from cellserve.server.oip_sequences import SequenceFlags, StreamSequences, sequence_flags
from cellserve.server.oip_stateless import run_stateless
from cellserve.server.oip_tensors import add_output, decode_inputs, parameters

if TYPE_CHECKING:
    from cellserve.server.app import CellServer

log = logging.getLogger(__name__)

TRITON_SERVICE = "inference.GRPCInferenceService"
OWN_SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Requests of one stream being worked on or waiting to be sent back; past it the server stops
# reading the stream (gRPC flow control pushes back on the client).
STREAM_WINDOW = 256


class OipServicer(oip_grpc.GRPCInferenceServiceServicer):
    """The OIP service over one :class:`CellServer`'s models and sessions."""

    def __init__(self, server: CellServer) -> None:
        self.server = server
        self.sessions = server.sessions
        self.models = server.sessions.models
        self.settings = server.settings
        self.metrics = server.metrics

    # -- health and metadata ----------------------------------------------------------------------

    async def _serving(self, service: str) -> bool:
        if not self.sessions.accepting:
            return False
        try:
            reply = await self.server.health.servicer.Check(health_pb2.HealthCheckRequest(service=service), None)
        except Exception:  # unknown service name (Check aborts on its context)
            return False
        return reply.status == SERVING

    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=await self._serving(""))

    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        try:
            model = find_model(self.models, request.name, request.version)
        except CellserveError:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=await self._serving(model.name))

    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS))

    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        try:
            return model_metadata(find_model(self.models, request.name, request.version))
        except CellserveError as e:
            await self._abort(context, e)

    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelConfigResponse:
        try:
            model = find_model(self.models, request.name, request.version)
        except CellserveError as e:
            await self._abort(context, e)
        return oip.ModelConfigResponse(config=model_config(model, self.settings))

    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> oip.RepositoryIndexResponse:
        response = oip.RepositoryIndexResponse()
        for model in self.models:
            ready = await self._serving(model.name)
            if request.ready and not ready:
                continue
            response.models.add(
                name=model.name,
                version=model.manifest.version,
                state="READY" if ready else "UNAVAILABLE",
                reason="" if ready else "server is starting or draining",
            )
        return response

    # -- inference ---------------------------------------------------------------------------------

    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        try:
            if sequence_flags(parameters(request.parameters)) is not None:
                raise Unimplemented(
                    "sequence_id is served on ModelStreamInfer only (a sequence lives in the stream that started "
                    "it); use start_stream/async_stream_infer, or send h0/c0 here for stateless inference"
                )
            return await self._stateless(request)
        except CellserveError as e:
            await self._abort(context, e)

    async def _stateless(self, request: oip.ModelInferRequest) -> oip.ModelInferResponse:
        model = self._model_for_inference(request)
        outputs = output_names(model, [o.name for o in request.outputs], sequence=False)
        s = self.settings
        x, h0, c0 = split_inputs(
            model, decode_inputs(request), max_batch=s.max_batch, max_steps=s.max_chunk_steps, sequence=False
        )
        y, hn, cn = await run_stateless(model, x, h0, c0, s.max_chunk_steps)
        n = Names.of(model.manifest)
        return _response(request, model, outputs, {n.y: y, n.hn: hn, n.cn: cn})

    def _model_for_inference(self, request: oip.ModelInferRequest) -> LoadedModel:
        if not self.sessions.accepting:
            raise Unavailable("server is draining and accepts no new requests; retry on another replica")
        return find_model(self.models, request.model_name, request.model_version)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[oip.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        native = self.server.servicer  # OIP streams count against the same max_streams as native ones
        native.active_streams += 1
        # (response, answers a request?) — server-initiated messages take no window credit back
        responses: asyncio.Queue[tuple[oip.ModelStreamInferResponse, bool] | None] = asyncio.Queue()
        window = asyncio.Semaphore(STREAM_WINDOW)

        def server_ended(flags: SequenceFlags, message: str) -> None:
            text = f"sequence {flags.label} was ended by the server: {message}"
            responses.put_nowait((oip.ModelStreamInferResponse(error_message=text), False))

        sequences = StreamSequences(self.sessions, server_ended)
        reader = asyncio.create_task(self._read_stream(request_iterator, sequences, responses, window))
        try:
            if native.active_streams > self.settings.max_streams:
                raise ResourceExhausted(
                    f"server has {self.settings.max_streams} streams open (setting max_streams); retry later"
                )
            while (item := await responses.get()) is not None:
                response, answers_request = item
                yield response
                if answers_request:
                    window.release()
        except CellserveError as e:
            await self._abort(context, e)
        finally:
            native.active_streams -= 1
            reader.cancel()
            sequences.close_all("disconnect")

    async def _read_stream(
        self,
        request_iterator: AsyncIterator[oip.ModelInferRequest],
        sequences: StreamSequences,
        responses: asyncio.Queue[tuple[oip.ModelStreamInferResponse, bool] | None],
        window: asyncio.Semaphore,
    ) -> None:
        """Start one task per request; once the client half-closes, let them finish, then end the stream."""
        tasks: set[asyncio.Task[None]] = set()

        async def answer(request: oip.ModelInferRequest) -> None:
            responses.put_nowait((await self._stream_one(request, sequences), True))

        try:
            async for request in request_iterator:
                await window.acquire()
                task = asyncio.create_task(answer(request))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if tasks:
                await asyncio.wait(tasks)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        except Exception:  # the client went away mid-read: nothing left to answer
            log.debug("OIP stream read ended", exc_info=True)
        responses.put_nowait(None)

    async def _stream_one(
        self, request: oip.ModelInferRequest, sequences: StreamSequences
    ) -> oip.ModelStreamInferResponse:
        """Answer one stream request: its result, or its error in ``error_message``."""
        try:
            flags = sequence_flags(parameters(request.parameters))
            if flags is None:
                response = await self._stateless(request)
            else:
                response = await sequences.in_order(flags.key, lambda: self._sequence_step(request, flags, sequences))
        except Exception as e:
            code, message = to_status(e)
            self.metrics.errors.labels(code=code.name).inc()
            failed = oip.ModelInferResponse(model_name=request.model_name, id=request.id)
            return oip.ModelStreamInferResponse(error_message=message, infer_response=failed)
        return oip.ModelStreamInferResponse(infer_response=response)

    async def _sequence_step(
        self, request: oip.ModelInferRequest, flags: SequenceFlags, sequences: StreamSequences
    ) -> oip.ModelInferResponse:
        # No drain check here: running sequences go on through the grace period; starts are
        # refused by SessionManager.open while draining.
        model = find_model(self.models, request.model_name, request.model_version)
        outputs = output_names(model, [o.name for o in request.outputs], sequence=True)
        n = Names.of(model.manifest)
        s = self.settings
        x, _, _ = split_inputs(model, decode_inputs(request), max_batch=1, max_steps=s.max_chunk_steps, sequence=True)
        result = await sequences.step(model, flags, x[0], want_state=n.hn in outputs or n.cn in outputs)
        tensors = {n.y: result.y[None]}  # [1, T, O]
        if result.h is not None and result.c is not None:
            tensors[n.hn], tensors[n.cn] = result.h[None], result.c[None]  # [1, L, H]
        return _response(request, model, outputs, tensors)

    async def _abort(self, context: grpc.aio.ServicerContext, e: CellserveError) -> NoReturn:
        self.metrics.errors.labels(code=e.code.name).inc()
        await abort(context, e)
        raise AssertionError("abort returned")  # pragma: no cover - abort always raises


def _response(
    request: oip.ModelInferRequest, model: LoadedModel, outputs: list[str], tensors: dict[str, np.ndarray]
) -> oip.ModelInferResponse:
    response = oip.ModelInferResponse(model_name=model.name, model_version=model.manifest.version, id=request.id)
    for name in outputs:
        add_output(response, name, tensors[name])
    return response


def register(grpc_server: grpc.aio.Server, server: CellServer) -> list[str]:
    """``CellServer.add_servicer`` hook: serve OIP under Triton's and our own service name."""
    servicer = OipServicer(server)
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, grpc_server)
    handlers = {}
    for method in oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
        request_class = getattr(oip, method.input_type.name)
        response_class = getattr(oip, method.output_type.name)
        make = grpc.stream_stream_rpc_method_handler if method.client_streaming else grpc.unary_unary_rpc_method_handler
        handlers[method.name] = make(
            getattr(servicer, method.name),
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )
    grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(TRITON_SERVICE, handlers),))
    log.info("Open Inference Protocol served", extra={"services": [TRITON_SERVICE, OWN_SERVICE]})
    return [OWN_SERVICE]
