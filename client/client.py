"""Synchronous client: sessions, generate, models, health."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2

from cellserve.client.channel import ChannelConfig, Channels, normalize_targets
from cellserve.client.errors import UnavailableError, from_rpc_error
from cellserve.client.model_info import ModelInfo
from cellserve.client.protocol import SessionState
from cellserve.client.session import Session
from cellserve.v1 import cellserve_pb2 as pb


@dataclass(frozen=True)
class Generated:
    """Tokens produced since the previous message, and their bytes (may split a UTF-8 character)."""

    token_ids: tuple[int, ...]
    text: bytes


def generate_request(
    prompt: str, max_tokens: int, temperature: float, top_k: int, seed: int | None, model: str
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_k=top_k)
    if seed is not None:
        req.seed = seed
    return req


def health_name(status: int) -> str:
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


class Client:
    """Blocking client for a cellserve server.

    ``target`` is ``HOST:PORT`` or a list of them: calls go to the first until a session open finds it
    UNAVAILABLE (down or draining), then to the next; sessions move along the list when their server drains.
    ``config`` sets keepalive, message size, TLS and metadata (e.g. a bearer token).
    ``timeout_s`` bounds unary calls (models, health); streams are bounded by the session's idle timeout.
    (A target that accepts TCP but never answers holds ``session()`` for gRPC's connect timeout, ~20 s,
    before the next target is tried; ``AsyncClient`` bounds that wait by ``timeout_s``.)
    """

    def __init__(
        self, target: str | Sequence[str], config: ChannelConfig | None = None, *, timeout_s: float = 30.0
    ) -> None:
        self.targets = normalize_targets(target)
        self.config = config or ChannelConfig()
        self.timeout_s = timeout_s
        self._metadata = self.config.call_metadata()
        self._channels: Channels[grpc.Channel] = Channels(self.targets, self.config.sync_channel)
        self._infos: dict[str, ModelInfo] = {}

    def close(self) -> None:
        for channel in self._channels.all():
            channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def wait_ready(self, timeout_s: float = 10.0) -> None:
        """Block until the channel is connected (UnavailableError after ``timeout_s``)."""
        try:
            grpc.channel_ready_future(self._channels.channel(self.targets[0])).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise UnavailableError(f"could not connect to {self.targets[0]} within {timeout_s} s") from None

    # -- sessions ---------------------------------------------------------------------------------

    def session(self, model: str | None = None, *, idle_timeout_s: int = 0, resume_token: bytes = b"") -> Session:
        """Open a session (``None`` = the server's default model). Use it in a ``with`` block.

        A target that answers UNAVAILABLE (down, or draining) is skipped for the next one in the list,
        which new sessions then prefer.
        """
        start, errors = self._channels.preferred, []
        for k in range(len(self.targets)):
            index = (start + k) % len(self.targets)  # local: other threads may open sessions meanwhile
            target = self.targets[index]
            try:
                session = Session(
                    self._channels.stub(target),
                    SessionState(targets=self.targets),
                    lambda name, target=target: self._model_info(name, target),
                    model=model or "",
                    idle_timeout_s=idle_timeout_s,
                    resume_token=resume_token,
                    metadata=self._metadata,
                    connect=self._channels.stub,
                    target=index,
                )
            except UnavailableError as e:
                errors.append(f"{target}: {e.details}")
                continue
            self._channels.preferred = index
            return session
        raise UnavailableError("no server took the session: " + "; ".join(errors))

    # -- generate ---------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        max_tokens: int = 200,
        *,
        temperature: float = 0.8,
        top_k: int = 0,
        seed: int | None = None,
        model: str | None = None,
    ) -> Iterator[Generated]:
        """Stream generated tokens as the server produces them."""
        req = generate_request(prompt, max_tokens, temperature, top_k, seed, model or "")
        call = self._channels.current_stub().Generate(req, metadata=self._metadata)
        try:
            for resp in call:
                yield Generated(tuple(resp.token_ids), resp.text)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    # -- models and health ------------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        try:
            resp = self._channels.current_stub().ListModels(
                pb.ListModelsRequest(), metadata=self._metadata, timeout=self.timeout_s
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        infos = [ModelInfo.from_proto(m) for m in resp.models]
        self._infos.update({i.name: i for i in infos})
        return infos

    def model_info(self, name: str) -> ModelInfo:
        """A model's description (cached per client)."""
        return self._model_info(name, self._channels.current)

    def _model_info(self, name: str, target: str) -> ModelInfo:
        if name not in self._infos:
            try:
                resp = self._channels.stub(target).ModelInfo(
                    pb.ModelInfoRequest(model=name), metadata=self._metadata, timeout=self.timeout_s
                )
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
            self._infos[name] = ModelInfo.from_proto(resp.model)
        return self._infos[name]

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status name ("SERVING", "NOT_SERVING", ...) of the server or one model."""
        try:
            resp = self._channels.health().Check(
                health_pb2.HealthCheckRequest(service=service), metadata=self._metadata, timeout=self.timeout_s
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return health_name(resp.status)
