"""Client subcommands: ``cellserve models``, ``cellserve health``, ``cellserve bench [soak|checkpoint]``,
and the ``--server`` half of ``cellserve generate`` (``remote_generate``, with the same connection flags).

Nothing heavy is imported at module level; each handler imports the SDK when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cellserve.cli_help import add_command, fail

if TYPE_CHECKING:
    from cellserve.client import Client

DEFAULT_SERVER = "localhost:50051"


def add_connection_flags(
    p: argparse.ArgumentParser,
    *,
    server_default: str | None = DEFAULT_SERVER,
    server_help: str = "server address",
    timeout: bool = True,
) -> None:
    """``--server`` and how to reach it (TLS, bearer token): the same flags on every client command."""
    p.add_argument("--server", default=server_default, metavar="HOST:PORT", help=server_help)
    p.add_argument("--tls-root-cert", type=Path, default=None, help="PEM root certificate(s): connect with TLS")
    p.add_argument("--tls-client-cert", type=Path, default=None, help="PEM client certificate (mutual TLS)")
    p.add_argument("--tls-client-key", type=Path, default=None, help="PEM client private key (mutual TLS)")
    p.add_argument("--tls-server-name", default=None, help="name to check the server certificate against")
    p.add_argument("--token", default=None, help="bearer token sent as 'authorization: Bearer …'")
    if timeout:
        p.add_argument("--timeout", type=float, default=10.0, help="seconds for unary calls")


def channel_config(args: argparse.Namespace) -> object:
    """ChannelConfig from the connection flags (TLS when any TLS flag is given)."""
    from cellserve.client.channel import TLS, ChannelConfig

    tls = None
    if args.tls_root_cert or args.tls_client_cert or args.tls_client_key or args.tls_server_name:
        tls = TLS(args.tls_root_cert, args.tls_client_cert, args.tls_client_key, args.tls_server_name)
    return ChannelConfig(tls=tls, bearer_token=args.token)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``models``, ``health`` and ``bench`` to the ``cellserve`` command."""
    p = add_command(subparsers, "models", _models, "list the models a server serves (JSON lines)")
    add_connection_flags(p)

    p = add_command(subparsers, "health", _health, "check a server's health; exit 0 iff SERVING")
    add_connection_flags(p)
    p.add_argument("--service", default="", help="health service name: '' = the server, or a model name")

    from cellserve.client.bench.options import add_bench_flags, add_checkpoint_flags, add_soak_flags

    summary = "benchmark a server against same-run baselines (echo, naive stateless, raw onnxruntime)"
    p = add_command(subparsers, "bench", _bench, summary)
    add_bench_flags(p)
    benches = p.add_subparsers(dest="bench_command", title="other benchmarks", metavar="{soak,checkpoint}")
    summary = "churn sessions for minutes; record RSS, slots and latency over time (JSON; PNG with matplotlib)"
    add_soak_flags(soak := add_command(benches, "soak", _soak, summary))
    summary = "SDK msgs/s with checkpointing every 1, 8, 64 step messages and off, in one run (JSON)"
    add_checkpoint_flags(checkpoint := add_command(benches, "checkpoint", _checkpoint, summary))
    for sub in (soak, checkpoint):
        sub.set_defaults(check_argv=_flags_after_subcommand)


def _flags_after_subcommand(argv: Sequence[str], args: argparse.Namespace) -> str | None:
    """A flag between ``bench`` and ``soak``/``checkpoint`` is the load bench's, which they do not run; argparse
    would let the subcommand's own defaults silently replace it (``bench --server X checkpoint`` would start a
    server). The problem, worded for the user, or None."""
    sub = args.bench_command
    tokens = list(argv)
    try:
        start = tokens.index("bench") + 1
        end = tokens.index(sub, start)
    except ValueError:
        return None
    misplaced = [t for t in tokens[start:end] if t.startswith("-")]
    if not misplaced:
        return None
    return (
        f"{misplaced[0]} comes before '{sub}', where flags belong to the load bench, which '{sub}' does not run; "
        f"put them after it: cellserve bench {' '.join([sub, *tokens[start:end], *tokens[end + 1 :]])} "
        f"(see cellserve bench {sub} --help)"
    )


def _models(args: argparse.Namespace) -> int:
    from cellserve.client import CellserveClientError, Client
    from cellserve.wire import SUMMARY_FIELDS

    try:
        with Client(args.server, channel_config(args), timeout_s=args.timeout) as client:  # type: ignore[arg-type]
            for m in client.list_models():
                print(json.dumps({f: getattr(m, f) for f in SUMMARY_FIELDS}))
    except CellserveClientError as e:
        return fail("models", str(e), 1)
    return 0


def _health(args: argparse.Namespace) -> int:
    from cellserve.client import CellserveClientError, Client, NotFoundError

    try:
        with Client(args.server, channel_config(args), timeout_s=args.timeout) as client:  # type: ignore[arg-type]
            try:
                status = client.health(args.service)
            except NotFoundError:
                print(f"UNKNOWN SERVICE {args.service!r} (services: '' and one per model: {_model_names(client)})")
                return 1
    except CellserveClientError as e:
        print(f"UNREACHABLE ({e})")
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


def _model_names(client: Client) -> str:
    """The loaded models' names, comma-separated, or where to find them when they cannot be listed."""
    from cellserve.client import CellserveClientError

    try:
        return ", ".join(m.name for m in client.list_models())
    except CellserveClientError as e:
        return f"see cellserve models; listing them failed: {e.code.name}"


def remote_generate(args: argparse.Namespace) -> int:
    """``cellserve generate --server HOST:PORT``: stream the server's text to stdout as it arrives.

    ``args`` has server, model (None/"" = the server's default), prompt, max_bytes, temperature,
    top_k, seed, and the connection flags (``add_connection_flags``).
    """
    from cellserve.client import CellserveClientError, Client

    out = sys.stdout.buffer
    try:
        with Client(args.server, channel_config(args)) as client:  # type: ignore[arg-type]
            out.write(args.prompt.encode("utf-8"))
            out.flush()
            for chunk in client.generate(
                args.prompt,
                args.max_bytes,
                temperature=args.temperature,
                top_k=args.top_k,
                seed=args.seed,
                model=getattr(args, "model", None) or None,
            ):
                out.write(chunk.text)
                out.flush()
    except CellserveClientError as e:
        out.write(b"\n")
        out.flush()
        return fail("generate", str(e), 1)
    out.write(b"\n")
    out.flush()
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Drive N concurrent sessions with T steps per message from several client processes; print a table,
    write JSON, and a PNG where matplotlib is installed (the train or dev extra). Without --server, starts
    `cellserve serve` on port 0 itself. `cellserve bench soak --help`: the long-running churn soak instead;
    `cellserve bench checkpoint --help`: what crash-safe SDK sessions cost."""
    from cellserve.client.bench.runner import run_bench

    return run_bench(args)


def _checkpoint(args: argparse.Namespace) -> int:
    """N closed-loop asyncio SDK sessions (await s.step, T steps per message) against the same server, once per
    checkpoint_every setting (0 = off, the baseline, and --every), in rounds of rotating order; prints each
    setting's median msgs/s, its ratio to off, latency and server CPU per message, and writes checkpoint.json.
    Without --server, starts `cellserve serve` on port 0 itself."""
    from cellserve.client.bench.checkpoint import run_checkpoint_bench

    return run_checkpoint_bench(args)


def _soak(args: argparse.Namespace) -> int:
    """K workers loop through sessions (open, random steps, a few invalid ones, close or drop abruptly) while the
    server's RSS, state slots and step latency are sampled. At the end the soak waits for every slot to be free,
    prints a summary, writes soak.json and soak.png, and exits 1 on an unexpected error, a slot still used, or RSS
    growth after warm-up above --max-rss-growth. Without --server, starts `cellserve serve` on port 0 itself."""
    from cellserve.client.bench.soak.run import run_soak

    return run_soak(args)
