"""HTML segment report with inline PNG plots (matplotlib, Agg backend).

Sections: behavioural segment sizes and profiles, a 2-D map of the customers coloured
by segment (PCA of the embeddings), the RFM heatmap (customers and mean spend per R x F
score), churn rate by behavioural and RFM segment, and calibration and lift charts of
the churn / high-value models evaluated on the held-out cutoff.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from segments.churn import Predictions, binary_metrics, calibration_curve
from segments.export import ScoredCustomers
from segments.rfm import SEGMENTS

log = logging.getLogger(__name__)


def _fig_png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pca_2d(x: np.ndarray) -> np.ndarray:
    """(n, 2) projection on the first two principal components."""
    z = x.astype(np.float64) - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(z, full_matrices=False)
    return np.asarray(z @ vt[:2].T)


def plot_sizes(scored: ScoredCustomers) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [f"{p['segment']}: {p['name']}" for p in scored.profiles]
    ax.barh(names[::-1], [p["size"] for p in scored.profiles][::-1], color="#4c72b0")
    ax.set_xlabel("customers")
    ax.set_title("Behavioural segment sizes")
    return _fig_png(fig)


def plot_map(scored: ScoredCustomers, max_points: int = 4000, seed: int = 0) -> str:
    plt = _plt()
    xy = pca_2d(scored.embeddings)
    seg = scored.table["segment_id"].to_numpy()
    idx = np.arange(len(xy))
    if len(idx) > max_points:
        idx = np.random.default_rng(seed).choice(idx, max_points, replace=False)
    fig, ax = plt.subplots(figsize=(6.5, 5))
    cmap = plt.get_cmap("tab10")
    for j, s in enumerate(sorted(set(seg.tolist()))):
        m = idx[seg[idx] == s]
        ax.scatter(xy[m, 0], xy[m, 1], s=5, alpha=0.6, color=cmap(j % 10), label=str(s))
    ax.legend(title="segment", markerscale=3, fontsize=8)
    ax.set_title("Customers (PCA of user embeddings)")
    ax.set_xticks([])
    ax.set_yticks([])
    return _fig_png(fig)


def rfm_grid(table: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(5, 5) customer counts and mean monetary per (R score row, F score column)."""
    cnt = np.zeros((5, 5))
    mon = np.full((5, 5), np.nan)
    g = table.group_by("r_score", "f_score").agg(pl.len(), pl.col("monetary").mean())
    for r, f, n, m in g.iter_rows():
        cnt[int(r) - 1, int(f) - 1] = n
        mon[int(r) - 1, int(f) - 1] = m
    return cnt, mon


def plot_rfm_heatmap(table: pl.DataFrame) -> str:
    plt = _plt()
    cnt, mon = rfm_grid(table)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    im = ax.imshow(np.nan_to_num(mon), origin="lower", cmap="viridis")
    for r in range(5):
        for f in range(5):
            ax.text(f, r, f"{int(cnt[r, f])}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(5), [str(i) for i in range(1, 6)])
    ax.set_yticks(range(5), [str(i) for i in range(1, 6)])
    ax.set_xlabel("F score")
    ax.set_ylabel("R score")
    ax.set_title("RFM: customers (numbers), mean spend (colour)")
    fig.colorbar(im, ax=ax, label="mean monetary")
    return _fig_png(fig)


def plot_churn_by_segment(scored: ScoredCustomers) -> str:
    plt = _plt()
    t = scored.table
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    g = t.group_by("segment_id").agg(pl.col("churn_probability").mean()).sort("segment_id")
    axes[0].bar(
        [str(s) for s in g["segment_id"].to_list()],
        g["churn_probability"].to_numpy(),
        color="#dd8452",
    )
    axes[0].set_title("Predicted churn by behavioural segment")
    axes[0].set_xlabel("segment id")
    g2 = t.group_by("rfm_segment").agg(pl.col("churn_probability").mean())
    order = [s for s in SEGMENTS if s in set(g2["rfm_segment"].to_list())]
    d = dict(g2.iter_rows())
    axes[1].barh(order[::-1], [d[s] for s in order][::-1], color="#55a868")
    axes[1].set_title("Predicted churn by RFM segment")
    return _fig_png(fig)


def plot_calibration_and_lift(y: np.ndarray, preds: dict[str, np.ndarray], task: str) -> str:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([0, 1], [0, 1], "k--", lw=0.8)
    for name, p in preds.items():
        c = calibration_curve(y, p)
        axes[0].plot(c["predicted"], c["observed"], "o-", ms=3, label=name)
    axes[0].set_xlabel("predicted probability")
    axes[0].set_ylabel("observed rate")
    axes[0].set_title(f"Calibration: {task}")
    axes[0].legend()
    frac = np.linspace(0.01, 1.0, 100)
    for name, p in preds.items():
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(y[order]) / max(y.sum(), 1)
        gains = cum[np.maximum((frac * len(y)).astype(int) - 1, 0)]
        axes[1].plot(frac, gains, label=name)
    axes[1].plot([0, 1], [0, 1], "k--", lw=0.8)
    axes[1].set_xlabel("share of customers targeted")
    axes[1].set_ylabel("share of positives reached")
    axes[1].set_title(f"Cumulative gains (lift): {task}")
    axes[1].legend()
    return _fig_png(fig)


def _table_html(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            if isinstance(v, float):
                v = f"{v:.4g}"
            elif isinstance(v, list):
                v = ", ".join(str(x) for x in v)
            cells.append(f"<td>{html.escape(str(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


SPEND_NAMES = {
    "gbdt": "GBDT regressor (RFM features)",
    "last_window": "same as the last {h} days",
    "bgnbd": "BG/NBD x Gamma-Gamma",
}


def _spend_section(
    spend: dict[str, Any], h: int, currency: str | None, in_use: dict[str, Any]
) -> list[str]:
    """The predicted spend's errors on the held-out cutoff and the method in use."""
    from segments.tables import money

    chosen = (spend.get("chosen") or {}).get("method")
    rows = []
    for m, e in spend.items():
        if m == "chosen" or not isinstance(e, dict):
            continue
        rows.append(
            {
                "method": SPEND_NAMES.get(m, m).format(h=h)
                + (" (chosen on validation)" if m == chosen else ""),
                "MAE": money(e["mae"], currency),
                "RMSE": money(e["rmse"], currency),
                "total predicted": money(e["predicted_total"], currency),
                "total actual": money(e["actual_total"], currency),
                "error on total": f"{100 * e['total_error']:+.1f} %",
            }
        )
    valid = (spend.get("chosen") or {}).get("valid") or {}
    why = ", ".join(
        f"{SPEND_NAMES.get(m, m).format(h=h)} {money(e['mae'], currency)}" for m, e in valid.items()
    )
    now = in_use.get("method")
    now_valid = in_use.get("valid") or {}
    now_why = ", ".join(
        f"{SPEND_NAMES.get(m, m).format(h=h)} {money(e['mae'], currency)}"
        for m, e in now_valid.items()
    )
    text = (
        f"Error of each method against the actual spend in the {h} days after the held-out "
        "cutoff (per customer: MAE, RMSE; and on the total). Between the GBDT regressor and "
        f"'same as the last {h} days' the one with the lower MAE on the window before is "
        f"chosen (validation, never the held-out window; MAE there: {why})."
    )
    if now:
        text += (
            f" The customer scores (predicted_spend) use the same rule one window later: "
            f"{SPEND_NAMES.get(now, now).format(h=h)} (MAE on the latest observed window: "
            f"{now_why})."
        )
    return [
        f"<h2>Predicted spend in the next {h} days</h2>",
        f"<p class='cap'>{html.escape(text)}</p>",
        _table_html(
            rows,
            ["method", "MAE", "RMSE", "total predicted", "total actual", "error on total"],
        ),
    ]


def write_report(
    out_dir: str | Path,
    scored: ScoredCustomers,
    evaluation: dict[str, tuple[np.ndarray, dict[str, Predictions]]] | None = None,
    title: str = "ecomrec customer segments",
    *,
    cutoffs: tuple[int, int] | None = None,
    horizon_days: int | None = None,
    currency: str | None = None,
    spend_check: dict[str, Any] | None = None,
) -> Path:
    """Write ``report.html`` (self-contained, inline PNGs) into ``out_dir``; returns its path.

    ``evaluation`` maps a task (``churn``/``high_value``) to (labels at the held-out cutoff,
    {model name: predictions}) for the calibration and lift charts and the metric table.
    The header states the as-of date, the (train, test) ``cutoffs``, the horizon and the
    currency (``None``: amounts without a unit); every chart has a line saying how to read
    it; shares are percentages. ``spend_check`` (``Comparison.spend``) adds the predicted
    spend's errors on the held-out cutoff and which method the scores use.
    """
    from segments.tables import money

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def day(ts: int) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).date().isoformat()

    h = scored.cfg.churn.horizon_days if horizon_days is None else horizon_days
    facts = [
        f"As of <b>{day(scored.now_ts)}</b> 00:00 UTC (data up to {day(scored.now_ts - 1)} "
        "inclusive; all dates UTC).",
        f"Horizon <b>{h} days</b>: <i>churn</i> = no purchase in the {h} days after a cutoff, "
        f"<i>high value</i> = spend in those {h} days in the top quintile.",
    ]
    if cutoffs:
        facts.append(
            f"Models trained at the cutoff <b>{day(cutoffs[0])}</b> and checked at "
            f"<b>{day(cutoffs[1])}</b> (outcomes known up to the as-of date)."
        )
    if currency:
        facts.append(f"Amounts (monetary, spend) in {html.escape(currency)}.")
    else:
        facts.append("Amounts (monetary, spend) in the shop's currency (not set).")
    unit = currency or "the shop's currency"
    profiles = [
        {
            **p,
            **{
                k: f"{100 * float(p[k]):.1f} %"
                for k in ("share", "churn_rate")
                if isinstance(p.get(k), int | float)
            },
            **(
                {"mean_monetary": money(p["mean_monetary"], currency)}
                if isinstance(p.get("mean_monetary"), int | float)
                else {}
            ),
            **(
                {"mean_recency_days": f"{float(p['mean_recency_days']):.1f}"}
                if isinstance(p.get("mean_recency_days"), int | float)
                else {}
            ),
        }
        for p in scored.profiles
    ]

    def caption(text: str) -> str:
        return f"<p class='cap'>{html.escape(text)}</p>"

    parts = [
        f"<h1>{html.escape(title)}</h1>",
        "<p>" + " ".join(facts) + "</p>",
        f"<p>Model version <code>{html.escape(scored.model_version)}</code>, config hash "
        f"<code>{scored.config_hash}</code>, {scored.table.height:,} customers.</p>",
        "<h2>Behavioural segments</h2>",
        caption(
            "Customers grouped by what they buy (k-means on behaviour embeddings); share = "
            "percentage of all customers, churn_rate = percentage predicted to churn."
        ),
        _table_html(
            profiles,
            [
                "segment",
                "name",
                "size",
                "share",
                "churn_rate",
                "mean_monetary",
                "mean_recency_days",
                "price_tier",
                "top_rfm_segment",
                "top_products",
                "top_words",
            ],
        ),
        caption("Number of customers in each behavioural segment."),
        f'<img src="{plot_sizes(scored)}">',
        caption(
            "Each dot is a customer, placed by the first two principal components of their "
            "behaviour embedding; nearby customers buy alike."
        ),
        f'<img src="{plot_map(scored)}">',
        "<h2>RFM</h2>",
        caption(
            "Recency score (rows) by frequency score (columns), 5 = best: the number is "
            f"customers, the colour their mean spend in {unit}."
        ),
        f'<img src="{plot_rfm_heatmap(scored.table)}">',
        "<h2>Churn by segment</h2>",
        caption(
            f"Mean predicted probability of no purchase in the next {h} days, per "
            "behavioural and per RFM segment."
        ),
        f'<img src="{plot_churn_by_segment(scored)}">',
    ]
    if evaluation:
        parts.append("<h2>Models on the held-out cutoff</h2>")
        rows = []
        for task, (y, preds) in evaluation.items():
            for name, pr in preds.items():
                rows.append({"task": task, "model": name, **binary_metrics(y, pr.of(task))})
            parts.append(
                caption(
                    f"{task}: left, predicted probability against the observed rate (on the "
                    "diagonal = calibrated); right, share of positives reached when targeting "
                    "the top share of customers by score (higher = better)."
                )
                + f'<img src="{plot_calibration_and_lift(y, {n: p.of(task) for n, p in preds.items()}, task)}">'
            )
        parts.insert(
            -len(evaluation),
            _table_html(rows, ["task", "model", "roc_auc", "pr_auc", "brier", "lift@10"]),
        )
    if spend_check:
        parts += _spend_section(spend_check, h, currency, scored.spend_choice)
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px}"
        "img{max-width:100%;display:block;margin:8px 0}.cap{color:#444;margin:4px 0}"
    )
    doc = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    path = out / "report.html"
    path.write_text(doc)
    log.info("report written to %s", path)
    return path
