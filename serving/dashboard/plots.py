"""Server-rendered charts (matplotlib, Agg): PNG bytes the pages inline as ``data:`` URLs,
so no page loads anything from elsewhere (the dashboard works offline)."""

from __future__ import annotations

import base64
import io
import threading
from typing import Any

from serving.dashboard.data import METRICS, RATE_METRICS

_LOCK = threading.Lock()  # pyplot's state is global: one figure at a time


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def variant_metrics(report: dict[str, Any]) -> str | None:
    """One panel per metric: each variant's value with its interval."""
    variants = report["variants"]
    if not variants:
        return None
    with _LOCK:
        plt = _pyplot()
        fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 2.8))
        names = [v["variant"] for v in variants]
        for ax, (m, label) in zip(axes, METRICS, strict=True):
            scale = 100.0 if m in RATE_METRICS else 1.0
            vals = [v["metrics"][m]["value"] * scale for v in variants]
            lo = [
                max(0.0, (v["metrics"][m]["value"] - v["metrics"][m]["lo"]) * scale)
                for v in variants
            ]
            hi = [
                max(0.0, (v["metrics"][m]["hi"] - v["metrics"][m]["value"]) * scale)
                for v in variants
            ]
            ax.bar(names, vals, yerr=[lo, hi], capsize=4, color="#4477aa")
            ax.set_title(label + (" (%)" if m in RATE_METRICS else ""), fontsize=9)
            ax.tick_params(labelsize=8)
        fig.tight_layout()
        return _png(fig)


def daily(series: dict[str, list[dict[str, Any]]]) -> str | None:
    """CTR and revenue per day, one line per variant."""
    if not series:
        return None
    with _LOCK:
        plt = _pyplot()
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 2.8))
        # days as positions (not parsed as dates or categories): every variant on one axis
        days = sorted({r["day"] for rows in series.values() for r in rows})
        pos = {d: i for i, d in enumerate(days)}
        for variant, rows in series.items():
            xs = [pos[r["day"]] for r in rows]
            ctr = [float("nan") if r["ctr"] is None else 100 * r["ctr"] for r in rows]
            a.plot(xs, ctr, marker="o", label=variant)
            b.plot(xs, [r["revenue"] for r in rows], marker="o", label=variant)
        for ax in (a, b):
            ax.set_xticks(range(len(days)), days)
        a.set_title("CTR per day (%)", fontsize=9)
        b.set_title("revenue per day", fontsize=9)
        for ax in (a, b):
            ax.tick_params(labelsize=7, axis="x", rotation=45)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return _png(fig)


def segment_sizes(rows: list[dict[str, Any]], title: str) -> str | None:
    """Previous and current size of each segment, side by side."""
    if not rows:
        return None
    with _LOCK:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.0))
        ys = list(range(len(rows)))
        ax.barh(
            [y + 0.2 for y in ys],
            [r["previous"] for r in rows],
            0.4,
            label="previous",
            color="#bbbbbb",
        )
        ax.barh(
            [y - 0.2 for y in ys],
            [r["current"] for r in rows],
            0.4,
            label="current",
            color="#4477aa",
        )
        ax.set_yticks(ys, [r["segment"] for r in rows], fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        return _png(fig)
