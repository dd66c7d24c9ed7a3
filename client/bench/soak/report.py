"""The soak report: summary and pass/fail checks from the samples, a table, JSON, and a PNG."""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cellserve.client.bench.report import run_meta
from cellserve.client.model_info import ModelInfo

if TYPE_CHECKING:
    from cellserve.client.bench.soak.churn import Tally

MB = 2**20


def _pct(a: array | list[float], qs: tuple[float, ...] = (50, 99)) -> dict[str, float | None]:
    if len(a) == 0:
        return {f"p{q:g}": None for q in qs}
    values = np.percentile(np.asarray(a, dtype=np.float64) * 1000, qs)
    return {f"p{q:g}": round(float(v), 3) for q, v in zip(qs, values, strict=True)}


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    keys = set(after) | set(before)
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted(keys) if after.get(k, 0.0) != before.get(k, 0.0)}


def rss_summary(samples: list[dict[str, Any]], max_growth_pct: float) -> dict[str, Any]:
    """RSS at the first sample after warm-up vs the last one under load, growth %, slope, max."""
    under_load = [s for s in samples if s["phase"] in ("warmup", "soak") and s["rss_bytes"]]
    after = [s for s in under_load if s["phase"] == "soak"] or under_load
    settled = [s for s in samples if s["phase"] == "settled" and s["rss_bytes"]]
    if not after:
        return {"measured": False, "growth_pct": None, "ok": False, "why": "the server reported no RSS"}
    base, end = after[0]["rss_bytes"], after[-1]["rss_bytes"]
    growth = 100.0 * (end - base) / base
    slope = None
    if len(after) >= 3:
        t = np.array([s["t_s"] for s in after]) / 60.0
        slope = float(np.polyfit(t, np.array([s["rss_bytes"] for s in after]) / MB, 1)[0])
    return {
        "measured": True,
        "baseline_t_s": after[0]["t_s"],
        "baseline_mb": round(base / MB, 2),
        "end_t_s": after[-1]["t_s"],
        "end_mb": round(end / MB, 2),
        "growth_pct": round(growth, 3),
        "max_after_warmup_mb": round(max(s["rss_bytes"] for s in after) / MB, 2),
        "first_sample_mb": round(under_load[0]["rss_bytes"] / MB, 2),
        "settled_mb": round(settled[-1]["rss_bytes"] / MB, 2) if settled else None,
        "slope_mb_per_min_after_warmup": round(slope, 4) if slope is not None else None,
        "max_growth_pct": max_growth_pct,
        "ok": growth <= max_growth_pct,
    }


def build_report(
    *,
    plan: dict[str, Any],
    info: ModelInfo,
    server: str,
    samples: list[dict[str, Any]],
    latencies: array,
    tally: Tally,
    end: dict[str, Any],
    note: str = "",
) -> dict[str, Any]:
    """soak.json: meta, settings, samples, summary and checks."""
    before = end["before"]
    last = samples[-1]
    warmup_s = plan["duration_s"] * plan["warmup_fraction"]
    post = array("d")
    # the windows after warm-up: recomputed from the per-sample counts, in order
    start = sum(s["latency_ms"]["n"] for s in samples if s["phase"] == "warmup")
    post.extend(latencies[start:])
    injected_sent, injected_ok = sum(tally.injected_sent.values()), sum(tally.injected_expected.values())
    unexpected = sum(tally.unexpected.values())
    rss = rss_summary(samples, plan["max_rss_growth_pct"])
    used = [s["slots_used"] for s in samples if s["slots_used"] is not None]
    summary = {
        "rss": rss,
        "max_slots_used_sampled": max(used) if used else None,
        "slots_used_end": last["slots_used"],
        "sessions_active_end": last["sessions_active"],
        "settle_s": end["settle_s"],
        "sessions": tally.sessions(),
        "messages": tally.counts["messages"],
        "steps": tally.counts["steps"],
        "injected": {
            "sent": injected_sent,
            "answered_invalid_argument": injected_ok,
            "by_kind": {
                k: {"sent": v, "invalid_argument": tally.injected_expected[k]}
                for k, v in sorted(tally.injected_sent.items())
            },
        },
        "unexpected": {"total": unexpected, "by_kind": dict(tally.unexpected), "examples": tally.examples},
        "latency_ms": {"all": _pct(latencies), "after_warmup": _pct(post)},
        "server_counters": {
            "opened": (last["opened_total"] or 0) - (before["opened_total"] or 0),
            "closed_by_reason": _delta(last["closed_total"], before["closed_total"]),
            "errors_by_code": _delta(last["errors_total"], before["errors_total"]),
            "steps": (last["steps_total"] or 0) - (before["steps_total"] or 0),
        },
    }
    checks = {
        "no_unexpected_errors": {"ok": unexpected == 0, "value": unexpected},
        "injected_all_invalid_argument": {
            "ok": injected_ok == injected_sent,
            "value": f"{injected_ok}/{injected_sent}",
        },
        "slots_all_free_at_end": {"ok": bool(end["freed"]), "value": last["slots_used"]},
        "rss_growth_after_warmup": {
            "ok": bool(rss["ok"]),
            "value": rss["growth_pct"],
            "max": plan["max_rss_growth_pct"],
        },
    }
    return {
        "meta": {
            **run_meta(info, server, "cellserve bench soak"),
            "note": note,
        },
        "settings": {**plan, "warmup_s": warmup_s},
        "samples": samples,
        "summary": summary,
        "checks": checks,
        "passed": all(c["ok"] for c in checks.values()),
    }


def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def summary_table(report: dict[str, Any]) -> str:
    """A short plain-text summary: the figures and each check."""
    s, settings = report["summary"], report["settings"]
    rss, lat, sess = s["rss"], s["latency_ms"], s["sessions"]
    rows = [
        (
            "duration",
            f"{settings['duration_s']:.0f} s, {settings['workers']} workers, warm-up {settings['warmup_s']:.0f} s",
        ),
        (
            "server RSS",
            f"{_f(rss.get('baseline_mb'))} MB after warm-up -> {_f(rss.get('end_mb'))} MB at end "
            f"({_f(rss.get('growth_pct'), '+.2f')} %), "
            f"slope {_f(rss.get('slope_mb_per_min_after_warmup'), '+.3f')} MB/min",
        ),
        (
            "slots",
            f"max {_f(s['max_slots_used_sampled'], '.0f')} used (sampled), {_f(s['slots_used_end'], '.0f')} "
            f"used at end (settled in {s['settle_s']:.2f} s)",
        ),
        (
            "sessions",
            f"{sess['opened']} opened, {sess['closed']} closed, {sess['dropped']} dropped "
            f"({sess['dropped_mid_step']} mid-step)",
        ),
        ("messages", f"{s['messages']} ({s['steps']} steps)"),
        (
            "injected",
            f"{s['injected']['sent']} bad steps, {s['injected']['answered_invalid_argument']} "
            "answered INVALID_ARGUMENT",
        ),
        ("unexpected", f"{s['unexpected']['total']} {s['unexpected']['by_kind'] or ''}"),
        ("latency", f"p50 {_f(lat['after_warmup']['p50'])} ms, p99 {_f(lat['after_warmup']['p99'])} ms after warm-up"),
    ]
    lines = [f"{k:>11}  {v}" for k, v in rows]
    lines += [
        f"{'check':>11}  {'PASS' if c['ok'] else 'FAIL'} {name} ({c['value']})" for name, c in report["checks"].items()
    ]
    return "\n".join(lines)


def print_summary(report: dict[str, Any]) -> None:
    print(summary_table(report))


def write_png(report: dict[str, Any], path: Path) -> bool:
    """RSS, used slots and p50/p99 latency over time, warm-up shaded. False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    samples = [s for s in report["samples"] if s["phase"] != "settled"]
    settled = [s for s in report["samples"] if s["phase"] == "settled"]
    t = [s["t_s"] / 60 for s in samples]
    warm = report["settings"]["warmup_s"] / 60
    fig, axes = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    rss = report["summary"]["rss"]
    axes[0].plot(t, [(s["rss_bytes"] or float("nan")) / MB for s in samples], "-", color="C0")
    axes[0].set_ylabel("server RSS (MB)")
    growth = rss.get("growth_pct")
    axes[0].set_title(f"RSS growth after warm-up {_f(growth, '+.2f')} % (limit {rss.get('max_growth_pct')} %)")
    axes[1].plot(t, [s["slots_used"] for s in samples], "-", color="C1", label="slots used")
    axes[1].plot(t, [s["sessions_active"] for s in samples], ":", color="C2", label="sessions active")
    if settled:
        axes[1].plot(
            [settled[-1]["t_s"] / 60], [settled[-1]["slots_used"]], "o", color="C3", label="after stop (settled)"
        )
    axes[1].set_ylabel("state slots")
    axes[1].legend(fontsize=8)
    for key, style in (("p50", "-"), ("p99", "--")):
        axes[2].plot(t, [s["latency_ms"][key] or float("nan") for s in samples], style, label=key)
    axes[2].set_yscale("log")
    axes[2].set_ylabel("step round trip (ms)")
    axes[2].set_xlabel("minutes")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.axvspan(0, warm, color="0.9", zorder=0)
        ax.axvline(warm, color="0.5", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    meta, st = report["meta"], report["settings"]
    fig.suptitle(
        f"cellserve soak: {meta['model']['name']}, {st['workers']} workers, {st['duration_s'] / 60:.1f} min"
        f" (warm-up shaded){' — ' + meta['note'] if meta['note'] else ''}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
