"""``cellserve bench`` flags (kept apart so ``cellserve --help`` imports nothing heavy)."""

from __future__ import annotations

import argparse
from pathlib import Path

SWEEP_STREAMS = (1, 16, 64, 256)
SWEEP_T = (1, 32)


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, metavar="HOST:PORT", help="drive this server (default: start one)")
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="exported model directory (ONNX for the baselines; served when the bench starts the server)",
    )
    p.add_argument("--model", default="", help="model name on the server ('' = its default)")
    p.add_argument(
        "--metrics-url",
        default=None,
        help="server metrics URL for mean batch size (default: the started server's, else none)",
    )
    p.add_argument("--streams", type=int, default=16, help="concurrent sessions")
    p.add_argument("-T", "--steps-per-message", dest="t", type=int, default=1, help="steps per message (chunk T)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per configuration and target")
    p.add_argument(
        "--messages", type=int, default=0, help="messages per configuration and target (overrides --duration)"
    )
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of unmeasured load before each measurement")
    p.add_argument(
        "--procs",
        type=int,
        default=0,
        help="client processes (0 = min(streams, 2): one per core on the reference 2-core box)",
    )
    p.add_argument(
        "--sweep", action="store_true", help=f"streams in {list(SWEEP_STREAMS)} x T in {list(SWEEP_T)}; one report"
    )
    p.add_argument("--baselines", default="echo,naive,ort", help="comma-separated baselines to run (echo,naive,ort)")
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="directory for bench.json and bench.png")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for the started server, e.g. --serve-arg=--engine-mode=thread",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
