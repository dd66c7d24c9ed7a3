"""``inference.GRPCInferenceService`` (the Open Inference Protocol, Triton flavour) on cellserve.

Thin: protobuf ↔ domain. Models, sessions, the state pool and the scheduler are the native API's
own, so OIP sequences are cellserve sessions (same admission, batching, idle expiry, metrics).
Unary RPCs fail with a gRPC status, as Triton's do; on ``ModelStreamInfer`` a failed request is
answered with ``error_message`` and the stream goes on, as in Triton.

The handlers are registered under Triton's service name, which is what Triton clients call and what
server reflection lists (``cellserve.server.reflection``), and under the proto's own name
``cellserve.oip.GRPCInferenceService`` (see ``cellserve/oip/__init__.py`` for why the messages are
not in package ``inference``). Triton's RPCs that cellserve does not serve answer UNIMPLEMENTED with
what to use instead (``UNSERVED_RPCS``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

import grpc
import numpy as np

from cellserve import __version__
from cellserve.oip import grpc_service_pb2 as oip
from cellserve.oip import grpc_service_pb2_grpc as oip_grpc
from cellserve.server.dataplane import DRAINING, DataPlane
from cellserve.server.errors import CellserveError, ErrorBoundary, Unavailable, Unimplemented, rpc
from cellserve.server.health import Health
from cellserve.server.limits import StreamLimit
from cellserve.server.metrics import Metrics
from cellserve.server.models import LoadedModel
from cellserve.server.oip.inputs import output_names, split_inputs
from cellserve.server.oip.metadata import EXTENSIONS, SERVER_NAME, find_model, model_config, model_metadata
from cellserve.server.oip.sequences import sequence_flags
from cellserve.server.oip.stream import OipStream
from cellserve.server.oip.tensors import decode_inputs, infer_response, parameters

if TYPE_CHECKING:
    from cellserve.server.app import Services

log = logging.getLogger(__name__)

TRITON_SERVICE = "inference.GRPCInferenceService"
OWN_SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# Reflection describes Triton's name with our messages (cellserve.server.reflection).
REFLECTION_ALIASES = {TRITON_SERVICE: OWN_SERVICE}

# Triton RPCs cellserve does not serve, each answered UNIMPLEMENTED with what to use instead
# (instead of gRPC's bare "Method not found!").
_SHARED_MEMORY = (
    "shared-memory tensors are not supported by cellserve: send tensors in the request "
    "(raw_input_contents) and read them from the response (raw_output_contents)"
)
_REPOSITORY = (
    "cellserve loads its models at start-up and cannot {} one at run time: restart the server with "
    "--model-dirs (CELLSERVE_MODEL_DIRS) listing the models to serve; RepositoryIndex lists the loaded ones"
)
UNSERVED_RPCS = {
    "ModelStatistics": (
        "cellserve reports statistics as Prometheus metrics, not per-model statistics: scrape /metrics on "
        "the metrics port (--metrics-port; e.g. cellserve_steps_total, cellserve_step_latency_seconds)"
    ),
    "RepositoryModelLoad": _REPOSITORY.format("load"),
    "RepositoryModelUnload": _REPOSITORY.format("unload"),
    "SystemSharedMemoryStatus": _SHARED_MEMORY,
    "SystemSharedMemoryRegister": _SHARED_MEMORY,
    "SystemSharedMemoryUnregister": _SHARED_MEMORY,
    "CudaSharedMemoryStatus": _SHARED_MEMORY,
    "CudaSharedMemoryRegister": _SHARED_MEMORY,
    "CudaSharedMemoryUnregister": _SHARED_MEMORY,
    "TraceSetting": (
        "cellserve has no request tracing: use the Prometheus latency histograms on the metrics port "
        "(cellserve_step_latency_seconds, cellserve_queue_wait_seconds, cellserve_engine_run_seconds)"
    ),
    "LogSettings": (
        "cellserve's log settings are fixed at start-up: restart with --log-level and --log-format "
        "(CELLSERVE_LOG_LEVEL, CELLSERVE_LOG_FORMAT)"
    ),
}


@dataclass(eq=False)
class OipServicer(oip_grpc.GRPCInferenceServiceServicer):
    """The OIP service over the server's dataplane (the native API's own models and sessions)."""

    plane: DataPlane
    health: Health
    streams: StreamLimit  # OIP streams count against the same max_streams as native ones
    errors: ErrorBoundary
    metrics: Metrics  # the edge's own gauges (streams paused for their client)

    # -- health and metadata ----------------------------------------------------------------------

    def _serving(self, service: str) -> bool:
        return self.plane.accepting and self.health.is_serving(service)

    @rpc
    async def ServerLive(
        self, request: oip.ServerLiveRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)

    @rpc
    async def ServerReady(
        self, request: oip.ServerReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self._serving(""))

    @rpc
    async def ModelReady(
        self, request: oip.ModelReadyRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelReadyResponse:
        try:
            model = find_model(self.plane, request.name, request.version)
        except CellserveError:
            return oip.ModelReadyResponse(ready=False)
        return oip.ModelReadyResponse(ready=self._serving(model.name))

    @rpc
    async def ServerMetadata(
        self, request: oip.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS))

    @rpc
    async def ModelMetadata(
        self, request: oip.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelMetadataResponse:
        return model_metadata(find_model(self.plane, request.name, request.version))

    @rpc
    async def ModelConfig(
        self, request: oip.ModelConfigRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelConfigResponse:
        model = find_model(self.plane, request.name, request.version)
        return oip.ModelConfigResponse(config=model_config(model, self.plane.settings))

    @rpc
    async def RepositoryIndex(
        self, request: oip.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> oip.RepositoryIndexResponse:
        response = oip.RepositoryIndexResponse()
        for model in self.plane.models():
            ready = self._serving(model.name)
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

    @rpc
    async def ModelInfer(
        self, request: oip.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> oip.ModelInferResponse:
        if sequence_flags(parameters(request.parameters)) is not None:
            raise Unimplemented(
                "sequence_id is served on ModelStreamInfer only (a sequence lives in the stream that started "
                "it); use start_stream/async_stream_infer, or send h0/c0 here for stateless inference"
            )
        return await self._stateless(request)

    async def _stateless(self, request: oip.ModelInferRequest) -> oip.ModelInferResponse:
        if not self.plane.accepting:  # before the model's name is looked at, as every refusal of a draining server
            raise Unavailable(DRAINING)
        model = find_model(self.plane, request.model_name, request.model_version)
        outputs = output_names(model, [o.name for o in request.outputs], sequence=False)
        x, states = split_inputs(model, decode_inputs(request), sequence=False)
        y, next_states = await self.plane.infer(model.name, x, states)
        m = model.manifest
        tensors = {m.output.name: y if m.input.time_axis else y[:, 0]}  # a per-frame model's one frame: [B, *out]
        tensors.update((spec.output, value) for spec, value in zip(m.states, next_states, strict=True))
        return infer_response(request, m.name, m.version, outputs, tensors)

    @rpc
    async def ModelStreamInfer(  # type: ignore[override]
        self, request_iterator: AsyncIterator[oip.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> None:
        with self.streams.hold():
            paused = self.metrics.streams_paused
            await OipStream(self.plane, self.errors, context, self._sequence_request, self._stateless, paused).run()

    def _sequence_request(self, request: oip.ModelInferRequest) -> tuple[LoadedModel, list[str], np.ndarray]:
        """A sequence request's model, outputs to return, and x ``[1, T, *frame]`` (checked)."""
        # No drain check here: running sequences go on through the grace period; starts are
        # refused by the dataplane's open while draining.
        model = find_model(self.plane, request.model_name, request.model_version)
        outputs = output_names(model, [o.name for o in request.outputs], sequence=True)
        x, _ = split_inputs(model, decode_inputs(request), sequence=True)
        return model, outputs, x

    def unserved(self, advice: str) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[NoReturn]]:
        """A handler for a Triton RPC cellserve does not serve: UNIMPLEMENTED, saying what to use instead."""

        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> NoReturn:
            await self.errors.abort(context, Unimplemented(advice))

        return handler


def register(grpc_server: grpc.aio.Server, services: Services) -> list[str]:
    """``CellServer.add_servicer`` hook: serve OIP under Triton's and our own service name."""
    s = services
    servicer = OipServicer(s.plane, s.health, s.streams, s.errors, s.metrics)
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
    for name, advice in UNSERVED_RPCS.items():  # raw bytes in: the request is never parsed
        handlers[name] = grpc.unary_unary_rpc_method_handler(servicer.unserved(advice))
    grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(TRITON_SERVICE, handlers),))
    log.info("Open Inference Protocol served", extra={"services": [TRITON_SERVICE, OWN_SERVICE]})
    return [TRITON_SERVICE]  # reflection lists the name Triton clients call (REFLECTION_ALIASES)
