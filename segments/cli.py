"""``ecomrec segments|campaign|churn`` subcommands (wired into ``ecomrec/cli.py`` by ``register``).

    ecomrec segments report --dataset online-retail --out DIR [--run RUN_DIR] [--k K]
    ecomrec customers show 12346 --dataset online-retail --scores DIR   (reads DIR/scores)
    ecomrec customers similar 12346 --dataset online-retail --scores DIR --k 10
    ecomrec segments export --dataset online-retail --out DIR [--raw-ids] [--salt S]
                            [--previous PREV_EXPORT_DIR]
    ecomrec campaign audience --text "christmas lights" --k 500 [--segment "At Risk"]
    ecomrec campaign audience --items 85123A,22423 --k 500
    ecomrec campaign plan --segment "At Risk" --k 5 [--limit 20]
    ecomrec campaign evaluate [--n 200]
    ecomrec churn evaluate --dataset online-retail --horizon-days 90 [--modes frozen,lora,full]
    ecomrec churn truncate --dataset online-retail --horizon-days 90 --out results/or_pre_cutoff
    ecomrec churn watch --event-log events.db --dataset shop --model m.pkl --sink churn.jsonl [--once]

Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _common(p: argparse.ArgumentParser) -> None:
    from ecomrec.config import add_config_args
    from intake.loaders.registry import DATASET_HELP

    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument(
        "--data-dir", default=None, help="bundled datasets folder (default: $ECOMREC_DATA_DIR)"
    )
    p.add_argument(
        "--run",
        default=None,
        help="trained towers run of THIS dataset (user-tower embeddings; default: text "
        "embeddings of the products bought)",
    )
    p.add_argument(
        "--horizon-days",
        type=int,
        default=None,
        help="churn / value horizon; the data must span at least 3x this many days "
        "(default: the config's churn.horizon_days, 90)",
    )
    p.add_argument(
        "--k-segments",
        type=int,
        default=None,
        help="k for k-means (default: the config's segments.k, else chosen by silhouette)",
    )
    p.add_argument("--with-rfm", action="store_true", help="cluster on embeddings + RFM features")
    add_config_args(
        p,
        tables="the scoring config (MarketingConfig): [churn] (ChurnConfig) and [segments] "
        "(SegmentConfig) tables",
        example="churn.epochs=20",
        flags="--horizon-days, --k-segments, --with-rfm",
    )


def _scores_opts(p: argparse.ArgumentParser, *, producer: bool = False) -> None:
    """Where the saved segment scores are read (and written when missing)."""
    p.add_argument(
        "--scores",
        default=None,
        metavar="DIR",
        help="output folder of `ecomrec segments report` or `export`: its saved scores "
        "(DIR/scores) are read when they match this dataset and options, else computed and "
        "saved there"
        + (" (default: --out)" if producer else "; without it everything is refitted (slow)"),
    )
    p.add_argument(
        "--refit",
        action="store_true",
        help="recompute the scores even when saved ones are up to date (and replace them)",
    )


def _config(args: argparse.Namespace) -> Any:
    """MarketingConfig: --config < --set < the flags (--dataset and --run always win)."""
    from ecomrec.config import read_config
    from segments.export import MarketingConfig

    src = read_config(args.config, args.set)
    flags = {
        "dataset": args.dataset,
        "source": "tower" if args.run else "text",
        "churn": {"horizon_days": args.horizon_days},
        "segments": {"k": args.k_segments, "with_rfm": True if args.with_rfm else None},
    }
    return src.build(MarketingConfig, None, flags)


def _load(args: argparse.Namespace) -> Any:
    from intake.loaders import load_dataset

    ds = load_dataset(args.dataset, data_dir=args.data_dir)
    check_horizon(ds, _config(args).churn.horizon_days)
    if args.run:
        from towers.inference import load_run

        load_run(args.run).check_dataset(ds, f"--run {args.run}")
    return ds


def check_horizon(ds: Any, horizon_days: int) -> None:
    """The churn split needs history before the training cutoff (end - 2 horizons) and two
    horizon-long label windows: at least 3 horizons of data. Say what to change if not."""
    import datetime as _dt

    from ecomrec.errors import ConfigError

    if horizon_days < 1:
        raise ConfigError(f"--horizon-days must be >= 1, got {horizon_days}")
    ev = ds.events.filter(ds.events["event_type"] == "purchase")
    if ev.height == 0:
        raise ConfigError(f"dataset {ds.name!r} has no purchase events: segments need purchases")
    lo, hi = int(ev["ts"].min()), int(ev["ts"].max())
    span = (hi - lo) / 86400
    if span < 3 * horizon_days:

        def day(t: int) -> str:
            return _dt.datetime.fromtimestamp(t, _dt.UTC).date().isoformat()

        raise ConfigError(
            f"--horizon-days {horizon_days} is too long for dataset {ds.name!r}: its purchases "
            f"span {span:.0f} days ({day(lo)} .. {day(hi)}), and the churn models need 3 x "
            f"{horizon_days} = {3 * horizon_days} days (history before a training cutoff, then "
            f"two {horizon_days}-day outcome windows). Use --horizon-days {max(1, int(span // 3))} "
            "or less, or more history"
        )


def _scores(
    args: argparse.Namespace,
    ds: Any,
    *,
    out_dir: str | None = None,
    previous: Any = None,
    with_evaluation: bool = False,
    on_stale: str = "refuse",
) -> tuple[Any, Any]:
    """(scored customers, evaluation or None): saved ones when up to date, else refitted."""
    import time

    from segments.artifacts import obtain

    where = out_dir if out_dir is not None else getattr(args, "scores", None)
    t0 = time.perf_counter()
    scored, ev = obtain(
        ds,
        _config(args),
        run_dir=args.run,
        out_dir=where,
        on_stale=on_stale,  # type: ignore[arg-type]
        refit=bool(getattr(args, "refit", False)),
        with_evaluation=with_evaluation,
        previous=previous,
    )
    took = time.perf_counter() - t0
    if where is None and took > 5:
        print(
            f"(scored {scored.table.height:,} customers in {took:.0f} s; run `ecomrec segments "
            "report --out DIR` once and pass --scores DIR to answer in about a second)",
            file=sys.stderr,
        )
    return scored, ev


def _score(args: argparse.Namespace, ds: Any, previous: Any = None) -> Any:
    return _scores(args, ds, previous=previous)[0]


def _currency(args: argparse.Namespace, ds: Any) -> str | None:
    """--currency, else the dataset's own (``Dataset.extra["currency"]``), else none."""
    given = getattr(args, "currency", None)
    if given:
        return str(given)
    cur = (getattr(ds, "extra", None) or {}).get("currency")
    return str(cur) if cur else None


# --------------------------------------------------------------------------- segments
def _segments_report(args: argparse.Namespace) -> int:
    from segments.report import write_report

    ds = _load(args)
    scored, ev = _scores(
        args, ds, out_dir=args.scores or args.out, with_evaluation=True, on_stale="refit"
    )
    path = write_report(
        args.out,
        scored,
        ev.by_task(),
        title=f"ecomrec segments: {ds.name}",
        cutoffs=(ev.train_cutoff_ts, ev.test_cutoff_ts),
        horizon_days=scored.cfg.churn.horizon_days,
        currency=_currency(args, ds),
        spend_check=ev.spend,
    )
    print(path)
    return 0


def _segments_export(args: argparse.Namespace) -> int:
    from ecomrec.errors import ConfigError
    from segments.export import load_previous_segments, write_export

    if Path(args.out).exists():
        raise ConfigError(
            f"--out {args.out} already exists: exports are never overwritten; choose a new "
            "folder (pass the old one as --previous to keep segment ids stable)"
        )
    from segments.artifacts import save
    from segments.export import embedding_base

    ds = _load(args)
    prev = load_previous_segments(args.previous) if args.previous else None
    scored = _score(args, ds, prev)
    manifest = write_export(args.out, scored, ds, raw_ids=args.raw_ids, salt=args.salt)
    # the export folder also holds the scores, for --scores of the analyst commands
    save(args.out, scored, ds, embedding_base(args.run))
    if args.run:
        from towers.inference import load_run

        manifest["run"] = load_run(args.run).provenance()
        (Path(args.out) / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(json.dumps({k: v for k, v in manifest.items() if k != "config"}, indent=2))
    return 0


# --------------------------------------------------------------------------- campaign
def _vectors(args: argparse.Namespace, ds: Any, scored: Any) -> tuple[Any, Any]:
    """(item_vectors (N+1, D) by item id, embed_text) in the same space as the user vectors."""
    import numpy as np

    if args.run:
        from towers.inference import load_run

        tm = load_run(args.run)
        iv = np.zeros((ds.n_items + 1, tm.dim), np.float32)
        iv[ds.items["item_id"].to_numpy()] = tm.embed_items(ds.items)
        return iv, tm.embed_text
    from towers.text_encoder import catalogue_text_embeddings, encode_texts

    items = ds.items.sort("item_id")
    txt = catalogue_text_embeddings(items)
    iv = np.zeros((ds.n_items + 1, txt.shape[1]), np.float32)
    iv[items["item_id"].to_numpy()] = txt
    return iv, lambda texts: encode_texts(list(texts))


def _campaign_audience(args: argparse.Namespace) -> int:
    import polars as pl

    from segments.campaign import ExactUserSearch, query_from_items, segment_mask

    if not args.text and not args.items:
        print("give --text or --items", file=sys.stderr)
        return 2
    ds = _load(args)
    scored = _score(args, ds)
    iv, embed = _vectors(args, ds, scored)
    if args.text:
        q = embed([args.text])[0]
    else:
        ids = [ds.item_ids.to_internal(s.strip()) for s in args.items.split(",") if s.strip()]
        q = query_from_items(ids, iv)
    search = ExactUserSearch(scored.users, scored.embeddings)
    users, scores = search.search(q, args.k, segment_mask(scored.table, args.segment))
    row = {int(u): i for i, u in enumerate(scored.users.tolist())}
    t = scored.table
    out = pl.DataFrame(
        {
            "customer": [ds.users.to_external(int(u)) for u in users],
            "score": scores,
            "rfm_segment": [t["rfm_segment"][row[int(u)]] for u in users],
            "segment": [t["segment_name"][row[int(u)]] for u in users],
            "churn_probability": [t["churn_probability"][row[int(u)]] for u in users],
        }
    )
    _emit(out, args.out)
    return 0


def _campaign_plan(args: argparse.Namespace) -> int:
    import numpy as np
    import polars as pl

    from segments.campaign import bought_before, plan_for_users, segment_mask

    ds = _load(args)
    scored = _score(args, ds)
    iv, _ = _vectors(args, ds, scored)
    mask = segment_mask(scored.table, args.segment)
    rows = np.flatnonzero(mask) if mask is not None else np.arange(len(scored.users))
    # customers most worth a plan first: highest predicted spend
    spend = scored.table["predicted_spend"].to_numpy()[rows]
    rows = rows[np.argsort(-spend, kind="stable")][: args.limit]
    users = scored.users[rows]
    titles = dict(zip(ds.items["item_id"].to_list(), ds.items["title"].fill_null("").to_list()))
    plans = plan_for_users(
        users,
        scored.embeddings[rows],
        iv,
        bought_before(ds, scored.now_ts, users),
        titles,
        k=args.k,
    )
    recs = []
    for p in plans:
        for rank, (it, s, why) in enumerate(zip(p.items, p.scores, p.reasons), start=1):
            recs.append(
                {
                    "customer": ds.users.to_external(p.user_id),
                    "rank": rank,
                    "item": ds.item_ids.to_external(it),
                    "title": titles.get(it, ""),
                    "score": s,
                    "reason": why,
                }
            )
    _emit(pl.DataFrame(recs), args.out)
    return 0


def _campaign_evaluate(args: argparse.Namespace) -> int:
    from segments.behaviour import user_embeddings
    from segments.campaign import theme_precision
    from segments.churn import temporal_split

    ds = _load(args)
    cfg = _config(args)
    _, test = temporal_split(ds, cfg.churn)
    emb = user_embeddings(ds, test.cutoff_ts, test.users, source=cfg.source, run_dir=args.run)
    _, embed = _vectors(args, ds, None)
    res = theme_precision(
        ds, test.table, emb, embed, test.cutoff_ts, cfg.churn.horizon_days, n=args.n
    )
    _emit(res, args.out)
    return 0


# --------------------------------------------------------------------------- customers
def _customer_row(ds: Any, scored: Any, customer: str) -> int:
    from ecomrec.errors import NotFoundError

    uid = ds.users.get(customer)
    if uid is None:
        raise NotFoundError(f"customer {customer!r} is not in dataset {ds.name!r}")
    rows = {int(u): i for i, u in enumerate(scored.users.tolist())}
    if uid not in rows:
        raise NotFoundError(
            f"customer {customer!r} has no purchases before the as-of date: no profile"
        )
    return rows[uid]


def _customers_show(args: argparse.Namespace) -> int:
    import datetime as _dt

    import polars as pl

    ds = _load(args)
    scored = _score(args, ds)
    r = _customer_row(ds, scored, args.customer)
    row = scored.table.row(r, named=True)
    uid = int(row["user_id"])
    ev = ds.events.filter(pl.col("user_id") == uid)
    buys = ev.filter(pl.col("event_type") == "purchase")
    top = (
        buys.group_by("item_id")
        .agg(pl.col("quantity").sum().alias("bought"))
        .sort(["bought", "item_id"], descending=[True, False])
        .head(args.top)
    )
    titles = dict(zip(ds.items["item_id"].to_list(), ds.items["title"].to_list()))
    h = scored.cfg.churn.horizon_days
    method = scored.spend_choice.get("method", "gbdt")

    def day(t: int) -> str:
        return _dt.datetime.fromtimestamp(t, _dt.UTC).date().isoformat()

    info = {
        "customer": args.customer,
        "as_of": day(scored.now_ts),
        "first_seen": day(int(ev["ts"].min())),  # type: ignore[arg-type]
        "last_seen": day(int(ev["ts"].max())),  # type: ignore[arg-type]
        "events": dict(sorted(ev.group_by("event_type").len().iter_rows())),
        "rfm_segment": row["rfm_segment"],
        "rfm_code": row["rfm_code"],
        "segment_id": int(row["segment_id"]),
        "segment": row["segment_name"],
        "churn_probability": round(float(row["churn_probability"]), 4),
        "high_value_probability": round(float(row["high_value_probability"]), 4),
        "horizon_days": h,
        "predicted_spend": round(float(row["predicted_spend"]), 2),
        "predicted_spend_method": method,
        "recent_spend": round(float(row.get("recent_spend") or 0.0), 2),
        "recency_days": round(float(row["recency_days"]), 2),
        "frequency": int(row["frequency"]),
        "monetary": round(float(row["monetary"]), 2),
        "currency": _currency(args, ds),
        "top_items": [
            {"item": ds.item_ids.to_external(int(i)), "title": titles.get(int(i)), "bought": int(q)}
            for i, q in top.iter_rows()
        ],
    }
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(format_customer(info))
    return 0


SPEND_METHOD_WORDS = {
    "gbdt": "GBDT regressor on the RFM features",
    "last_window": "same as the last {h} days",
}


def format_customer(info: dict[str, Any]) -> str:
    """The ``customers show`` block for a person (``info`` is its ``--json`` dict)."""
    from segments import tables as tb

    cur = info.get("currency")
    h = info["horizon_days"]
    events = ", ".join(f"{k} {v:,}" for k, v in info["events"].items())
    how = SPEND_METHOD_WORDS.get(info["predicted_spend_method"], info["predicted_spend_method"])
    pairs = [
        ("customer", str(info["customer"])),
        ("as of", f"{info['as_of']} (data before that day)"),
        ("first seen", info["first_seen"]),
        ("last seen", info["last_seen"]),
        ("events", events),
        ("RFM segment", f"{info['rfm_segment']} (R, F, M scores {info['rfm_code']})"),
        ("behavioural segment", f"{info['segment_id']}: {info['segment']}"),
        ("churn probability", f"{tb.percent(info['churn_probability'])} (no purchase in {h} days)"),
        ("high-value probability", f"{tb.percent(info['high_value_probability'])}"),
        (
            f"predicted spend, {h} days",
            f"{tb.money(info['predicted_spend'], cur)} ({how.format(h=h)}; chosen on a "
            "validation window)",
        ),
        (f"spend, last {h} days", tb.money(info["recent_spend"], cur)),
        ("last purchase", f"{tb.days(info['recency_days'])} days before the as-of date"),
        ("orders", f"{info['frequency']:,}"),
        ("net spend, all time", tb.money(info["monetary"], cur)),
    ]
    top = tb.render(
        info["top_items"],
        [
            tb.Column("bought", "units", tb.number, ">"),
            tb.Column("item", "item"),
            tb.Column("title", "title", max_width=60),
        ],
    )
    return tb.key_values(pairs) + "\n\ntop items\n" + top


def similar_table(rows: list[dict[str, Any]], currency: str | None = None) -> str:
    """The ``customers similar`` table (rows as in its --out file)."""
    from segments import tables as tb

    return tb.render(
        rows,
        [
            tb.Column("customer", "customer"),
            tb.Column("similarity", "similarity", lambda v: tb.number(v, 3), ">"),
            tb.Column("rfm_segment", "RFM segment"),
            tb.Column("segment", "behavioural segment", max_width=40),
            tb.Column("churn_probability", "churn", tb.percent, ">"),
            tb.Column("predicted_spend", "predicted spend", lambda v: tb.money(v, currency), ">"),
        ],
    )


def _customers_forget(args: argparse.Namespace) -> int:
    from intake.forget import forget_customer
    from intake.live_log import EventLog, SqliteEventLog

    event_log: EventLog | None = None
    if args.event_log:
        event_log = SqliteEventLog(args.event_log)
    elif args.nats:
        from intake.live_log_nats import NatsEventLog, NatsLogConfig

        event_log = NatsEventLog(NatsLogConfig(servers=tuple(args.nats.split(","))))
    try:
        receipt = forget_customer(
            args.customer,
            args.dataset,
            event_log=event_log,
            artifacts=args.artifacts,
            keys=args.key,
        )
    finally:
        if event_log is not None:
            event_log.close()
    print("\n".join(receipt.lines()))
    return 1 if receipt.leftover else 0


def _customers_similar(args: argparse.Namespace) -> int:
    import polars as pl

    from segments.campaign import ExactUserSearch

    ds = _load(args)
    scored = _score(args, ds)
    r = _customer_row(ds, scored, args.customer)
    search = ExactUserSearch(scored.users, scored.embeddings)
    users, scores = search.search(scored.embeddings[r], args.k + 1, None)
    me = int(scored.users[r])
    rows = {int(u): i for i, u in enumerate(scored.users.tolist())}
    t = scored.table
    keep = [(int(u), float(s)) for u, s in zip(users, scores) if int(u) != me][: args.k]
    out = pl.DataFrame(
        {
            "customer": [ds.users.to_external(u) for u, _ in keep],
            "similarity": [s for _, s in keep],
            "rfm_segment": [t["rfm_segment"][rows[u]] for u, _ in keep],
            "segment": [t["segment_name"][rows[u]] for u, _ in keep],
            "churn_probability": [t["churn_probability"][rows[u]] for u, _ in keep],
            "predicted_spend": [t["predicted_spend"][rows[u]] for u, _ in keep],
        },
        schema_overrides={
            "customer": pl.Utf8,
            "similarity": pl.Float64,
            "rfm_segment": pl.Utf8,
            "segment": pl.Utf8,
            "churn_probability": pl.Float64,
            "predicted_spend": pl.Float64,
        },
    )
    if args.out:
        _emit(out, args.out)
    else:
        print(
            f"customers most like {args.customer} (cosine of behaviour embeddings, "
            f"as of {_day(scored.now_ts)})"
        )
        print(similar_table(out.to_dicts(), _currency(args, ds)))
    return 0


def _day(ts: int) -> str:
    import datetime as _dt

    return _dt.datetime.fromtimestamp(ts, _dt.UTC).date().isoformat()


def _emit(df: Any, out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        if out.endswith(".parquet"):
            df.write_parquet(out)
        else:
            df.write_csv(out)
        print(f"wrote {df.height} rows to {out}")
    else:
        from segments import tables as tb

        rows = df.to_dicts()
        print(tb.render(rows, tb.auto_columns(rows, df.columns)))


# --------------------------------------------------------------------------- churn
def _churn_evaluate(args: argparse.Namespace) -> int:
    from segments.churn import compare

    ds = _load(args)
    cfg = _config(args).churn
    modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    comp = compare(ds, cfg, source="tower" if args.run else "text", run_dir=args.run, modes=modes)
    res = {"metrics": comp.metrics, "info": comp.info}
    text = json.dumps(res, indent=2, default=float)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def _churn_truncate(args: argparse.Namespace) -> int:
    from segments.churn import pre_cutoff_dataset

    ds = pre_cutoff_dataset(_load(args), _config(args).churn.horizon_days)
    ds.save(args.out)
    print(f"saved {ds.name} ({ds.events.height:,} events) to {args.out}")
    return 0


def _churn_watch(args: argparse.Namespace) -> int:
    import datetime as _dt
    import signal
    import threading
    import time

    from ecomrec.config import read_config
    from ecomrec.errors import ConfigError, NotFoundError
    from intake.live_log import EventLog, SqliteEventLog
    from intake.loaders import load_dataset
    from segments import alerts as al
    from segments.churn import ChurnConfig

    if bool(args.event_log) == bool(args.nats):
        raise ConfigError("give one of --event-log PATH or --nats SERVERS")
    if args.event_log and not Path(args.event_log).is_file():
        raise NotFoundError(f"--event-log {args.event_log}: no such file")
    if Path(args.sink).is_dir():
        raise ConfigError(f"--sink {args.sink} is a folder; give a file path")
    src = read_config(args.config or al.DEFAULT_CONFIG, args.set, kind="segments")
    src.check_tables(("churn", "alerts"))
    ccfg = src.build(ChurnConfig, "churn")
    acfg = src.build(al.AlertConfig, "alerts", {"threshold": args.threshold, "budget": args.budget})
    ds = load_dataset(args.dataset, data_dir=args.data_dir)
    model = al.obtain_model(ds, ccfg, acfg, args.model)
    sinks: list[al.Sink] = [al.JsonlSink(args.sink)]
    if args.webhook:
        sinks.append(al.WebhookSink(args.webhook))
    state_path = Path(args.state or f"{args.sink}.state.json")
    watcher = al.Watcher(model, ds, acfg, sinks)
    state = al.load_state(state_path)
    if state is not None:
        watcher.restore(state, str(state_path))
    # a run killed between the sink's fsync and the state's write: its warnings are newer
    # than the saved clock
    watcher.note_published(al.read_warnings(args.sink, since=(state or {}).get("clock")))
    event_log: EventLog
    if args.event_log:
        event_log = SqliteEventLog(args.event_log)
    else:
        from intake.live_log_nats import NatsEventLog, NatsLogConfig

        event_log = NatsEventLog(NatsLogConfig(servers=tuple(args.nats.split(","))))
    stop = threading.Event()
    if not args.once:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    total = 0
    saved: dict[str, Any] | None = None
    print(f"churn watch: following from log position {watcher.position}", flush=True)
    try:
        while True:
            before = watcher.position
            # wall clock: never behind the events already read (a shop clock a little ahead)
            now = None if args.clock == "events" else max(int(time.time()), watcher.clock)
            got = watcher.poll(event_log, now)
            st = watcher.state_dict()
            if st != saved:  # written after the sink's fsync, only when something moved
                al.save_state(state_path, st)
                saved = st
            total += len(got)
            day = _dt.datetime.fromtimestamp(watcher.clock, _dt.UTC).isoformat(timespec="seconds")
            if args.once or got or watcher.position != before:
                print(
                    f"{day}: log position {before} -> {watcher.position}, "
                    f"{len(got)} warning(s) -> {args.sink}",
                    flush=True,
                )
            if args.once or stop.wait(args.poll_s):
                break
    finally:
        event_log.close()
    print(f"churn watch: {total} warning(s) published this run")
    if watcher.outbox:
        print(
            f"churn watch: {len(watcher.outbox)} warning(s) not delivered to --webhook yet "
            f"(kept in {state_path}; sent first on the next run)",
            file=sys.stderr,
        )
        return 1
    return 0


def _watch_opts(p: argparse.ArgumentParser) -> None:
    from ecomrec.config import add_config_args
    from intake.loaders.registry import DATASET_HELP

    p.add_argument("--event-log", default=None, help="the embedded live event log file (SQLite)")
    p.add_argument(
        "--nats", default=None, help="NATS servers of the replicated log, comma-separated"
    )
    p.add_argument(
        "--dataset",
        required=True,
        help=DATASET_HELP + "; the history the log's events follow (a dataset saved by "
        "`data import-live` starts after its recorded log position)",
    )
    p.add_argument(
        "--data-dir", default=None, help="bundled datasets folder (default: $ECOMREC_DATA_DIR)"
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="FILE",
        help="the alert model: read when it exists (refused if fitted on other data), else "
        "fitted on the dataset (seconds) and saved there (default: fitted in memory each start)",
    )
    p.add_argument("--sink", required=True, metavar="FILE", help="JSON Lines file of warnings")
    p.add_argument(
        "--webhook", default=None, metavar="URL", help="also POST each round's warnings here"
    )
    p.add_argument(
        "--state", default=None, metavar="FILE", help="watcher state (default: SINK.state.json)"
    )
    p.add_argument(
        "--threshold", type=float, default=None, help="risk threshold (default: the config's, 0.7)"
    )
    p.add_argument(
        "--budget",
        type=int,
        default=None,
        help="most warnings per round, highest risk first (default: the config's, 0 = no limit)",
    )
    p.add_argument(
        "--clock",
        choices=("wall", "events"),
        default="wall",
        help="'now': the wall clock (a live shop), or the latest event time (replays, tests)",
    )
    p.add_argument(
        "--once", action="store_true", help="process what the log holds, then exit (cron)"
    )
    p.add_argument("--poll-s", type=float, default=5.0, help="seconds between log reads")
    add_config_args(
        p,
        tables="[churn] (horizon_days) and [alerts] (AlertConfig) tables",
        example="alerts.cooldown_days=14",
        kind="segments",
        flags="--threshold, --budget",
        config_help="TOML file with [churn] and [alerts] tables (default: the built-in "
        "ecomrec/configs/segments/alerts.toml)",
    )


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the ``segments``, ``campaign`` and ``churn`` subcommands."""
    seg = sub.add_parser("segments", help="RFM and behavioural segments: report, analyst export")
    ss = seg.add_subparsers(dest="segments_cmd", required=True)
    p = ss.add_parser("report", help="HTML report with plots")
    _common(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--currency",
        default=None,
        help="currency code of the amounts, e.g. GBP (default: the dataset's, from "
        "`data import --currency`, else none)",
    )
    _scores_opts(p, producer=True)
    p.set_defaults(func=_segments_report)
    p = ss.add_parser("export", help="analyst Parquet export (pseudonymised ids by default)")
    _common(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--raw-ids", action="store_true", help="export RAW customer ids (explicit opt-in)"
    )
    p.add_argument(
        "--salt", default=None, help="pseudonymisation salt (default $ECOMREC_EXPORT_SALT)"
    )
    p.add_argument("--previous", default=None, help="previous export dir: keep segment ids stable")
    _scores_opts(p)
    p.set_defaults(func=_segments_export)

    camp = sub.add_parser("campaign", help="campaign audiences and per-customer plans")
    cs = camp.add_subparsers(dest="campaign_cmd", required=True)
    p = cs.add_parser("audience", help="customers nearest to a text or to products")
    _common(p)
    p.add_argument("--text", default=None, help="describe the campaign, e.g. 'christmas lights'")
    p.add_argument("--items", default=None, help="comma-separated external item ids")
    p.add_argument("--k", type=int, default=500, help="audience size")
    p.add_argument(
        "--segment", default=None, help="RFM segment name or behavioural segment id/name"
    )
    p.add_argument("--out", default=None, help=".csv or .parquet (default: print)")
    _scores_opts(p)
    p.set_defaults(func=_campaign_audience)
    p = cs.add_parser("plan", help="top products with a reason for each customer of a segment")
    _common(p)
    p.add_argument(
        "--segment", default=None, help="RFM segment name or behavioural segment id/name"
    )
    p.add_argument("--k", type=int, default=5, help="products per customer")
    p.add_argument(
        "--limit", type=int, default=20, help="customers (highest predicted spend first)"
    )
    p.add_argument("--out", default=None, help=".csv or .parquet (default: print)")
    _scores_opts(p)
    p.set_defaults(func=_campaign_plan)
    p = cs.add_parser("evaluate", help="offline audience precision@N per product theme")
    _common(p)
    p.add_argument("--n", type=int, default=200, help="audience size per theme")
    p.add_argument("--out", default=None, help=".csv or .parquet (default: print)")
    p.set_defaults(func=_campaign_evaluate)

    cu = sub.add_parser("customers", help="one customer: profile, segment, churn, similar ones")
    cus = cu.add_subparsers(dest="customers_cmd", required=True)
    p = cus.add_parser("show", help="profile, RFM and behavioural segment, churn score, top items")
    p.add_argument("customer", metavar="ID", help="external customer id (as in the events)")
    _common(p)
    p.add_argument("--top", type=int, default=5, help="number of top items")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--currency",
        default=None,
        help="currency code of the amounts, e.g. GBP (default: the dataset's, else none)",
    )
    _scores_opts(p)
    p.set_defaults(func=_customers_show)
    p = cus.add_parser("similar", help="customers nearest in the behaviour embedding space")
    p.add_argument("customer", metavar="ID", help="external customer id (as in the events)")
    _common(p)
    p.add_argument("--k", type=int, default=10, help="number of similar customers")
    p.add_argument("--out", default=None, help=".csv or .parquet (default: print)")
    p.add_argument(
        "--currency",
        default=None,
        help="currency code of the amounts, e.g. GBP (default: the dataset's, else none)",
    )
    _scores_opts(p)
    p.set_defaults(func=_customers_similar)
    p = cus.add_parser(
        "forget",
        help="remove a customer from the live log, the dataset folder and derived files "
        "(docs/events.md); prints a receipt, exit 1 if a trace is still found",
    )
    p.add_argument("customer", metavar="ID", help="external customer id (as in the events)")
    p.add_argument(
        "--dataset", required=True, help="the saved dataset folder (ecomrec data import --out)"
    )
    p.add_argument(
        "--event-log", default=None, help="the embedded live event log file (serve's event_log)"
    )
    p.add_argument(
        "--nats", default=None, help="NATS servers of the replicated log, comma-separated"
    )
    p.add_argument(
        "--artifacts",
        nargs="*",
        default=[],
        help="derived folders to clean and search: segments/export outputs, batch outputs",
    )
    p.add_argument(
        "--key",
        action="append",
        default=[],
        help="a pseudonymisation key in use (segments export salt, serve's pseudonym_salt); repeatable",
    )
    p.set_defaults(func=_customers_forget)

    ch = sub.add_parser("churn", help="churn / high-value models")
    chs = ch.add_subparsers(dest="churn_cmd", required=True)
    p = chs.add_parser("evaluate", help="BG/NBD vs GBDT vs heads on the temporal split")
    _common(p)
    p.add_argument("--modes", default="frozen", help="comma list of frozen,lora,full")
    p.add_argument("--out", default=None, help="JSON file")
    p.set_defaults(func=_churn_evaluate)
    p = chs.add_parser(
        "truncate", help="save the dataset cut before the test cutoff (to train a leak-free tower)"
    )
    _common(p)
    p.add_argument("--out", required=True, help="output directory (a saved Dataset)")
    p.set_defaults(func=_churn_truncate)
    p = chs.add_parser(
        "watch",
        help="real-time churn warnings: follow the live event log, publish customers whose "
        "risk crosses the threshold to a JSONL sink (docs/segments.md, Churn warnings)",
    )
    _watch_opts(p)
    p.set_defaults(func=_churn_watch)
