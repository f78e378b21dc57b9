"""The online report: ``online_report(...) -> dict`` (online.json) and its HTML page.

    ecomrec report online --event-log state/events.db --since 2026-12-01 --out reports/online
    ecomrec report online --event-log nats://nats-0:4222,nats://nats-1:4222 \
        --served-log replica-0/served.db --served-log replica-1/served.db --since ... --out ...

Reads the answers served in ``[since, until)`` (the served log) and the events of the event
log that can be attributed to them (up to the longest window after ``until``), attributes
them (:mod:`outcomes.attribution`), and computes the metrics per variant and model version
with their intervals and each variant's difference from the baseline
(:mod:`outcomes.metrics`). A cohort view: an answer's outcomes are counted whenever they
arrive within their window, so the last days' numbers still grow as late events come in.
"""

from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import logging
import sqlite3
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ecomrec.errors import ConfigError
from intake.live_log import LiveEvent
from intake.log_spec import is_nats_spec, open_event_log
from outcomes.attribution import ATTRIBUTED_TYPES, AttributionRule, attribute
from outcomes.metrics import METRICS, Tally, differences, pooled, tally
from outcomes.served_log import Served, read_served

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def parse_time(text: str, field: str = "--since") -> dt.datetime:
    """ISO 8601 date or date-time; UTC when it has no offset. A ConfigError names ``field``."""
    try:
        t = dt.datetime.fromisoformat(text.strip())
    except ValueError as e:
        raise ConfigError(
            f"{field}: {text!r} is not an ISO 8601 date or time (e.g. 2026-12-01 or "
            "2026-12-01T08:00:00+00:00)"
        ) from e
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _utc(t: dt.datetime) -> dt.datetime:
    return (t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)).astimezone(dt.UTC)


def read_outcome_events(
    spec: str | Path, since: float, until: float, stream: str = "ECOMREC_EVENTS"
) -> Iterator[LiveEvent]:
    """Events of the attributed types with ``since <= ts < until``, in (time, position)
    order, from the embedded SQLite event log (a path) or the NATS JetStream log
    (``nats://host:4222[,...]``, stream ``stream``: the whole stream is read once)."""
    if is_nats_spec(str(spec)):
        yield from _nats_outcome_events(str(spec), since, until, stream)
        return
    p = Path(spec)
    if not p.is_file():
        raise ConfigError(f"--event-log: {p} does not exist")
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True, isolation_level=None)
        cols = {r[1] for r in conn.execute("PRAGMA table_info(events)")}
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"--event-log: {p} is not a SQLite event log ({e})") from e
    if not cols:
        conn.close()
        raise ConfigError(f"--event-log: {p} has no events table (not an ecomrec event log)")
    rec = "recommendation_id" if "recommendation_id" in cols else "NULL"
    marks = ",".join("?" * len(ATTRIBUTED_TYPES))
    try:
        for r in conn.execute(
            "SELECT customer_id, product_id, event_type, ts, quantity, price, order_id, "
            f"session_id, {rec} FROM events WHERE ts >= ? AND ts < ? "
            f"AND event_type IN ({marks}) ORDER BY ts, seq",
            (int(since), int(until) + 1, *ATTRIBUTED_TYPES),
        ):
            yield LiveEvent(r[0], r[1], r[2], int(r[3]), int(r[4]), *r[5:])
    finally:
        conn.close()


def _nats_outcome_events(spec: str, since: float, until: float, stream: str) -> Iterator[LiveEvent]:
    """:func:`read_outcome_events` over the JetStream log (the SQLite query's filter and
    order: ``int(since) <= ts <= int(until)``, by time then stream sequence)."""
    log, _ = open_event_log(spec, stream)
    lo, hi = int(since), int(until) + 1
    try:
        kept = [
            (s.event.ts, s.seq, s.event)
            for s in log.read()
            if lo <= s.event.ts < hi and s.event.event_type in ATTRIBUTED_TYPES
        ]
    finally:
        log.close()
    kept.sort(key=lambda x: (x[0], x[1]))
    for _, _, e in kept:
        yield e


def read_served_logs(
    paths: Sequence[str | Path], since: float | None = None, until: float | None = None
) -> list[Served]:
    """The answers of several served logs (one per replica) in ``[since, until)``, in time
    order; a recommendation id held by two files is an error (ids carry a per-process
    prefix, so the same file was given twice, or a copy of it)."""
    answers = [s for p in paths for s in read_served(p, since, until)]
    answers.sort(key=lambda s: s.ts)
    ids = [s.recommendation_id for s in answers]
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise ConfigError(
            f"--served-log: recommendation id {dup!r} is in more than one file "
            f"({', '.join(map(str, paths))}): give each replica's log once"
        )
    return answers


def _metric_dict(v: tuple[float, float, float]) -> dict[str, float]:
    return {"value": v[0], "lo": v[1], "hi": v[2]}


def _pick_baseline(totals: dict[str, Tally], baseline: str | None) -> str | None:
    if not totals:
        return None
    if baseline is not None:
        if baseline not in totals:
            raise ConfigError(
                f"--baseline: no recommendations of variant {baseline!r} in the period; "
                f"variants: {sorted(totals)}"
            )
        return baseline
    for name in ("control", "default"):
        if name in totals:
            return name
    return max(sorted(totals), key=lambda v: totals[v].recommendations)


def online_report(
    event_log: str | Path,
    since: dt.datetime,
    until: dt.datetime | None = None,
    *,
    served_log: str | Path | Sequence[str | Path] | None = None,
    baseline: str | None = None,
    confidence: float = 0.95,
    rule: AttributionRule | None = None,
    out: str | Path | None = None,
    stream: str = "ECOMREC_EVENTS",
) -> dict[str, Any]:
    """The report's JSON (docs/outcomes.md); with ``out`` also writes online.json + online.html.

    ``event_log``: the service's SQLite event log, or its NATS JetStream log
    (``nats://...``, stream ``stream``); ``served_log``: the served-recommendation log's
    file when it is not the event log's, or several (one per replica), merged by time;
    required with a NATS log. Answers served in ``[since, until)`` (until default: now)
    are the cohort; their events are read up to the longest window after it.
    """
    rule = rule or AttributionRule()
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"--confidence must be in (0, 1), got {confidence}")
    now = dt.datetime.now(dt.UTC)
    t0 = _utc(since)
    t1 = _utc(until) if until is not None else now
    if t1 <= t0:
        raise ConfigError(f"--until ({t1.isoformat()}) must be after --since ({t0.isoformat()})")
    s0, s1 = t0.timestamp(), t1.timestamp()
    if served_log is None:
        named: list[str | Path] = []
    elif isinstance(served_log, str | Path):
        named = [served_log]
    else:
        named = list(served_log)
    served_paths = [Path(p) for p in named]
    if not served_paths:
        if is_nats_spec(str(event_log)):
            raise ConfigError(
                "--served-log: a NATS event log holds no served answers; give each "
                "replica's served log (serve.served_log), e.g. --served-log a.db "
                "--served-log b.db"
            )
        served_paths = [Path(event_log)]
    # answers from one window before the period too: an event carrying the id of an answer
    # served before it is that answer's (then left out), not a window match inside it
    answers = read_served_logs(served_paths, s0 - rule.max_window_s, s1)
    events = read_outcome_events(event_log, s0 - rule.clock_skew_s, s1 + rule.max_window_s, stream)
    attributed, stats = attribute(answers, events, rule)
    in_period = [s for s in answers if s.ts >= s0]
    attributed = [a for a in attributed if a.served.ts >= s0]
    groups, impressions_tracked = tally(in_period, attributed)
    totals = pooled(groups)
    base = _pick_baseline(totals, baseline)

    variants = []
    for (variant, mv), t in sorted(groups.items()):
        variants.append(
            {
                "variant": variant,
                "model_version": mv,
                **t.counts(impressions_tracked),
                "metrics": t.metrics(impressions_tracked, confidence),
            }
        )
    variant_totals = [
        {
            "variant": v,
            "model_version": "*",
            **t.counts(impressions_tracked),
            "metrics": t.metrics(impressions_tracked, confidence),
        }
        for v, t in sorted(totals.items())
    ]
    diffs = []
    if base is not None:
        for v, t in sorted(totals.items()):
            if v == base:
                continue
            for metric, d in differences(t, totals[base], impressions_tracked, confidence).items():
                diffs.append({"variant": v, "baseline": base, "metric": metric, **_metric_dict(d)})

    daily: dict[tuple[str, str], dict[str, Any]] = {}
    day_tallies: dict[tuple[str, str], Tally] = {}

    def day(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).date().isoformat()

    for s in in_period:
        day_tallies.setdefault((day(s.ts), s.variant), Tally()).add_served(s)
    for a in attributed:
        day_tallies.setdefault((day(a.served.ts), a.served.variant), Tally()).add_event(a)
    for (day_s, v), t in sorted(day_tallies.items()):
        c = t.counts(impressions_tracked)
        daily[(day_s, v)] = {
            "day": day_s,
            "variant": v,
            "recommendations": c["recommendations"],
            "impressions": c["impressions"],
            "clicks": c["clicks"],
            "carts": c["carts"],
            "purchases": c["purchases"],
            "revenue": c["revenue"],
        }

    report: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "since": t0.isoformat(),
        "until": t1.isoformat(),
        "generated_at": now.isoformat(),
        "event_log": str(event_log),
        # one file: its path (as before); several replicas': the list
        "served_log": str(served_paths[0])
        if len(served_paths) == 1
        else [str(p) for p in served_paths],
        "confidence": confidence,
        "baseline": base,
        "impressions_tracked": impressions_tracked,
        "attribution": {
            "window_s": rule.click_window_s,
            "impression_window_s": rule.impression_window_s,
            "click_window_s": rule.click_window_s,
            "cart_window_s": rule.cart_window_s,
            "purchase_window_s": rule.purchase_window_s,
            "clock_skew_s": rule.clock_skew_s,
            "rule": rule.describe(),
            **stats,
        },
        "intervals": {
            "rates": "Wilson score",
            "rate_differences": "Newcombe hybrid score (method 10)",
            "revenue_per_1000": "percentile bootstrap over answers, 2000 resamples (seed 0)",
            "unit": "answer (one served recommendation list), treated as independent",
        },
        "variants": variants,
        "variant_totals": variant_totals,
        "differences": diffs,
        "daily": list(daily.values()),
    }
    if out is not None:
        write_report(report, out)
    return report


def write_report(report: dict[str, Any], out: str | Path) -> tuple[Path, Path]:
    """DIR/online.json and DIR/online.html."""
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    j = d / "online.json"
    j.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    h = d / "online.html"
    h.write_text(render_html(report))
    log.info("online report written to %s and %s", j, h)
    return j, h


# ------------------------------------------------------------------------------ HTML
def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fig_png(fig: Any) -> str:
    import base64
    import io

    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


_LABELS = {
    "ctr": "CTR",
    "add_to_cart_rate": "add-to-cart rate",
    "conversion": "conversion",
    "revenue_per_1000": "revenue per 1,000 recommendations",
}


def plot_metrics(report: dict[str, Any]) -> str:
    """One panel per metric: each variant's value with its interval bar."""
    plt = _plt()
    rows = report["variant_totals"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 2.8))
    names = [r["variant"] for r in rows]
    for ax, m in zip(axes, METRICS):
        vals = [r["metrics"][m]["value"] for r in rows]
        # max(0, .): a percentile bootstrap may leave the estimate a rounding error outside
        lo = [max(0.0, r["metrics"][m]["value"] - r["metrics"][m]["lo"]) for r in rows]
        hi = [max(0.0, r["metrics"][m]["hi"] - r["metrics"][m]["value"]) for r in rows]
        ax.errorbar(range(len(rows)), vals, yerr=[lo, hi], fmt="o", capsize=5, color="#4c72b0")
        ax.set_xticks(range(len(rows)), names, rotation=20)
        ax.set_xlim(-0.6, len(rows) - 0.4)
        ax.set_title(_LABELS[m], fontsize=10)
    fig.tight_layout()
    return _fig_png(fig)


def plot_differences(report: dict[str, Any]) -> str:
    """Each variant's difference from the baseline with its interval (0 marked)."""
    plt = _plt()
    diffs = report["differences"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 2.6))
    for ax, m in zip(axes, METRICS):
        ds = [d for d in diffs if d["metric"] == m]
        for i, d in enumerate(ds):
            ok = d["lo"] > 0 or d["hi"] < 0
            ax.errorbar(
                [i],
                [d["value"]],
                yerr=[[max(0.0, d["value"] - d["lo"])], [max(0.0, d["hi"] - d["value"])]],
                fmt="o",
                capsize=5,
                color="#c44e52" if ok else "#777777",
            )
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(ds)), [d["variant"] for d in ds], rotation=20)
        ax.set_xlim(-0.6, max(len(ds), 1) - 0.4)
        ax.set_title(f"{_LABELS[m]}: variant - {report['baseline']}", fontsize=9)
    fig.tight_layout()
    return _fig_png(fig)


def plot_daily(report: dict[str, Any]) -> str:
    """Daily recommendations, CTR and revenue per 1,000 per variant."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3))
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in report["daily"]:
        by_variant.setdefault(r["variant"], []).append(r)
    for v, rows in sorted(by_variant.items()):
        days = [dt.date.fromisoformat(r["day"]) for r in rows]
        axes[0].plot(days, [r["recommendations"] for r in rows], marker="o", label=v)
        axes[1].plot(
            days,
            [r["clicks"] / r["impressions"] if r["impressions"] else float("nan") for r in rows],
            marker="o",
            label=v,
        )
        axes[2].plot(
            days,
            [
                1000 * r["revenue"] / r["recommendations"] if r["recommendations"] else float("nan")
                for r in rows
            ],
            marker="o",
            label=v,
        )
    import matplotlib.dates as mdates

    for ax, title in zip(axes, ("recommendations", "CTR", "revenue per 1,000 recommendations")):
        ax.set_title(title, fontsize=10)
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(minticks=2, maxticks=8))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%m-%d"))
        ax.tick_params(axis="x", rotation=30)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _fig_png(fig)


def _table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(m: dict[str, float], money: bool = False) -> str:
    if money:
        return f"{m['value']:.2f} [{m['lo']:.2f}, {m['hi']:.2f}]"
    return f"{100 * m['value']:.2f}% [{100 * m['lo']:.2f}, {100 * m['hi']:.2f}]"


def render_html(report: dict[str, Any]) -> str:
    conf = round(100 * report["confidence"])
    att = report["attribution"]
    rows = []
    for r in report["variants"] + report["variant_totals"]:
        rows.append(
            {
                "variant": r["variant"],
                "model version": r["model_version"],
                "recommendations": f"{r['recommendations']:,}",
                "impressions": f"{r['impressions']:,}",
                "clicks": f"{r['clicks']:,}",
                "carts": f"{r['carts']:,}",
                "purchases": f"{r['purchases']:,}",
                "revenue": f"{r['revenue']:,.2f}",
                "CTR": _fmt(r["metrics"]["ctr"]),
                "add-to-cart": _fmt(r["metrics"]["add_to_cart_rate"]),
                "conversion": _fmt(r["metrics"]["conversion"]),
                "rev / 1,000": _fmt(r["metrics"]["revenue_per_1000"], money=True),
            }
        )
    drows = [
        {
            "variant": d["variant"],
            "baseline": d["baseline"],
            "metric": _LABELS[d["metric"]],
            "difference": _fmt(d, money=d["metric"] == "revenue_per_1000"),
            "interval excludes 0": "yes" if d["lo"] > 0 or d["hi"] < 0 else "no",
        }
        for d in report["differences"]
    ]
    parts = [
        "<h1>Online outcomes of recommendations</h1>",
        f"<p class='cap'>Answers served from {html.escape(report['since'])} to "
        f"{html.escape(report['until'])} (generated {html.escape(report['generated_at'])}); "
        f"{conf}% intervals. Baseline: {html.escape(str(report['baseline']))}.</p>",
        "<h2>Per variant and model version</h2>",
        "<p class='cap'>A row per (variant, model version); the rows with model version * "
        "pool a variant's versions. Rates are per answer shown"
        + ("" if report["impressions_tracked"] else " (no impressions tracked: per answer served)")
        + "; revenue per 1,000 is per answer served.</p>",
        _table(rows, list(rows[0]) if rows else ["variant"]),
    ]
    if report["variant_totals"]:
        parts += [
            f"<img src='{plot_metrics(report)}'>",
            "<h2>Difference from the baseline</h2>",
            "<p class='cap'>Red: the interval excludes 0 (a difference at this confidence); "
            "grey: it does not.</p>",
            _table(drows, ["variant", "baseline", "metric", "difference", "interval excludes 0"]),
        ]
        if report["differences"]:
            parts.append(f"<img src='{plot_differences(report)}'>")
        parts += ["<h2>Daily</h2>", f"<img src='{plot_daily(report)}'>"]
    else:
        parts.append("<p>No recommendations were served in this period.</p>")
    parts += [
        "<h2>Attribution</h2>",
        f"<p class='cap'>{html.escape(att['rule'])}.</p>",
        _table(
            [
                {
                    "events": att["events"],
                    "by id": att["by_id"],
                    "by window": att["by_window"],
                    "unattributed": att["unattributed"],
                    "unknown or expired ids": att["unknown_ids"],
                }
            ],
            ["events", "by id", "by window", "unattributed", "unknown or expired ids"],
        ),
    ]
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:auto}"
        "table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px}"
        "img{max-width:100%;display:block;margin:8px 0}.cap{color:#444;margin:4px 0}"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ecomrec online outcomes"
        f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    )


def run_online_report(args: argparse.Namespace) -> int:
    """``ecomrec report online``."""
    since = parse_time(args.since, "--since")
    until = parse_time(args.until, "--until") if args.until else None
    report = online_report(
        args.event_log,
        since,
        until,
        served_log=args.served_log or None,
        baseline=args.baseline,
        confidence=args.confidence,
        out=args.out,
        stream=args.stream,
    )
    for r in report["variant_totals"]:
        m = r["metrics"]
        print(
            f"{r['variant']:>12}: {r['recommendations']:>9,} recommendations, "
            f"CTR {_fmt(m['ctr'])}, conversion {_fmt(m['conversion'])}, "
            f"revenue/1,000 {_fmt(m['revenue_per_1000'], money=True)}"
        )
    for d in report["differences"]:
        print(
            f"{d['variant']} - {d['baseline']} {d['metric']}: "
            f"{_fmt(d, money=d['metric'] == 'revenue_per_1000')}"
        )
    print(f"written: {Path(args.out) / 'online.json'}, {Path(args.out) / 'online.html'}")
    return 0
