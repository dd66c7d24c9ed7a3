"""Synchronous client (sessions, generate, models, health), and what it shares with ``AsyncClient``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from cellserve.client.channel import ChannelConfig, Channels, normalize_targets
from cellserve.client.connection_pool import PROBE_TIMEOUT_S, Probe, ask_worker
from cellserve.client.core import SessionCore
from cellserve.client.errors import NotFoundError, UnavailableError, from_rpc_error
from cellserve.client.gateway import Gateway, multiplex_on, new_core
from cellserve.client.gateway_ops import DEFAULT_SESSIONS_PER_STREAM
from cellserve.client.model_info import ModelInfo
from cellserve.client.ops import DEFAULT_CHECKPOINT_EVERY, DEFAULT_RESUME_TIMEOUT_S, SessionPolicy, whole_seconds
from cellserve.client.session import Session
from cellserve.v1 import cellserve_pb2 as pb

C = TypeVar("C")  # grpc.Channel or grpc.aio.Channel


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


def unknown_health_service(service: str) -> NotFoundError:
    """What a health ``Check`` of a service the server does not know raises (gRPC's own NOT_FOUND is bare)."""
    return NotFoundError(f"unknown health service {service!r}; a server's are '' (itself) and one per loaded model")


class ClientBase(Generic[C]):
    """Targets, channels, the session policy and the model-info cache of a client (sync or asyncio)."""

    def __init__(
        self,
        target: str | Sequence[str],
        config: ChannelConfig | None,
        make_channel: Callable[[ChannelConfig, str], C],
        ask_worker: Callable[[tuple[tuple[str, str], ...], float], Probe],
        *,
        timeout_s: float,
        policy: SessionPolicy,
    ) -> None:
        self.targets = normalize_targets(target)
        self.config = config or ChannelConfig()
        self.timeout_s = timeout_s
        self.open_timeout_s = min(timeout_s, self.config.connect_timeout_s)  # one open of a stream, at most
        self.policy = policy
        self._metadata = self.config.call_metadata()
        probe = ask_worker(self._metadata, min(PROBE_TIMEOUT_S, self.config.connect_timeout_s))
        self._channels: Channels[C] = Channels(
            self.targets, lambda t: make_channel(self.config, t), self.config.connections_per_target, probe
        )
        self._infos: dict[str, ModelInfo] = {}

    def _core(
        self, model: str | None, idle_timeout_s: int, resume_token: bytes, checkpoint_every: int | None
    ) -> SessionCore:
        policy = self.policy if checkpoint_every is None else replace(self.policy, checkpoint_every=checkpoint_every)
        idle_timeout_s = whole_seconds(idle_timeout_s)
        return SessionCore(
            self.targets, policy, model=model or "", idle_timeout_s=idle_timeout_s, resume_token=resume_token
        )

    def _opened_on(self, core: SessionCore) -> None:
        self._channels.preferred = core.current  # where new sessions and unary calls go first

    def _unary(self, method: str, request: Any, target: str | None = None) -> Any:
        """Start a unary call (``ListModels``, ``ModelInfo``, or health ``Check`` when method is "Check")."""
        if method == "Check":
            return self._channels.health().Check(request, metadata=self._metadata, timeout=self.timeout_s)
        stub = self._channels.stub(target or self._channels.current)
        return getattr(stub, method)(request, metadata=self._metadata, timeout=self.timeout_s)

    def _remember(self, resp: pb.ListModelsResponse | pb.ModelInfoResponse) -> list[ModelInfo]:
        models = resp.models if isinstance(resp, pb.ListModelsResponse) else [resp.model]
        infos = [ModelInfo.from_proto(m) for m in models]
        self._infos.update({i.name: i for i in infos})
        return infos


class Client(ClientBase[grpc.Channel]):
    """Blocking client for a cellserve server.

    ``target`` is ``HOST:PORT`` or a list of them: calls go to the first until a session open finds it
    UNAVAILABLE (down or draining), then to the next. Sessions are crash-safe: every ``checkpoint_every``
    step messages one asks for a resume token (piggybacked on its output), and when their server drains
    or vanishes they continue on the next target, or the same address again, within ``resume_timeout_s``
    (README, "Crash-safe sessions"). ``config`` sets keepalive, message size, TLS and metadata (e.g. a
    bearer token). ``timeout_s`` bounds unary calls (models, health); streams are bounded by the
    session's idle timeout, each open of one by ``config.connect_timeout_s`` (5 s; or ``timeout_s`` if
    smaller): a target that accepts TCP but never answers is then left for the next. Sessions spread
    over ``config.connections_per_target`` connections per address, and so over the ``--workers``
    processes behind it.
    """

    def __init__(
        self, target: str | Sequence[str], config: ChannelConfig | None = None, *, timeout_s: float = 30.0,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, resume_timeout_s: float = DEFAULT_RESUME_TIMEOUT_S,
    ) -> None:  # fmt: skip
        policy = SessionPolicy(checkpoint_every, resume_timeout_s)
        super().__init__(target, config, ChannelConfig.sync_channel, ask_worker, timeout_s=timeout_s, policy=policy)

    def close(self) -> None:
        for channel in self._channels.close():
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

    def session(
        self, model: str | None = None, *, idle_timeout_s: int = 0, resume_token: bytes = b"",
        checkpoint_every: int | None = None,
    ) -> Session:  # fmt: skip
        """Open a session (``None`` = the server's default model); use it in a ``with`` block.

        A target that answers UNAVAILABLE (down, or draining) is skipped for the next one in the list,
        which new sessions then prefer. ``checkpoint_every`` overrides the client's for this session.
        """
        core = self._core(model, idle_timeout_s, resume_token, checkpoint_every)
        session = Session.open(
            core, self._channels.stream, self._model_info, self._metadata, self.open_timeout_s, self._channels.preferred
        )
        self._opened_on(core)
        return session

    def gateway(
        self, model: str | None = None, *, keys: Iterable[str] = (), idle_timeout_s: int = 0,
        checkpoint_every: int | None = None, sessions_per_stream: int = DEFAULT_SESSIONS_PER_STREAM,
        streams: int | None = None,
    ) -> Gateway:  # fmt: skip
        """Many sessions of one model (``None`` = the server's default) by key, stepped many per message over a
        few ``Multiplex`` streams; opens ``keys`` now. Use it in a ``with`` block (``cellserve.client.gateway``).

        ``sessions_per_stream`` (at most the server's ``max_sessions_per_stream``) and ``streams`` (at least this
        many; default: one per ``--workers`` process behind the address, as it says) shape its streams;
        ``checkpoint_every`` overrides the client's. Crash-safe as sessions are: drained or crashed servers cost the
        caller nothing.
        """
        if streams is None:
            streams = self._channels.pool(self._channels.current).behind()
        core = new_core(self, model, idle_timeout_s=idle_timeout_s, checkpoint_every=checkpoint_every,
                        sessions_per_stream=sessions_per_stream, streams=streams)  # fmt: skip
        gateway = Gateway(core, multiplex_on(self), self._model_info, self._metadata)
        keys = list(keys)
        if keys:
            try:
                gateway.open(keys)
            except BaseException:
                gateway.__exit__(None, None, None)
                raise
        return gateway

    def generate(
        self, prompt: str, max_tokens: int = 200, *, temperature: float = 0.8, top_k: int = 0,
        seed: int | None = None, model: str | None = None,
    ) -> Iterator[Generated]:  # fmt: skip
        """Stream generated tokens as the server produces them."""
        request = generate_request(prompt, max_tokens, temperature, top_k, seed, model or "")
        call = self._channels.generate(request, metadata=self._metadata)
        try:
            for resp in call:
                yield Generated(tuple(resp.token_ids), resp.text)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def list_models(self) -> list[ModelInfo]:
        return self._remember(self._call("ListModels", pb.ListModelsRequest()))

    def model_info(self, name: str) -> ModelInfo:
        """A model's description (cached per client)."""
        return self._model_info(name, self._channels.current)

    def _model_info(self, name: str, target: str) -> ModelInfo:
        if name not in self._infos:
            self._remember(self._call("ModelInfo", pb.ModelInfoRequest(model=name), target))
        return self._infos[name]

    def health(self, service: str = "") -> str:
        """grpc.health.v1 status name ("SERVING", "NOT_SERVING", ...) of the server ('') or one model;
        NotFoundError for a service the server does not know."""
        try:
            return health_name(self._call("Check", health_pb2.HealthCheckRequest(service=service)).status)
        except NotFoundError:
            raise unknown_health_service(service) from None

    def _call(self, method: str, request: Any, target: str | None = None) -> Any:
        try:
            return self._unary(method, request, target)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
