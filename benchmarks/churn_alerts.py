"""Real-time churn warnings on a replay: precision at a fixed weekly alert budget.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/churn_alerts.py \\
        --dataset online-retail --out results/churn_alerts.json

The protocol (docs/segments.md, "Churn warnings"):

* The replay is the ``--weeks`` weeks that end at the last cutoff whose ``H``-day label
  window fits the data (``segments.labels.cutoff_for``; Online Retail, H = 90: the 12 weeks
  2011-06-19 .. 2011-09-11). The dataset before the replay start is the watcher's history;
  the alert model is fitted on it alone (every training label window ends by the start).
* Week by week the replay's events are appended to a real ``SqliteEventLog`` and the
  watcher runs one round (``Watcher.poll(log, now=week end)``: the functions
  ``ecomrec churn watch`` runs), with ``threshold = 0`` and ``budget = B``: the B riskiest
  armed customers are warned. B = ``--budget-share`` (2%) of the customers active at the
  replay start (a purchase in the last H days), fixed for every week and every method.
* Baselines, at the same week ends, over the same active customers (a purchase in the last
  H days), each customer warned at most once per method: BG/NBD lowest P(alive) first
  (fitted on the history before the replay start, P(alive) from each week's summary);
  RFM-only: worst R score first (quintiles at the replay start), longest recency first
  within it.
* A warning at time t is right when the customer really churned: no purchase in
  ``[t, t + H)`` (``segments.labels.make_labels``, the project's label). Precision = right
  warnings / warnings. Lead time of a right warning = ``(last purchase before t + H days) -
  t`` in days: how long before the label rule (H days without a purchase) would call the
  customer lost the shop was told; ``since_last`` = t - last purchase.

JSON: ``{"info": {...}, "methods": {ours|bgnbd|rfm: {warnings, right, precision,
median_lead_days, median_since_last_days, weekly: [...]}}, "active_churn_rate": ...}`` and
a markdown table beside it (same name, ``.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DAY = 86400


def _date(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d")


def replay(
    ds: Any,
    horizon_days: int,
    weeks: int,
    budget_share: float,
    work: Path,
    end_ts: int | None = None,
    acfg: Any = None,
) -> dict[str, Any]:
    """Run the three methods over the replay; see the module docstring."""
    import numpy as np
    import polars as pl

    from intake.live_log import LiveEvent, SqliteEventLog
    from segments.alerts import AlertConfig, AlertModel, JsonlSink, Watcher
    from segments.bgnbd import BGNBD, transaction_summary
    from segments.churn import ChurnConfig
    from segments.labels import LabelConfig, cutoff_for, make_labels
    from segments.rfm import RFMScorer, customer_features

    H = horizon_days
    ccfg = ChurnConfig(horizon_days=H)
    acfg = acfg or AlertConfig()
    end = int(end_ts) if end_ts is not None else cutoff_for(ds.events, H)
    start = end - weeks * 7 * DAY
    events = ds.events
    hist = dataclasses.replace(ds, events=events.filter(pl.col("ts") < start))
    t0 = time.process_time()
    model = AlertModel.fit(hist.events, hist.items, start, ccfg, acfg)
    fit_cpu = time.process_time() - t0
    feats0 = customer_features(events, start, ds.items)
    n_active0 = int((feats0["recency_days"] < H).sum())
    budget = max(1, round(budget_share * n_active0))
    wcfg = dataclasses.replace(acfg, threshold=0.0, rearm_below=0.0, budget=budget)
    sink = work / "ours.jsonl"
    sink.unlink(missing_ok=True)
    watcher = Watcher(model, hist, wcfg, [JsonlSink(sink)], position=0)
    # baselines fitted on the history before the replay start
    s0 = transaction_summary(events, start, time_unit_days=7.0)
    bg = BGNBD().fit(
        s0["frequency"].to_numpy().astype(np.float64), s0["recency"].to_numpy(), s0["T"].to_numpy()
    )
    scorer = RFMScorer.fit(feats0)
    users_ext = ["<pad>", *ds.users.external_ids]
    items_ext = ["<pad>", *ds.item_ids.external_ids]
    log_path = work / "replay_events.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{log_path}{suffix}").unlink(missing_ok=True)
    alerts: dict[str, list[tuple[int, int, float]]] = {"ours": [], "bgnbd": [], "rfm": []}
    done: dict[str, set[int]] = {"bgnbd": set(), "rfm": set()}
    weekly_rate = []
    ids = {e: i for i, e in enumerate(users_ext)}
    poll_cpu = 0.0
    with SqliteEventLog(log_path) as el:
        for k in range(1, weeks + 1):
            t = start + k * 7 * DAY
            wk = events.filter((pl.col("ts") >= t - 7 * DAY) & (pl.col("ts") < t)).sort(
                ["ts", "order"]
            )
            live = [
                LiveEvent(
                    users_ext[u], items_ext[i], et, int(ts), max(1, abs(int(q))), p, None, None
                )
                for u, i, ts, et, q, p in wk.select(
                    "user_id", "item_id", "ts", "event_type", "quantity", "price"
                ).iter_rows()
            ]
            for j in range(0, len(live), 1000):
                el.append(live[j : j + 1000])
            c0 = time.process_time()
            got = watcher.poll(el, now=t)
            poll_cpu += time.process_time() - c0
            for w in got:
                alerts["ours"].append((ids[w.customer_id], t, w.risk))
            feats = customer_features(events, t, ds.items)
            act = feats.filter(pl.col("recency_days") < H)
            lab = make_labels(events, act["user_id"].to_numpy(), t, LabelConfig(H))
            weekly_rate.append(float(lab["churn"].mean()))  # type: ignore[arg-type]
            # BG/NBD: lowest P(alive) first
            s = transaction_summary(events, t, time_unit_days=7.0)
            s = act.select("user_id").join(s, on="user_id", how="left")
            pa = bg.p_alive(
                s["frequency"].to_numpy().astype(np.float64),
                s["recency"].to_numpy(),
                s["T"].to_numpy(),
            )
            _pick(alerts["bgnbd"], done["bgnbd"], s["user_id"].to_numpy(), pa, t, budget)
            # RFM-only: worst R score, then longest recency
            sc = scorer.score(act)
            key = sc["r_score"].to_numpy() * 1e6 - sc["recency_days"].to_numpy()
            _pick(alerts["rfm"], done["rfm"], sc["user_id"].to_numpy(), key, t, budget)
            logging.info("week %d (%s): %d events, %d warnings", k, _date(t), len(live), len(got))
    methods = {m: _score(events, rows, H, weeks) for m, rows in alerts.items()}
    return {
        "info": {
            "dataset": ds.name,
            "horizon_days": H,
            "weeks": weeks,
            "replay_start": _date(start),
            "replay_end": _date(end),
            "active_at_start": n_active0,
            "budget_per_week": budget,
            "budget_rule": f"round({budget_share} x customers active at the replay start)",
            "model_train_rows": model.train_rows,
            "model_train_cutoffs": [_date(c) for c in model.train_cutoffs],
            "model_fit_cpu_s": round(fit_cpu, 2),
            "watcher_poll_cpu_s_per_week": round(poll_cpu / weeks, 3),
            "alert_config": dataclasses.asdict(wcfg),
        },
        "active_churn_rate": float(np.mean(weekly_rate)),
        "methods": methods,
    }


def _pick(
    out: list[tuple[int, int, float]], done: set[int], users: Any, score: Any, t: int, k: int
) -> None:
    """The ``k`` lowest-score customers not warned before (ties: lower user id)."""
    import numpy as np

    order = np.lexsort((users, score))
    n = 0
    for i in order:
        u = int(users[i])
        if u in done:
            continue
        done.add(u)
        out.append((u, t, float(score[i])))
        n += 1
        if n == k:
            break


def _score(events: Any, rows: list[tuple[int, int, float]], H: int, weeks: int) -> dict[str, Any]:
    import numpy as np
    import polars as pl

    from segments.labels import LabelConfig, make_labels

    by_t: dict[int, list[int]] = {}
    for u, t, _ in rows:
        by_t.setdefault(t, []).append(u)
    right = 0
    leads: list[float] = []
    since: list[float] = []
    weekly = []
    for t, users in sorted(by_t.items()):
        lab = make_labels(events, np.asarray(users), t, LabelConfig(H))
        churned = set(lab.filter(pl.col("churn") == 1)["user_id"].to_list())
        last = (
            events.filter(
                (pl.col("event_type") == "purchase")
                & (pl.col("ts") < t)
                & pl.col("user_id").is_in(users)
            )
            .group_by("user_id")
            .agg(pl.col("ts").max())
        )
        last_ts = dict(zip(last["user_id"].to_list(), last["ts"].to_list()))
        r = 0
        for u in users:
            if u in churned:
                r += 1
                leads.append((last_ts[u] + H * DAY - t) / DAY)
                since.append((t - last_ts[u]) / DAY)
        right += r
        weekly.append({"week_end": _date(t), "warnings": len(users), "right": r})
    n = len(rows)
    return {
        "warnings": n,
        "right": right,
        "precision": right / n if n else float("nan"),
        "median_lead_days": float(np.median(leads)) if leads else float("nan"),
        "median_since_last_days": float(np.median(since)) if since else float("nan"),
        "weekly": weekly,
    }


NAMES = {
    "ours": "ours: watcher (GBDT on batch + trend features, threshold crossing)",
    "bgnbd": "BG/NBD, lowest P(alive) first",
    "rfm": "RFM only, worst R then longest recency first",
}


def markdown(res: dict[str, Any]) -> str:
    i = res["info"]
    lines = [
        f"Replay {i['replay_start']} .. {i['replay_end']} ({i['weeks']} weeks), "
        f"H = {i['horizon_days']} days, budget {i['budget_per_week']} warnings / week "
        f"({i['budget_rule']}; {i['active_at_start']} active), churn rate of the active "
        f"customers {res['active_churn_rate']:.3f}",
        "",
        "| method | warnings | right | precision | median lead (days) | median days since last purchase |",
        "|---|---|---|---|---|---|",
    ]
    names = dict(NAMES)
    if not i["alert_config"].get("trend_features", True):
        names["ours"] = "ours, batch features only (no trend columns)"
    for m, r in res["methods"].items():
        lines.append(
            f"| {names.get(m, m)} | {r['warnings']} | {r['right']} | {r['precision']:.4f} | "
            f"{r['median_lead_days']:.1f} | {r['median_since_last_days']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from ecomrec.cli import HelpFormatter

    class _Fmt(argparse.RawDescriptionHelpFormatter, HelpFormatter):
        pass

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=_Fmt)
    ap.add_argument("--dataset", default="online-retail", help="dataset name or folder")
    ap.add_argument(
        "--data-dir", default=None, help="bundled datasets folder (default: $ECOMREC_DATA_DIR)"
    )
    ap.add_argument("--horizon-days", type=int, default=90, help="churn horizon H")
    ap.add_argument("--weeks", type=int, default=12, help="weeks replayed")
    ap.add_argument(
        "--end",
        default=None,
        help="last week end, YYYY-MM-DD (default: the last cutoff whose label window fits); "
        "an earlier end gives a validation replay",
    )
    ap.add_argument(
        "--budget-share", type=float, default=0.02, help="weekly warnings / active customers"
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="alerts.KEY=VALUE",
        help="override an AlertConfig value (as `ecomrec churn watch --set`)",
    )
    ap.add_argument("--out", required=True, help="JSON file (a .md table is written beside it)")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from ecomrec.config import read_config
    from intake.loaders import load_dataset
    from segments.alerts import DEFAULT_CONFIG, AlertConfig

    acfg = read_config(DEFAULT_CONFIG, args.set, kind="segments").build(AlertConfig, "alerts")
    end = (
        int(dt.datetime.fromisoformat(args.end).replace(tzinfo=dt.UTC).timestamp())
        if args.end
        else None
    )
    t0 = time.perf_counter()
    c0 = time.process_time()
    ds = load_dataset(args.dataset, data_dir=args.data_dir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        res = replay(ds, args.horizon_days, args.weeks, args.budget_share, Path(tmp), end, acfg)
        res["ours_warnings_sample"] = [
            json.loads(line) for line in (Path(tmp) / "ours.jsonl").read_text().splitlines()[:5]
        ]
    res["seconds"] = time.perf_counter() - t0
    res["cpu_seconds"] = time.process_time() - c0
    out.write_text(json.dumps(res, indent=2, default=float))
    md = markdown(res)
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
