"""What every ``cellserve bench`` command shares: its error exit, the model it needs, the server it drives."""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cellserve.client.bench.options import CONNECT_TIMEOUT_S
from cellserve.client.bench.serving import cellserve_process
from cellserve.client.errors import CellserveClientError, UnavailableError
from cellserve.client.model_info import ModelInfo

log = logging.getLogger(__name__)
# what a bench that could not run raises: the server unreachable or refusing (CellserveClientError), a process
# or file that failed (OSError, RuntimeError), a wait that ran out (TimeoutError)
RUN_ERRORS: tuple[type[Exception], ...] = (RuntimeError, OSError, TimeoutError, CellserveClientError)


class BenchError(Exception):
    """A bad flag or a run that could not be done: ``<command>: error: <message>`` on stderr, exit status 2."""


def run_command(command: str, body: Callable[[], int]) -> int:
    """``body()``'s exit status, or 2 with one line on stderr (no traceback) when it raises BenchError or one of
    ``RUN_ERRORS``."""
    try:
        return body()
    except (BenchError, *RUN_ERRORS) as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2


def shipped_model_dir() -> Path | None:
    spec = importlib.util.find_spec("cellserve.model")  # locates the package; runs none of its code
    for root in (spec.submodule_search_locations or []) if spec else []:
        if (Path(root) / "default" / "manifest.json").is_file():
            return Path(root) / "default"
    return None


def model_dir(given: Path | None, *, needed: bool, why: str = "") -> Path | None:
    """``--model-dir``, else the shipped model; BenchError when neither exists and the command ``needed`` one."""
    found = given or shipped_model_dir()
    if found is None and needed:
        raise BenchError(f"--model-dir is needed (no shipped model found){why}")
    return found


@dataclass(frozen=True)
class Target:
    """The cellserve server a bench drives, and the model it drives there."""

    address: str
    pid: int | None  # of the server the bench started (its process tree is measured); None with --server
    metrics_url: str | None
    info: ModelInfo

    def describe(self, started_by: str) -> str:
        """What reports record as the server: ``started_by`` (e.g. "started by the bench") or the address."""
        return started_by if self.pid is not None else self.address


@contextmanager
def bench_target(
    server: str | None,
    model: str,
    model_dir: Path | None,
    serve_args: Sequence[str],
    *,
    metrics_url: str | None = None,
    max_streams: int | None = None,
    name: str = "cellserve",
    log_level: str | None = None,
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    pythonpath: Path | None = None,
) -> Iterator[Target]:
    """``--server``, or ``cellserve serve`` started on free loopback ports (see ``cellserve_process``) and
    stopped on exit; ``model`` ('' = the server's default) is looked up once the server is ready."""
    if server is not None:
        yield Target(server, None, metrics_url, model_info(server, model, connect_timeout_s))
        return
    with cellserve_process(model_dir, serve_args, max_streams, name=name, log_level=log_level,
                           pythonpath=pythonpath) as proc:  # fmt: skip
        url = metrics_url or f"http://127.0.0.1:{proc.info['metrics_port']}/metrics"
        yield Target(proc.address, proc.pid, url, model_info(proc.address, model, connect_timeout_s))


def model_info(address: str, model: str, connect_timeout_s: float = CONNECT_TIMEOUT_S) -> ModelInfo:
    """``model``'s description ('' = the server's default model), once the server at ``address`` answers
    (BenchError when it does not within ``connect_timeout_s``)."""
    from cellserve.client import Client

    log.info("waiting for the server at %s (up to %g s, --connect-timeout)", address, connect_timeout_s)
    with Client(address) as client:
        try:
            client.wait_ready(connect_timeout_s)
        except UnavailableError:
            raise BenchError(
                f"no server answered at {address} within {connect_timeout_s:g} s; start one (cellserve serve), "
                "fix --server, or wait longer with --connect-timeout"
            ) from None
        return client.model_info(model) if model else client.list_models()[0]
