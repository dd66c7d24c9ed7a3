"""``cellserve bench`` flags (kept apart so ``cellserve --help`` imports nothing heavy)."""

from __future__ import annotations

import argparse
from pathlib import Path

SWEEP_STREAMS = (1, 16, 64, 256)
DEFAULT_STREAMS, DEFAULT_T = 16, 1
SWEEP_T = (1, 32)
CONNECT_TIMEOUT_S = 30.0


def add_server_flag(p: argparse.ArgumentParser, verb: str = "drive") -> None:
    """``--server`` and ``--connect-timeout``: the same on every bench."""
    p.add_argument("--server", default=None, metavar="HOST:PORT", help=f"{verb} this server (default: start one)")
    p.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=CONNECT_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for the server to answer before giving up (default: %(default)g)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not > 0 seconds")
    return value


def _counts(text: str) -> list[int]:
    """``"1,64,256"`` → [1, 64, 256]: whole numbers >= 1, in the order given, each once."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number or a list like 1,64,256") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers >= 1, e.g. 64 or 1,64,256")
    return list(dict.fromkeys(values))


def add_bench_flags(p: argparse.ArgumentParser) -> None:
    add_server_flag(p)
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="exported model directory: ONNX for the baselines, served when the bench starts the server "
        "(default: the shipped model)",
    )
    p.add_argument("--model", default="", help="model name on the server ('' = its default)")
    p.add_argument(
        "--metrics-url",
        default=None,
        help="server metrics URL for mean batch size (default: the started server's, else none)",
    )
    p.add_argument(
        "--streams",
        type=_counts,
        default=None,
        help=f"concurrent sessions; a comma-separated list (e.g. 1,64,256) runs each, in one report "
        f"(default: {DEFAULT_STREAMS})",
    )
    p.add_argument(
        "-T",
        "--steps-per-message",
        dest="t",
        type=_counts,
        default=None,
        help=f"steps per message (chunk T); a comma-separated list runs each with every --streams "
        f"(default: {DEFAULT_T})",
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per configuration, target and round")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run each configuration's targets this many times, in a changing order; the ratios to echo, "
        "naive and the compare server are then medians of the same-round ratios (use 5 or more on a shared, "
        "noisy machine)",
    )
    p.add_argument(
        "--messages", type=int, default=0, help="messages per configuration, target and round (overrides --duration)"
    )
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of unmeasured load before each measurement")
    p.add_argument(
        "--procs",
        type=int,
        default=0,
        help="client processes (0 = min(streams, 2): one per core on the reference 2-core box)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help=f"streams in {list(SWEEP_STREAMS)} x T in {list(SWEEP_T)}; one report (instead of --streams/-T)",
    )
    p.add_argument(
        "--baselines",
        default=None,
        help="comma-separated baselines to run (default: echo,naive,ort; with --sessions-per-message: echo,ort)",
    )
    p.add_argument(
        "--sessions-per-message",
        type=_counts,
        default=None,
        metavar="K",
        help="a gateway's load instead: each --streams stream is a Multiplex stream holding K sessions and every "
        "message steps all K ([K, T, *frame]); reports session-steps/s against raw onnxruntime at batch K and echo's "
        "msgs/s at --echo-streams (a list like 1,64 runs each; default: one session per Stream message)",
    )
    p.add_argument(
        "--inflight",
        type=_counts,
        default=[1],
        metavar="D",
        help="with --sessions-per-message: messages each stream keeps in flight, the server answering in order "
        "(default: 1, closed loop; a list like 1,2 runs each)",
    )
    p.add_argument(
        "--echo-streams",
        type=int,
        default=64,
        metavar="N",
        help="with --sessions-per-message: streams of the echo baseline sending one session's Stream step per "
        "message, whose msgs/s the session-steps/s are divided by (steps_vs_echo_msgs; default: %(default)s)",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="directory for bench.json and bench.png")
    p.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra flag for the started server, e.g. --serve-arg=--engine-mode=thread",
    )
    p.add_argument(
        "--compare-serve-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="also start a second cellserve server with the same flags plus this one (repeatable), and run it as "
        "target 'compare' in every round: its ratios to cellserve are same-round medians like the others, e.g. "
        "--compare-serve-arg=--workers=2 (not with --server)",
    )
    p.add_argument(
        "--compare-pythonpath",
        type=Path,
        default=None,
        metavar="DIR",
        help="run the compare server (as with --compare-serve-arg, which it implies) from the cellserve package "
        "found in DIR, e.g. an older commit's checkout laid out as a package: the same run then measures a change "
        "against the code before it (README Performance)",
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=1,
        help="onnxruntime threads of the started server (a --serve-arg may override it) and of the naive and "
        "raw-ORT baselines: the same for all",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none anyway when stderr is not a terminal)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")


def add_soak_flags(p: argparse.ArgumentParser) -> None:
    """Flags of ``cellserve bench soak``."""
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=None, help="soak length in minutes (default 10)")
    length.add_argument("--seconds", type=float, default=None, help="soak length in seconds (for short runs)")
    add_server_flag(p, "soak")
    p.add_argument(
        "--metrics-url",
        default=None,
        help="server /metrics URL for RSS, slots and sessions (default: the started server's; needed with --server)",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="model served when the soak starts the server (default: the shipped model)",
    )
    p.add_argument("--model", default="", help="model name on the server ('' = its default)")
    p.add_argument("--serve-arg", action="append", default=[], metavar="FLAG", help="extra flag for the started server")
    p.add_argument("--workers", type=int, default=32, help="concurrent sessions (each worker loops open..end)")
    p.add_argument("--min-messages", type=int, default=1, help="fewest step messages a session sends")
    p.add_argument("--max-messages", type=int, default=64, help="most step messages a session sends")
    p.add_argument("--max-t", type=int, default=16, help="steps per message drawn from [1, max-t]")
    p.add_argument("--p-drop", type=float, default=0.25, help="share of sessions dropped abruptly instead of closed")
    p.add_argument("--p-bad-step", type=float, default=0.02, help="share of messages replaced by an invalid step")
    p.add_argument("--think-ms", type=float, default=2.0, help="mean pause between a session's messages (ms)")
    p.add_argument("--warmup", type=float, default=0.2, help="warm-up share of the run (RSS baseline after it)")
    p.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    p.add_argument("--settle-timeout", type=float, default=30.0, help="seconds to wait for every slot to be free")
    p.add_argument(
        "--max-rss-growth", type=float, default=5.0, help="fail when RSS grows more than this %% after warm-up"
    )
    p.add_argument("--out", type=Path, default=Path("runs/soak"), help="directory for soak.json and soak.png")
    p.add_argument("--seed", type=int, default=0, help="seed of the churn")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--note", default="", help="free text stored in soak.json and shown on the plot (e.g. the box)")


def add_checkpoint_flags(p: argparse.ArgumentParser) -> None:
    """Flags of ``cellserve bench checkpoint``."""
    add_server_flag(p)
    p.add_argument("--model-dir", type=Path, default=None, help="model served when the bench starts the server")
    p.add_argument("--model", default="", help="model name on the server ('' = its default)")
    p.add_argument("--every", default="1,8,64", help="checkpoint_every settings to compare with off (0)")
    p.add_argument("--streams", type=int, default=16, help="concurrent SDK sessions")
    p.add_argument("-T", "--steps-per-message", dest="t", type=int, default=1, help="steps per message (chunk T)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over every setting (changing order; median)")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per setting and round")
    p.add_argument("--messages", type=int, default=0, help="messages per setting and round (overrides --duration)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of unmeasured load before each measurement")
    p.add_argument("--procs", type=int, default=0, help="client processes (0 = min(streams, 2))")
    p.add_argument("--out", type=Path, default=Path("runs/bench-checkpoint"), help="directory for checkpoint.json")
    p.add_argument("--serve-arg", action="append", default=[], metavar="FLAG", help="extra flag for the started server")
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bar (none anyway when stderr is not a terminal)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
