"""The server's one configuration object: pydantic-settings, env prefix ``CELLSERVE_``.

Every field has a docstring; ``cellserve serve --help`` is generated from them, so the flags, the
environment variables and this file never disagree. Flags override the environment.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, FilePath, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from cellserve.server.logs import check_level

# OTEL_TRACES_SAMPLER's and OTEL_EXPORTER_OTLP_PROTOCOL's names (trace_config checks the variables against them too)
TraceSampler = Literal[
    "always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
    "parentbased_traceidratio",
]  # fmt: skip
OtlpProtocol = Literal["grpc", "http/protobuf"]


def default_model_dir() -> Path:
    """The model shipped inside the package (``cellserve/model/default``)."""
    import cellserve.model

    return Path(cellserve.model.__file__).parent / "default"


class Settings(BaseSettings):
    """cellserve server settings. Environment: CELLSERVE_<FIELD> (model dirs: a path, "a,b" or a JSON list)."""

    model_config = SettingsConfigDict(
        env_prefix="CELLSERVE_", use_attribute_docstrings=True, frozen=True, extra="forbid"
    )

    host: str = "[::]"
    """Address the gRPC server binds."""
    port: int = Field(50051, ge=0, le=65535)
    """gRPC port; 0 picks a free port (the ready file tells which)."""
    metrics_port: Annotated[int, Field(ge=0, le=65535)] | Literal["auto"] = 9090
    """Prometheus /metrics port; 0 disables the endpoint; "auto" picks a free port (the ready file tells which)."""
    metrics_host: str = "0.0.0.0"
    """Address the metrics endpoint binds."""
    model_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=lambda: [default_model_dir()])
    """Exported model directories (manifest.json + ONNX); repeat the flag for several models (env: one path, a
    comma-separated list or a JSON list). A session that names no model gets the first."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where state lives and onnxruntime runs: cpu, or cuda (needs onnxruntime-gpu and CuPy)."""
    device_id: int = Field(0, ge=0)
    """CUDA device ordinal when device=cuda."""
    intra_op_threads: int = Field(1, ge=0)
    """onnxruntime intra-op threads per serving process; 0 lets onnxruntime choose (every core). Use --workers
    for more cores: one thread per worker costs the least CPU per step (README Performance)."""
    capacity: int = Field(4096, ge=1)
    """State slots per model: the most sessions one model holds at once."""
    max_batch: int = Field(64, ge=1)
    """Most sessions batched into one engine call."""
    max_wait_us: int = Field(500, ge=0)
    """Longest a batch waits for more sessions after its first step arrives, in microseconds."""
    engine_mode: Literal["inline", "thread"] = "inline"
    """Run onnxruntime on the event loop (inline) or in a worker thread (thread); see README Performance."""
    max_batch_steps: int = Field(4096, ge=1)
    """Most rows x time steps (B x T) in one engine call; a batch past it runs as several calls. It bounds the
    engine's working memory (onnxruntime keeps its peak), whatever the chunk lengths and the number of streams."""
    max_chunk_steps: int = Field(2048, ge=1)
    """Most time steps (T) one Step message may carry; also capped so its output fits max_message_bytes."""
    max_queued_steps: int = Field(8192, ge=1)
    """Most messages waiting in one model's scheduler queue; beyond it steps get RESOURCE_EXHAUSTED."""
    max_streams: int = Field(10000, ge=1)
    """Most concurrent streaming RPCs (Stream, Generate, OIP ModelStreamInfer); more get RESOURCE_EXHAUSTED."""
    max_message_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Largest gRPC message accepted or sent, in bytes; the default is most gRPC clients' receive limit."""
    open_timeout_s: float = Field(10.0, gt=0)
    """A stream must deliver its first message (Stream's open, ModelStreamInfer's first request) within this many
    seconds, or it is ended with DEADLINE_EXCEEDED: a connection that never opens cannot hold a max_streams slot."""
    max_stream_buffer_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """Most bytes of answers one stream may have unsent (being computed, or written but not yet taken by a client
    that does not read); past it the server stops reading that stream until its client catches up. A Stream has
    one answer unsent at a time (up to max_message_bytes). Answers held for slow readers total at most
    max_streams x this."""
    max_sessions_per_stream: int = Field(256, ge=1)
    """Most sessions one stream may hold at once (OIP ModelStreamInfer sequences); one more is RESOURCE_EXHAUSTED,
    so a single client cannot take every state slot."""
    keepalive_time_s: float = Field(60, gt=0)
    """Server pings a connection that has been quiet this long, to find dead peers."""
    keepalive_timeout_s: float = Field(20, gt=0)
    """A ping unanswered this long closes the connection (its sessions end as disconnects)."""
    min_client_ping_interval_s: float = Field(10, gt=0)
    """Clients may ping this often (also without active calls); faster pings get GOAWAY too_many_pings."""
    max_connection_age_s: float = Field(0, ge=0)
    """Send GOAWAY after a connection lived this long, so clients re-resolve and spread over replicas; 0 = never."""
    max_connection_age_grace_s: float = Field(300, ge=0)
    """After that GOAWAY, how long open streams may continue on the old connection."""
    idle_timeout_s: int = Field(300, ge=1)
    """Idle timeout granted to sessions that ask for none (Open.idle_timeout_s = 0)."""
    max_idle_timeout_s: int = Field(3600, ge=1)
    """Largest idle timeout a session may ask for."""
    max_generate_tokens: int = Field(4096, ge=1)
    """Most tokens one Generate call may ask for."""
    grace_s: float = Field(20.0, ge=0)
    """On SIGTERM/SIGINT: seconds in-flight work may take before the server stops."""
    oip: bool = True
    """Also serve the Open Inference Protocol (Triton's inference.GRPCInferenceService) on the gRPC port."""
    token_keys: SecretStr | None = None
    """Resume-token HMAC keys as JSON {"active": ID, "keys": {ID: HEX}}; unset = a random key per process."""
    token_keys_file: Path | None = None
    """File with the resume-token keys (same JSON); used when token_keys is unset."""
    token_ttl_s: int = Field(3600, ge=1)
    """How long a resume token (snapshot or drain) stays valid, in seconds."""
    tls_cert_file: FilePath | None = None
    """PEM server certificate (chain): serve TLS on the gRPC port. Re-read when the file changes."""
    tls_key_file: FilePath | None = None
    """PEM private key of tls_cert_file. Re-read when the file changes."""
    tls_client_ca_file: FilePath | None = None
    """PEM CA bundle: require mutual TLS, clients must present a certificate signed by it."""
    auth_tokens: SecretStr | None = None
    """Bearer tokens (CSV or JSON list); every RPC except probes (health Check, OIP live/ready) needs one."""
    auth_tokens_file: FilePath | None = None
    """File of accepted bearer tokens (one or more per line, '#' comments); re-read when it changes."""
    ready_file: Path | None = None
    """If set, write {"port", "metrics_port", "pid"} as JSON here once every model is SERVING (with --workers
    also "workers": [{"index", "pid", "metrics_port"}], rewritten after a worker restarts)."""
    workers: int = Field(1, ge=1, le=256)
    """Serving processes on the one gRPC port (SO_REUSEPORT). Each has its own state pool (capacity slots per
    model), onnxruntime session and batches; a supervisor sums their /metrics, restarts one that dies and
    drains them all on SIGTERM. 1 = serve in this process."""
    worker_heartbeat_timeout_s: float = Field(5.0, gt=0)
    """With --workers: a worker whose event loop has not answered the supervisor's heartbeat for this long (hung in
    a native call, stopped) is killed and restarted, so the kernel stops giving it connections and its sessions
    resume on the others. No engine call may block a worker's loop this long."""
    log_level: str = "INFO"
    """Least severe log level written to stderr: DEBUG, INFO, WARNING, ERROR or CRITICAL (any case)."""
    log_format: Literal["text", "json"] = "text"
    """Log lines as key=value text, or json (one object per line, for log shippers); both carry every field."""

    otlp_endpoint: str | None = None
    """OpenTelemetry collector URL for traces (http://HOST:4317 for grpc, http://HOST:4318 for http/protobuf); set,
    it turns tracing on. Unset: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT, and tracing is on
    when one of them is set or OTEL_TRACES_EXPORTER=otlp (OTEL_TRACES_EXPORTER=none or OTEL_SDK_DISABLED=true: off).
    Off, tracing costs nothing per message."""
    otlp_protocol: OtlpProtocol | None = None
    """OTLP transport for traces: grpc or http/protobuf. Unset: OTEL_EXPORTER_OTLP_TRACES_PROTOCOL or
    OTEL_EXPORTER_OTLP_PROTOCOL, else grpc."""
    trace_sampler: TraceSampler | None = None
    """Which steps get a span (OTEL_TRACES_SAMPLER's names): the ratio samplers keep trace_sampler_ratio of them,
    always_on every one; failed steps and steps slower than trace_slow_step_ms are kept whatever it says. Every
    session gets a span, except under always_off, or when a parentbased sampler's caller sent an unsampled
    traceparent. Unset: OTEL_TRACES_SAMPLER, else parentbased_always_on."""
    trace_sampler_ratio: float | None = Field(None, ge=0, le=1)
    """Share of steps the ratio samplers trace, 0..1. Unset: OTEL_TRACES_SAMPLER_ARG, else 1."""
    service_name: str | None = None
    """service.name of the traces. Unset: OTEL_SERVICE_NAME, else cellserve."""
    trace_slow_step_ms: float = Field(100.0, ge=0)
    """With tracing on, a step slower than this (queued until its output is ready) gets a span even when the sampler
    would drop it, as every failed step does."""

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _model_dirs(cls, value: object) -> object:
        """CELLSERVE_MODEL_DIRS as a path, "a,b", or a JSON list."""
        if not isinstance(value, str):
            return value
        if value.lstrip().startswith("["):
            try:
                return json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"not a JSON list of paths ({e.msg}); give one path, a,b or a JSON list") from e
        return [part.strip() for part in value.split(",") if part.strip()]

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        return check_level(value)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if not self.model_dirs:
            raise ValueError("model_dirs: at least one model directory is needed")
        if self.idle_timeout_s > self.max_idle_timeout_s:
            raise ValueError(
                f"idle_timeout_s ({self.idle_timeout_s}) exceeds max_idle_timeout_s ({self.max_idle_timeout_s})"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file: give both (TLS) or neither (plaintext)")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        return self

    @property
    def auth_enabled(self) -> bool:
        return self.auth_tokens is not None or self.auth_tokens_file is not None
