"""cellserve client SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio), typed errors, CLI, bench.

    from cellserve.client import Client
    with Client(["a:50051", "b:50051"]) as client, client.session("pychar") as s:
        y = s.step([104, 105])  # [T=2, 256] logits; survives a drain or a crash of its server
    with Client("a:50051") as client, client.gateway("pychar", keys=["c1", "c2"]) as gw:
        ys = gw.step({"c1": [104], "c2": [33, 34]})  # many sessions per message: {key: [T, 256]}

Depends only on the generated ``cellserve.v1`` stubs, grpcio and numpy (never on server or model).
"""

from cellserve.client.aio import AsyncClient, AsyncSession
from cellserve.client.channel import TLS, ChannelConfig
from cellserve.client.client import Client, Generated
from cellserve.client.errors import (
    CellserveClientError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    InvalidInputError,
    NotFoundError,
    ResourceExhaustedError,
    SessionClosedError,
    StepRejected,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from cellserve.client.gateway import Gateway
from cellserve.client.gateway_aio import AsyncGateway
from cellserve.client.gateway_errors import GatewayError
from cellserve.client.gateway_ops import GatewaySession
from cellserve.client.model_info import ModelInfo
from cellserve.client.ops import SessionPolicy
from cellserve.client.replies import StepOutput
from cellserve.client.session import Session

__all__ = [
    "TLS",
    "AsyncClient",
    "AsyncGateway",
    "AsyncSession",
    "CellserveClientError",
    "ChannelConfig",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "Gateway",
    "GatewayError",
    "GatewaySession",
    "Generated",
    "InternalError",
    "InvalidArgumentError",
    "InvalidInputError",
    "ModelInfo",
    "NotFoundError",
    "ResourceExhaustedError",
    "Session",
    "SessionClosedError",
    "SessionPolicy",
    "StepOutput",
    "StepRejected",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
]
