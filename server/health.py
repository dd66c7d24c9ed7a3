"""grpc.health.v1: the overall service "" plus one service name per model; NOT_SERVING until warm."""

from __future__ import annotations

from grpc_health.v1 import health, health_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """Owns the health servicer and flips every service name together."""

    def __init__(self, model_names: list[str]) -> None:
        self.servicer = health.aio.HealthServicer()
        self.names = ["", *model_names]
        self.status = NOT_SERVING  # what every name was last set to

    async def set_all(self, status: int) -> None:
        self.status = status
        for name in self.names:
            await self.servicer.set(name, status)

    def is_serving(self, name: str) -> bool:
        """Whether ``name`` ("" = the server, or a model) reports SERVING."""
        return self.status == SERVING and name in self.names

    async def serving(self) -> None:
        await self.set_all(SERVING)

    async def not_serving(self) -> None:
        await self.set_all(NOT_SERVING)
