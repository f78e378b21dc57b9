"""Drift report of a refresh (JSON + HTML): what changed in the data and in the customers.

- share of new items / new customers among those active in the new data;
- embedding drift of returning customers: ``model`` = 1 - cos(live vector, candidate
  vector) on the same history (how far the refresh moved them), ``behaviour`` = 1 -
  cos(candidate vector before the new data, after it) (how far they moved themselves);
- segment migration matrices: RFM segments (quintile edges fitted at the previous
  cutoff, so scores are comparable) and behavioural segments (k-means on the live
  vectors at the previous cutoff, candidate vectors now assigned to those centroids);
- churn calibration of the candidate on the latest window (from the shadow evaluation).

Thresholds (``DriftThresholds``) turn into alerts; the refresh exits non-zero on any.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from lifecycle.shadow import user_vectors
from towers.model import TwoTower
from towers.sequences import Interactions


@dataclass(frozen=True)
class DriftThresholds:
    """Alert when a value exceeds its threshold (``<= 0`` disables one)."""

    max_new_item_share: float = 0.5
    max_new_user_share: float = 0.8
    max_model_drift: float = 0.5
    max_rfm_migration: float = 0.9
    max_behaviour_migration: float = 0.9
    max_churn_ece: float = 0.2


def _cos_drift(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    d = 1.0 - (a * b).sum(1) / np.maximum(
        np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12
    )
    if not len(d):
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0}
    return {
        "mean": float(d.mean()),
        "p50": float(np.percentile(d, 50)),
        "p90": float(np.percentile(d, 90)),
    }


def _matrix(before: list[str], after: list[str]) -> dict[str, Any]:
    labels = sorted(set(before) | set(after))
    pos = {s: i for i, s in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), np.int64)
    for a, b in zip(before, after):
        m[pos[a], pos[b]] += 1
    n = max(1, len(before))
    moved = float(sum(a != b for a, b in zip(before, after)) / n) if before else 0.0
    return {"labels": labels, "counts": m.tolist(), "moved_share": moved, "customers": len(before)}


def drift_report(
    *,
    events: pl.DataFrame,
    items: pl.DataFrame,
    inter: Interactions,
    live_items: set[str],
    since: int,
    now: int,
    live: TwoTower,
    candidate: TwoTower,
    max_len: int,
    churn: dict[str, Any],
    thresholds: DriftThresholds,
    max_customers: int = 3000,
    behaviour_k: int = 6,
    seed: int = 0,
) -> dict[str, Any]:
    """The drift numbers and alerts of one refresh (new data = events in ``[since, now)``)."""
    from segments.rfm import RFMScorer, customer_features

    new = events.filter(pl.col("ts") >= since)
    old = events.filter(pl.col("ts") < since)
    ext = dict(zip(items["item_id"].to_list(), items["external_id"].to_list()))
    act_items = new["item_id"].unique().to_list()
    new_items = [i for i in act_items if ext.get(i) not in live_items]
    act_users = set(new["user_id"].unique().to_list())
    old_users = set(old["user_id"].unique().to_list())
    returning = np.array(sorted(act_users & old_users), np.int64)
    rep: dict[str, Any] = {
        "window": {"since": since, "now": now, "events": new.height},
        "new_items": {
            "active": len(act_items),
            "new": len(new_items),
            "share": len(new_items) / max(1, len(act_items)),
        },
        "new_users": {
            "active": len(act_users),
            "new": len(act_users - old_users),
            "share": len(act_users - old_users) / max(1, len(act_users)),
        },
    }
    rng = np.random.default_rng(seed)
    if len(returning) > max_customers:
        returning = np.sort(rng.choice(returning, max_customers, replace=False))
    h_old, h_now = inter.filter(inter.ts < since), inter.filter(inter.ts < now)
    v_live = user_vectors(live, h_old, returning, max_len)
    v_cand_old = user_vectors(candidate, h_old, returning, max_len)
    v_cand_now = user_vectors(candidate, h_now, returning, max_len)
    rep["embedding_drift"] = {
        "returning_customers": len(returning),
        "model": _cos_drift(v_live, v_cand_old),
        "behaviour": _cos_drift(v_cand_old, v_cand_now),
    }
    # RFM migration (edges of the previous cutoff)
    try:
        f_old = customer_features(events, since, items)
        f_now = customer_features(events, now, items)
        sc = RFMScorer.fit(f_old)
        a = sc.score(f_old).select("user_id", "rfm_segment")
        b = sc.score(f_now).select("user_id", pl.col("rfm_segment").alias("after"))
        j = a.join(b, on="user_id", how="inner")
        rep["rfm_migration"] = _matrix(j["rfm_segment"].to_list(), j["after"].to_list())
    except Exception as e:  # no purchases before the cutoff: nothing to migrate
        rep["rfm_migration"] = {"error": str(e), "moved_share": 0.0}
    if len(returning) >= behaviour_k * 2:
        from sklearn.cluster import KMeans

        km = KMeans(behaviour_k, n_init=4, random_state=seed).fit(_unit(v_live))
        before = [f"B{c}" for c in km.predict(_unit(v_live))]
        after = [f"B{c}" for c in km.predict(_unit(v_cand_now))]
        rep["behaviour_migration"] = _matrix(before, after)
    else:
        rep["behaviour_migration"] = {"moved_share": 0.0, "customers": len(returning)}
    cand_churn = churn.get("candidate", {})
    rep["churn_calibration"] = {
        k: cand_churn.get(k) for k in ("ece", "auc", "base_rate", "calibration")
    }
    rep["thresholds"] = asdict(thresholds)
    rep["alerts"] = alerts(rep, thresholds)
    return rep


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def alerts(rep: dict[str, Any], t: DriftThresholds) -> list[str]:
    """Threshold breaches, one message each."""
    checks = [
        ("new item share", rep["new_items"]["share"], t.max_new_item_share),
        ("new customer share", rep["new_users"]["share"], t.max_new_user_share),
        ("model drift of returning customers", rep["embedding_drift"]["model"]["mean"], t.max_model_drift),
        ("RFM segment migration", rep["rfm_migration"].get("moved_share", 0.0), t.max_rfm_migration),
        ("behavioural segment migration", rep["behaviour_migration"].get("moved_share", 0.0), t.max_behaviour_migration),
        ("churn calibration error (ECE)", rep["churn_calibration"].get("ece") or 0.0, t.max_churn_ece),
    ]  # fmt: skip
    return [f"{name} {v:.3f} > {lim}" for name, v, lim in checks if lim > 0 and v > lim]


def _table(labels: list[str], counts: list[list[int]]) -> str:
    head = "".join(f"<th>{html.escape(lab)}</th>" for lab in labels)
    rows = "".join(
        f"<tr><th>{html.escape(lab)}</th>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
        for lab, row in zip(labels, counts)
    )
    return f"<table><tr><th>before \\ after</th>{head}</tr>{rows}</table>"


def write_report(rep: dict[str, Any], decision: dict[str, Any], out_dir: Path) -> None:
    """``drift.json`` and a self-contained ``drift.html`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "drift.json").write_text(json.dumps(rep, indent=2, default=float))
    parts = [
        "<html><head><meta charset='utf-8'><title>ecomrec refresh drift</title><style>"
        "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}.alert{color:#b00}"
        "</style></head><body><h1>Refresh drift report</h1>",
        f"<p>Decision: <b>{html.escape(str(decision.get('decision')))}</b> "
        f"({html.escape(str(decision.get('reason', '')))})</p>",
    ]
    if rep.get("alerts"):
        parts.append(
            "<ul class='alert'>"
            + "".join(f"<li>{html.escape(a)}</li>" for a in rep["alerts"])
            + "</ul>"
        )
    else:
        parts.append("<p>No threshold exceeded.</p>")
    ni, nu, ed = rep["new_items"], rep["new_users"], rep["embedding_drift"]
    parts.append(
        "<h2>New data</h2><table>"
        f"<tr><th>events in window</th><td>{rep['window']['events']}</td></tr>"
        f"<tr><th>new items / active items</th><td>{ni['new']} / {ni['active']} ({ni['share']:.1%})</td></tr>"
        f"<tr><th>new customers / active</th><td>{nu['new']} / {nu['active']} ({nu['share']:.1%})</td></tr>"
        f"<tr><th>returning customers measured</th><td>{ed['returning_customers']}</td></tr>"
        f"<tr><th>model drift 1-cos (mean / p90)</th><td>{ed['model']['mean']:.3f} / {ed['model']['p90']:.3f}</td></tr>"
        f"<tr><th>behaviour drift 1-cos (mean / p90)</th><td>{ed['behaviour']['mean']:.3f} / {ed['behaviour']['p90']:.3f}</td></tr>"
        "</table>"
    )  # fmt: skip
    for key, title in (("rfm_migration", "RFM"), ("behaviour_migration", "Behavioural")):
        m = rep[key]
        parts.append(f"<h2>{title} segment migration</h2>")
        if "labels" in m:
            parts.append(
                f"<p>{m['moved_share']:.1%} of {m['customers']} customers changed segment.</p>"
            )
            parts.append(_table(m["labels"], m["counts"]))
        else:
            parts.append(
                f"<p>not measured: {html.escape(str(m.get('error', 'too few customers')))}</p>"
            )
    cc = rep.get("churn_calibration") or {}
    cal = cc.get("calibration")
    parts.append("<h2>Churn calibration (latest window)</h2>")
    if cal:
        parts.append(
            f"<p>ROC-AUC {cc['auc']:.3f}, ECE {cc['ece']:.3f}, base rate {cc['base_rate']:.3f}</p>"
            "<table><tr><th>bin</th><th>mean predicted</th><th>observed</th><th>customers</th></tr>"
        )
        for lo, mp, ob, n in zip(
            cal["bin_lo"], cal["mean_predicted"], cal["observed"], cal["count"]
        ):
            f = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
            parts.append(f"<tr><td>{lo:.1f}</td><td>{f(mp)}</td><td>{f(ob)}</td><td>{n}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p>not measured (a cutoff had a single class)</p>")
    parts.append(
        "<h2>Decision</h2><pre>"
        + html.escape(json.dumps(decision, indent=2, default=float))
        + "</pre>"
    )
    parts.append("</body></html>")
    (out_dir / "drift.html").write_text("\n".join(parts))
