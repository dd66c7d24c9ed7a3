"""Shared fixtures: a tiny exported model, its numpy oracle, and real servers on port 0."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from server_helpers import ServerHandle, ServerProcess, serve_in_thread, start_server_process
from waiting import WaitUntil

from cellserve.model.manifest import Manifest


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """A CLI run in-process (``configure_logging``) points the root logger at that test's captured stderr;
    put the handlers and level back, so later tests do not log into a closed stream."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@dataclass
class TinyModel:
    dir: Path
    manifest: Manifest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A random-weight byte-level model (2 layers, H=32), exported with its checkpoint."""
    from cellserve.model.export import export_random_model

    out = tmp_path_factory.mktemp("tiny-model")
    manifest = export_random_model(out, name="tiny", layers=2, hidden=32, seed=0)
    return TinyModel(out, manifest)


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model: TinyModel) -> Path:
    return tiny_model.dir


@pytest.fixture(scope="session")
def tiny_oracle(tiny_model: TinyModel) -> Any:
    """The numpy reference cell loaded with the tiny model's weights (float64): the test oracle."""
    from cellserve.model.reference import ReferenceLSTM

    return ReferenceLSTM.from_checkpoint(tiny_model.dir / "checkpoint.pt")


@pytest.fixture
def wait_until() -> WaitUntil:
    return WaitUntil()


@pytest.fixture
def running_server(tiny_model_dir: Path) -> Callable[..., AbstractContextManager[ServerHandle]]:
    """Factory: ``with running_server(capacity=8) as srv:`` serves the tiny model on 127.0.0.1:0."""
    from cellserve.server.settings import Settings

    def factory(model_dirs: list[Path] | None = None, hooks: tuple = (), **overrides: Any) -> Any:
        base: dict[str, Any] = {"host": "127.0.0.1", "port": 0, "metrics_port": "auto", "metrics_host": "127.0.0.1"}
        base.update(overrides)
        settings = Settings(model_dirs=model_dirs or [tiny_model_dir], **base)
        return serve_in_thread(settings, hooks)

    return factory


@pytest.fixture
def spawn_server(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Factory for ``cellserve serve`` child processes (tiny model); all are killed at teardown."""
    started: list[ServerProcess] = []

    def factory(*args: str, model_dir: Path | None = None, env: dict | None = None) -> ServerProcess:
        server = start_server_process(model_dir or tiny_model_dir, tmp_path, *args, env=env)
        started.append(server)
        return server

    yield factory
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(10)
        if server.proc.stderr:
            server.proc.stderr.close()


# -- certificates (the `cryptography` package): a CA, and server/client certificates it signs ----------


@dataclass
class Issued:
    cert: bytes
    key: bytes


@dataclass
class CertAuthority:
    """A throwaway certificate authority (EC P-256, one hour)."""

    name: str
    key: Any
    cert: Any

    @classmethod
    def create(cls, name: str) -> CertAuthority:
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, name)])
        return cls(name, key, _sign(subject, key.public_key(), subject, key, ca=True, sans=()))

    @property
    def pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, sans: tuple[str, ...] = ("localhost", "127.0.0.1")) -> Issued:
        """A leaf certificate (server and client use) for ``sans`` (DNS names or IP addresses)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, common_name)])
        cert = _sign(subject, key.public_key(), self.cert.subject, self.key, ca=False, sans=sans)
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem)


def _sign(subject: Any, public_key: Any, issuer: Any, issuer_key: Any, *, ca: bool, sans: tuple[str, ...]) -> Any:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        names: list[Any] = []
        for san in sans:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                names.append(x509.DNSName(san))
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    """One CA with a server and a client certificate, plus an unrelated CA ("other") and its client."""

    ca: CertAuthority
    server: Issued
    client: Issued
    other_ca: CertAuthority
    other_client: Issued

    def write(self, directory: Path) -> dict[str, Path]:
        """PEM files: ca, server_cert, server_key, client_cert, client_key, other_ca."""
        files = {
            "ca": self.ca.pem,
            "server_cert": self.server.cert,
            "server_key": self.server.key,
            "client_cert": self.client.cert,
            "client_key": self.client.key,
            "other_ca": self.other_ca.pem,
        }
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (directory / f"{name}.pem").write_bytes(data)
        return {name: directory / f"{name}.pem" for name in files}


@pytest.fixture(scope="session")
def pki() -> Pki:
    ca, other = CertAuthority.create("cellserve-test-ca"), CertAuthority.create("some-other-ca")
    return Pki(ca, ca.issue("localhost"), ca.issue("test-client"), other, other.issue("stranger"))
