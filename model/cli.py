"""``cellserve train``, ``cellserve export``, ``cellserve import-onnx`` and ``cellserve generate``.

Nothing heavy is imported here at module level (no torch, no onnxruntime): ``cellserve --help`` must work
in a torch-free install. Each handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cellserve.model.conformance import CheckedGraph
    from cellserve.model.manifest import Manifest

from cellserve.cli_help import add_command, fail

log = logging.getLogger(__name__)

TRAIN_HELP = {
    "layers": "LSTM layers",
    "hidden": "hidden size H of each layer",
    "embed": "byte-embedding width",
    "batch": "parallel training streams (rows per step)",
    "bptt": "truncated-BPTT window in bytes; h/c are carried across windows",
    "lr": "peak AdamW learning rate (100-step warm-up, cosine decay to 10%% over the budget)",
    "weight_decay": "AdamW weight decay",
    "clip": "gradient-norm clip",
    "minutes": "wall-clock budget of the training loop, in minutes",
    "max_steps": "stop after this many steps (0 = only the budget decides)",
    "eval_every_s": "seconds between validation evaluations",
    "val_bytes": "bytes of the val split scored at each evaluation",
    "test_bytes": "bytes of the test split scored at the end (0 = all of it)",
    "max_train_bytes": "use only this prefix of the train split (0 = all of it)",
    "seed": "random seed (weights init)",
    "device": "cpu or cuda",
    "threads": "torch intra-op threads (0 = torch's default)",
}


def _default_model_dir() -> Path:
    return Path(__file__).resolve().parent / "default"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``train``, ``export``, ``import-onnx`` and ``generate`` to the ``cellserve`` command."""
    from cellserve.model.train_config import TrainConfig

    summary = "train the byte-level LSTM on the stdlib's .py sources (needs the train extra: torch)"
    p = add_command(subparsers, "train", _train, summary)
    p.add_argument("--data-dir", type=Path, default=None, help="directory of .py files (default: this Python's stdlib)")
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output directory")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="continue training from this checkpoint (same architecture flags; see `cellserve.model.train`)",
    )
    for f in dataclasses.fields(TrainConfig):
        kw: dict = {"type": type(f.default), "default": f.default, "help": TRAIN_HELP[f.name]}
        if f.name == "device":
            kw["choices"] = ["cpu", "cuda"]
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)

    summary = "export a checkpoint to ONNX + manifest.json, parity-checked (needs the train extra)"
    p = add_command(subparsers, "export", _export, summary)
    p.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt written by `cellserve train`")
    p.add_argument("--out", type=Path, required=True, help="model directory to write")
    p.add_argument("--name", default="pychar", help="model name (what clients ask for)")
    p.add_argument("--version", dest="model_version", default="1", help="model version")

    summary = "check a stateful ONNX model against the serving contract and write a model directory (no torch)"
    p = add_command(
        subparsers,
        "import-onnx",
        _import_onnx,
        summary,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # its flags state their own defaults
        epilog="Exit status: 0 when the model directory is written; 2 when the graph is refused, with one line on\n"
        "stderr naming the problem and what to do (nothing is written then). Needs onnxruntime and numpy only\n"
        "(no torch, no onnx package).",
    )
    p.add_argument("model", type=Path, metavar="MODEL.onnx", help="the ONNX file to import")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="model directory to write (made if missing)")
    p.add_argument("--name", required=True, help="model name (what clients ask for)")
    p.add_argument("--version", dest="model_version", default="1", help="model version (default: %(default)s)")
    p.add_argument(
        "--input", default=None, metavar="NAME", help="graph input that is x, the per-step input (default: detected)"
    )
    p.add_argument(
        "--state",
        action="append",
        default=None,
        metavar="IN:OUT[:BATCH_AXIS]",
        help="a state input, the graph output that is its next value, and optionally the state's batch axis; "
        "repeat once per state (--state h0:hn --state c0:cn); default: paired by name (h0->hn, state->stateN, "
        "cache->new_cache, *_in->*_out, past_*->present_* ...) or by a unique matching shape, the batch axis being "
        "the dynamic axis the state shares with x's batch",
    )
    p.add_argument(
        "--output", default=None, metavar="NAME", help="graph output that is y (default: detected; other graph "
        "outputs that are not a next state are not returned)",
    )  # fmt: skip
    p.add_argument(
        "--const",
        action="append",
        default=None,
        metavar="NAME=VALUE",
        help="a constant input's value, fed on every call: a scalar or a short comma list typed by the input's "
        "dtype (--const sr=16000); every graph input that is neither x nor a state needs one",
    )
    p.add_argument(
        "--batch-axis",
        type=int,
        default=None,
        metavar="AXIS",
        help="batch axis of every state whose batch axis cannot be told (no dynamic axis shared with x's batch, "
        "and more than one open dim); --state IN:OUT:AXIS sets one state's",
    )
    frame = p.add_mutually_exclusive_group()
    frame.add_argument(
        "--per-frame",
        dest="per_frame",
        action="store_const",
        const=True,
        default=None,
        help="x has no time axis: one frame [B, *frame] per call (default: detected from x's and y's axis 1)",
    )
    frame.add_argument(
        "--time-axis", dest="per_frame", action="store_const", const=False, help="x's axis 1 is time: [B, T, *frame]"
    )
    p.add_argument(
        "--vocab",
        type=int,
        default=None,
        metavar="N",
        help="token models: vocabulary size (ids 0..N-1); default: probed from where the graph rejects an id",
    )

    summary = "generate text from a byte-level model (offline with onnxruntime, or from a server)"
    p = add_command(subparsers, "generate", _generate, summary)
    p.add_argument("--model-dir", type=Path, default=None, help="exported model directory (default: shipped model)")
    p.add_argument("--prompt", default="def ", help="text to continue")
    p.add_argument(
        "--max-bytes",
        type=_positive_int,
        default=200,
        help="bytes to generate, >= 1 (a server also caps it at its --max-generate-tokens)",
    )
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample only among the k most likely bytes (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same text)")
    from cellserve.client.cli import add_connection_flags  # argparse only: nothing heavy

    add_connection_flags(p, server_default=None, server_help="generate on a cellserve server instead", timeout=False)
    p.add_argument("--model", default="", help="model name on the server (with --server; default: its default)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


TRAIN_EXTRA = "install the train extra (torch, onnx): pip install 'cellserve[train]' (in a checkout: make install-dev)"


def _needs_train_extra(command: str, e: ImportError) -> int:
    return fail(command, f"needs {e.name or 'torch'}, which this install lacks; {TRAIN_EXTRA}")


def _train(args: argparse.Namespace) -> int:
    """Train with truncated BPTT (h/c carried across windows); writes checkpoint.pt, metrics.json,
    training_curve.png into --out."""
    try:
        from cellserve.model.data import DataError
        from cellserve.model.train import train
    except ImportError as e:
        return _needs_train_extra("train", e)
    from cellserve.model.train_config import TrainConfig

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    try:
        metrics = train(cfg, args.out, data_dir=args.data_dir, init_from=args.init_from)
    except (DataError, ValueError, FileNotFoundError) as e:
        return fail("train", str(e))
    held = metrics["held_out"]
    print(json.dumps({"out": str(args.out), "held_out_bpb": round(held["model_bpb"], 4),
                      "gzip_9_bpb": round(held["gzip_9_bpb"], 4), "xz_9_bpb": round(held["xz_9_bpb"], 4)}))  # fmt: skip
    return 0


def _export(args: argparse.Namespace) -> int:
    """Export to DIR/model.onnx with a parity check against torch; writes DIR/manifest.json and copies
    metrics.json / training_curve.png found beside the checkpoint."""
    try:
        from cellserve.model.export import export_onnx
        from cellserve.model.model import load_checkpoint
    except ImportError as e:
        return _needs_train_extra("export", e)

    try:
        model, payload = load_checkpoint(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        return fail("export", str(e))
    training = payload.get("training") or {}
    manifest = export_onnx(model, args.out, name=args.name, version=args.model_version, training=training)
    for extra in ("metrics.json", "training_curve.png"):
        src = args.checkpoint.parent / extra
        if src.is_file() and src.resolve() != (args.out / extra).resolve():
            shutil.copyfile(src, args.out / extra)
    print(json.dumps({"out": str(args.out), "name": manifest.name, "sha256": manifest.sha256,
                      "parity_max_scaled_diff": manifest.training["parity_max_scaled_diff"]}))  # fmt: skip
    return 0


def _import_onnx(args: argparse.Namespace) -> int:
    """Check MODEL.onnx against the serving contract and write DIR/model.onnx and DIR/manifest.json for
    `cellserve serve --model-dirs DIR`.

    The contract: one per-step input x (int64 token ids, float32 or float16), [B, T, *frame] with a time axis or
    [B, *frame] for a per-frame model; one or more state pairs IN -> OUT (float32 or float16, any fixed shape with
    one batch axis anywhere, zeros to start); constant inputs, given with --const; one output y, [B, T, *out] or
    [B, *out]. A graph whose batch is fixed at 1 is served with batch-1 calls.

    What the flags do not say is detected and printed: state pairs by name and shape, each state's batch axis,
    whether x has a time axis, and dims the graph leaves undeclared (learned by running it; a frame dim it leaves
    dynamic stays dynamic). Before writing, it runs the graph at B in {1, 3} (and several T), checks that every
    state is used, that rows of a batch are independent (per-frame models: frames run one by one equal them
    interleaved with other sessions'), and, with a time axis, that a sequence run in random chunks, state carried,
    equals it run whole."""
    # A refusal is one line on stderr and exit status 2, never a traceback.
    try:
        from cellserve.model.contract import ContractError, RoleHints
        from cellserve.model.importer import import_onnx
    except ImportError as e:
        return fail("import-onnx", f"needs onnxruntime and numpy ({e}); install cellserve[serve]")
    try:
        consts = tuple(RoleHints.parse_const(c) for c in args.const or ())
        hints = RoleHints(args.input, tuple(args.state or ()), args.output, consts, args.batch_axis, args.per_frame)
        manifest, checked = import_onnx(
            args.model, args.out, name=args.name, hints=hints, vocab=args.vocab, version=args.model_version
        )
    except ContractError as e:
        return fail("import-onnx", f"cannot import {args.model}: {e}")
    except OSError as e:
        return fail("import-onnx", f"{e.strerror or e}: {e.filename or args.out}")
    for line in describe_import(manifest, checked, args.out):
        print(line)
    return 0


def _dims(shape: tuple[int | str | None, ...], prefix: str) -> list[str]:
    return [prefix + (str(i) if sum(d is None for d in shape) > 1 else "") if d is None else str(d)
            for i, d in enumerate(shape)]  # fmt: skip


def describe_import(manifest: Manifest, checked: CheckedGraph, out_dir: Path) -> list[str]:
    """What ``import-onnx`` found and checked, for people: each role (and how it was found), the checks, result."""
    r, how, x = checked.roles, checked.detected, checked.input
    flagged = all(how.get(k) == "flag" for k in ("input", "output", *(i for i, _ in r.states)))
    lead = ["1" if checked.fixed_batch == 1 else "B", *(["T"] if x.time_axis else [])]
    shape = "[" + ", ".join([*lead, *_dims(x.frame, "N")]) + "]"
    if x.vocab is not None:
        what = f"token ids, vocabulary {x.vocab} ({checked.vocab_source})"
    else:
        what = "time axis" if x.time_axis else "one frame per call, no time axis"
    notes = [how["time_axis"], *([how["frame"]] if "frame" in how else [])]
    y = checked.output
    y_shape = "[" + ", ".join([*lead, *_dims(y.frame, "M")]) + "]"
    lines = [
        "roles (from flags):"
        if flagged
        else "detected (set any of it with --input/--state/--output/--const/--batch-axis/--per-frame):",
        f"  input    {x.name}: {x.dtype} {shape}, {what}  [{how['input']}; {'; '.join(notes)}]",
    ]
    for s in checked.states:
        dims = "[" + ", ".join(str(d) for d in s.shape) + "]"
        lines.append(f"  state    {s.input} -> {s.output}: {s.dtype} {dims}, batch axis {s.batch_axis}  "
                     f"[{how[s.input]}; axis: {how['axis:' + s.input]}]")  # fmt: skip
    for c in checked.consts:
        value = c.value[0] if not c.shape else list(c.value)
        lines.append(f"  const    {c.name}: {c.dtype} {list(c.shape)} = {value}  [flag]")
    lines.append(f"  output   {y.name}: {y.dtype} {y_shape}  [{how['output']}]")
    lines += [f"  ignored  {n}: a graph output that is neither y nor a next state, not returned" for n in r.ignored]
    fixed = checked.fixed_batch == 1
    lines.append("  batch    " + ("fixed at 1: served by batch-1 calls, one session per call" if fixed else
                                  "dynamic: sessions share batched calls"))  # fmt: skip
    report = checked.report
    tol = f"{report['tolerance']:g}"
    if x.time_axis:
        runs = "(B, T) in " + " ".join("(" + ",".join(map(str, run)) + ")" for run in report["runs"])
    else:
        runs = "B = " + ", ".join(str(run[0]) for run in report["runs"])
    checks = [f"runs at {runs}", "every state used"]
    if fixed:
        checks.append("batch checks skipped (batch fixed at 1)")
    elif x.time_axis:
        checks.append(f"batch rows independent (max scaled diff {report['batch_rows_max_scaled_diff']:.2g})")
    else:
        checks.append(f"frames one by one == interleaved with other sessions at B=3 (max scaled diff "
                      f"{report['interleaved_max_scaled_diff']:.2g})")  # fmt: skip
    if x.time_axis:
        checks.append(f"chunked == whole (chunks {report['chunks']}, max scaled diff "
                      f"{report['chunked_max_scaled_diff']:.2g})")  # fmt: skip
    lines += [
        f"checks passed (tolerance {tol}): " + "; ".join(checks),
        f"wrote model {manifest.name!r} to {out_dir}/ ({manifest.onnx_file} sha256 {manifest.sha256[:16]}…, "
        f"manifest.json); serve it with: cellserve serve --model-dirs {out_dir}",
    ]
    return lines


def _generate(args: argparse.Namespace) -> int:
    if args.server:
        from cellserve.client.cli import remote_generate

        return remote_generate(args)
    remote_only = [f"--{k.replace('_', '-')}" for k in ("token", "tls_root_cert", "tls_client_cert", "tls_client_key",
                                                         "tls_server_name") if getattr(args, k)]  # fmt: skip
    if remote_only:
        flags = ", ".join(remote_only)
        return fail("generate", f"{flags} apply to a server: add --server HOST:PORT, or drop them to run offline")
    from cellserve.model.generate import Generator
    from cellserve.model.manifest import ManifestError

    try:
        gen = Generator(args.model_dir or _default_model_dir())
        tokens = gen.generate(
            args.prompt, max_bytes=args.max_bytes, temperature=args.temperature, top_k=args.top_k, seed=args.seed
        )
        out = sys.stdout.buffer
        out.write(args.prompt.encode("utf-8"))
        out.flush()
        for token in tokens:
            out.write(bytes([token]))
            out.flush()
        out.write(b"\n")
        out.flush()
    except (ManifestError, ValueError) as e:
        return fail("generate", str(e))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cellserve.model.cli``: the model subcommands alone (same handlers as ``cellserve``)."""
    parser = argparse.ArgumentParser(prog="cellserve-model", description="cellserve model commands")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: %(default)s)")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
