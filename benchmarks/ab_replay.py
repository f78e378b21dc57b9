"""A/B replay: a simulated shop replays a real log's last weeks through the gRPC service
running an A/B test, then the online promotion rule decides each candidate.

Online Retail by default. Cut-offs: the replay period is the last ``--weeks`` weeks
``[t_r, end)``; the models are fitted on the events before ``t_r`` (a model served in a
shop never saw the weeks it is tested on) and the served history / catalogue is the
dataset cut at ``t_r``.

Variants (one experiment, equal shares, :mod:`outcomes.experiment`), the scenario of a
refresh candidate tested online against a live model that was not refreshed for a while:

* ``control``: the live model (``ecomrec serve --model``): ALS in its served form
  (:mod:`training.fallback`) fitted ``--control-age-weeks`` (13) before ``t_r``;
* ``better``: the fresh refit: the better of ALS and EASE **on validation**, fitted on
  every event before ``t_r``;
* ``worse``: a deliberately crude model: ALS with 2 factors, fitted before ``t_r``.

Validation (the roles are checked there, never on the replayed weeks): each recipe is
fitted with the same age on the events before ``t_v = t_r - valid_weeks`` (the control:
``control_age_weeks`` before ``t_v``) and scored on ``[t_v, t_r)`` (full-ranking NDCG@10,
history excluded, the temporal protocol).

The shop (``replay``): every customer-day with purchases in ``[t_r, end)`` of a customer
known at ``t_r``, in time order (``--max-customer-days`` keeps a seeded subset, still in
time order): ``Recommend(customer, k)``; ``TrackEvents`` with an ``impression`` for each
shown product (carrying the answer's ``recommendation_id``), a ``click`` for each shown
product the customer really bought that day, then that day's purchases. Events are
stamped by the server (replayed time runs at wall speed: attribution windows are wall
seconds). The purchases also reach the service's live history, so later answers see them.

Then ``outcomes.report.online_report`` (what ``ecomrec report online`` writes) and
``outcomes.promotion.decide`` (what ``ecomrec refresh --decide`` applies) per candidate
against the control: ``"promoted": true|false`` with the measured difference and its
interval.  Also measured: the server's RSS with the three engines vs a server without the
experiment (the memory an extra variant costs).

    nice -n 5 python benchmarks/ab_replay.py --dataset online-retail --weeks 8 \
        --out results/ab_replay_online_retail.json        # + .md table

The service runs as its own process (``python -m ecomrec serve``, real gRPC on
localhost); the client is this process.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

log = logging.getLogger("benchmarks.ab_replay")
WEEK = 7 * 86400
DAY = 86400
ROOT = Path(__file__).resolve().parent.parent
ALS = {"factors": 128, "regularization": 1.0, "alpha": 10.0, "iterations": 15}
EASE = {"l2": 250.0}
CRUDE = {**ALS, "factors": 2}  # the deliberately worse candidate


def cut(ds: Any, until: int) -> Any:
    """``ds`` with the events before ``until`` (same catalogue and id maps)."""
    from intake.dataset import Dataset

    return Dataset(
        ds.name, ds.events.filter(pl.col("ts") < until), ds.items, ds.users, ds.item_ids, ds.report
    )


def fit(kind: str, params: dict[str, Any], ds: Any, until: int) -> Any:
    """ALS or EASE (served form) fitted on the events before ``until``."""
    from towers.sequences import Interactions
    from training.fallback import FactorRetriever
    from training.trainer import FallbackConfig

    inter = Interactions.from_events(ds.events.filter(pl.col("ts") < until), ds.n_users, ds.n_items)
    r = FactorRetriever(kind, params, FallbackConfig())
    r.fit(inter, None)
    return r


def validate(
    r: Any, ds: Any, lo: int, hi: int, history_until: int | None = None
) -> dict[str, float]:
    """Full-ranking metrics on the purchases in ``[lo, hi)`` (history = events before lo)."""
    from lifecycle.shadow import window_targets
    from towers.sequences import Interactions
    from training.fallback import evaluate_factor

    inter = Interactions.from_events(ds.events, ds.n_users, ds.n_items)
    targets, history = window_targets(inter, lo, hi)
    m = evaluate_factor(r.served_model(), targets, history)
    return {k: float(v) for k, v in m.items()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    """``python -m ecomrec serve`` as its own process, waited on until health SERVING."""

    def __init__(self, work: Path, name: str, run: Path, dataset: Path, index: Path, **serve: Any):
        self.port = free_port()
        cfg = work / f"{name}.toml"
        lines = ["[serve]", f"port = {self.port}"]
        for k, v in serve.items():
            lines.append(f"{k} = {json.dumps(v)}")
        cfg.write_text("\n".join(lines) + "\n")
        self.log = open(work / f"{name}.log", "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "ecomrec", "serve", "--model", str(run), "--dataset",
               str(dataset), "--index", str(index), "--config", str(cfg)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.target = f"127.0.0.1:{self.port}"

    def wait(self, timeout: float = 600.0) -> None:
        from serving.client import RecommendClient

        end = time.monotonic() + timeout
        with RecommendClient(self.target, timeout_s=5.0) as c:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"server exited ({self.proc.returncode}): see {self.log.name}"
                    )
                if c.wait_ready(timeout_s=2.0):
                    return
        raise TimeoutError(f"server not SERVING after {timeout} s: see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def customer_days(ds: Any, served: Any, t_r: int, cap: int, seed: int) -> pl.DataFrame:
    """One row per (customer, day) with purchases in ``[t_r, end)`` of a customer with
    history before ``t_r``: user, day, first ts, items, quantities, prices (time order)."""
    known = set(served.events["user_id"].unique().to_list())
    ev = ds.events.filter(
        (pl.col("ts") >= t_r)
        & (pl.col("event_type") == "purchase")
        & pl.col("user_id").is_in(known)
    ).with_columns((pl.col("ts") // DAY).alias("day"))
    days = (
        ev.group_by("user_id", "day")
        .agg(
            pl.col("ts").min().alias("t"),
            pl.col("item_id"),
            pl.col("quantity"),
            pl.col("price"),
        )
        .sort("t", "user_id")
    )
    if cap and days.height > cap:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(days.height, cap, replace=False))
        days = days[keep.tolist()]
    return days


def replay(target: str, ds: Any, days: pl.DataFrame, k: int) -> dict[str, Any]:
    """Drive the shop through the service (module docstring); returns counts and timings."""
    from serving.client import RecommendClient

    users, items = ds.users, ds.item_ids
    n_calls = n_hits = n_shown = 0
    per_variant: dict[str, int] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    with RecommendClient(target, timeout_s=30.0) as c:
        pb = c.pb
        for row in days.iter_rows(named=True):
            customer = users.to_external(row["user_id"])
            resp = c.recommend(customer, k)
            rid = resp.recommendation_id
            per_variant[resp.variant] = per_variant.get(resp.variant, 0) + 1
            shown = [i.item_id for i in resp.items]
            bought = {items.to_external(i) for i in row["item_id"]}
            hits = [i for i in shown if i in bought]
            n_calls += 1
            n_shown += len(shown)
            n_hits += len(hits)
            evs = [
                pb.TrackedEvent(
                    customer_id=customer,
                    product_id=i,
                    event_type="impression",
                    recommendation_id=rid,
                )
                for i in shown
            ]
            evs += [
                pb.TrackedEvent(
                    customer_id=customer, product_id=i, event_type="click", recommendation_id=rid
                )
                for i in hits
            ]
            for item, q, p in zip(row["item_id"], row["quantity"], row["price"], strict=True):
                e = pb.TrackedEvent(
                    customer_id=customer,
                    product_id=items.to_external(item),
                    event_type="purchase",
                    quantity=max(int(q), 1),
                    recommendation_id=rid if items.to_external(item) in hits else "",
                )
                if p is not None:
                    e.price = float(p)
                evs.append(e)
            for j in range(0, len(evs), 1000):  # max_track_events per call
                r = c.stub.TrackEvents(
                    pb.TrackEventsRequest(events=evs[j : j + 1000]), timeout=30.0
                )
                if r.errors:
                    raise RuntimeError(f"TrackEvents refused events: {list(r.errors)[:3]}")
    return {
        "customer_days": n_calls,
        "answers_per_variant": per_variant,
        "shown": n_shown,
        "clicks": n_hits,
        "wall_seconds": time.perf_counter() - t0,
        "client_cpu_seconds": time.process_time() - c0,
    }


def main(argv: list[str] | None = None) -> int:
    from ecomrec.cli import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--dataset", default="online-retail", help="dataset name or path")
    ap.add_argument("--data-dir", default=None, help="data folder (default: $ECOMREC_DATA_DIR)")
    ap.add_argument("--weeks", type=int, default=8, help="replayed weeks at the end of the log")
    ap.add_argument("--valid-weeks", type=int, default=4, help="validation weeks before them")
    ap.add_argument(
        "--control-age-weeks",
        type=int,
        default=13,
        help="the live model (control) was fitted this many weeks before the replay",
    )
    ap.add_argument("--k", type=int, default=10, help="recommendations per answer")
    ap.add_argument(
        "--max-customer-days", type=int, default=0, help="replay a seeded subset (0 = all)"
    )
    ap.add_argument("--min-impressions", type=int, default=1000, help="promotion rule: per variant")
    ap.add_argument("--margin", type=float, default=0.0, help="promotion rule: lo > -margin")
    ap.add_argument("--metric", default="ctr", help="promotion rule: primary metric")
    ap.add_argument("--seed", type=int, default=0, help="subset seed")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed)")
    ap.add_argument(
        "--out", default="results/ab_replay_online_retail.json", help="JSON output (+ .md)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from indexing.cli import build_index
    from intake.loaders import load_dataset
    from outcomes.experiment import Experiment, Variant, write_experiment
    from outcomes.promotion import PromotionRule, decide
    from outcomes.report import online_report
    from training.protocol import write_served

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ab_replay_"))
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    ds = load_dataset(args.dataset, args.data_dir)
    end = int(ds.events["ts"].max()) + 1  # type: ignore[arg-type]
    t_r = end - args.weeks * WEEK
    t_v = t_r - args.valid_weeks * WEEK
    age = args.control_age_weeks * WEEK
    iso = lambda t: dt.datetime.fromtimestamp(t, dt.UTC).date().isoformat()  # noqa: E731

    # 1. validation: the fresh refit's family (ALS or EASE), and every role's score
    t = time.perf_counter()
    valid = {
        "als": validate(fit("als", ALS, ds, t_v), ds, t_v, t_r),
        "ease": validate(fit("ease", EASE, ds, t_v), ds, t_v, t_r),
    }
    fresh = "ease" if valid["ease"]["ndcg@10"] > valid["als"]["ndcg@10"] else "als"
    roles: dict[str, tuple[str, dict[str, Any], int, str]] = {
        "control": ("als", ALS, t_r - age, f"ALS fitted {args.control_age_weeks} weeks earlier"),
        "better": (fresh, ALS if fresh == "als" else EASE, t_r, f"fresh {fresh.upper()} refit"),
        "worse": ("als", CRUDE, t_r, "crude: ALS with 2 factors"),
    }
    valid["control"] = validate(fit("als", ALS, ds, t_v - age), ds, t_v, t_r)
    valid["better"] = valid[fresh]
    valid["worse"] = validate(fit("als", CRUDE, ds, t_v), ds, t_v, t_r)
    valid_s = time.perf_counter() - t
    log.info("validation NDCG@10: %s", {k: round(v["ndcg@10"], 4) for k, v in valid.items()})

    # 2. the served models (fitted before t_r) and their indexes, over the cut dataset
    served_ds = cut(ds, t_r)
    ds_dir = work / "dataset"
    if ds_dir.exists():
        shutil.rmtree(ds_dir)
    served_ds.save(ds_dir)
    runs: dict[str, Path] = {}
    for role, (kind, params, until, _) in roles.items():
        run = work / "runs" / role
        shutil.rmtree(run, ignore_errors=True)
        write_served(
            run,
            kind,
            fit(kind, params, ds, until),
            list(ds.item_ids.external_ids),
            {"params": params, "fitted_until": until},
            model_version=f"ab-{role}-{kind}-{iso(until)}",
        )
        idx = work / "index" / role
        shutil.rmtree(idx, ignore_errors=True)
        build_index(str(idx), str(run), str(ds_dir))
        runs[role] = run

    # 3. the experiment: control = the served model, two candidates, equal shares
    exp = Experiment(
        "ab-replay",
        (
            Variant("control", 1 / 3),
            Variant("worse", 1 / 3, run=str(runs["worse"]), index=str(work / "index" / "worse")),
            Variant("better", 1 / 3, run=str(runs["better"]), index=str(work / "index" / "better")),
        ),
    )
    write_experiment(work / "experiment.json", exp)
    serve = {
        "complements": False,
        "product_search": False,
        "encoder": "inprocess",
        "index_local_copy": False,
        "default_deadline_s": 30.0,
    }
    # memory of one extra engine: a server without the experiment first
    base = Server(work, "plain", runs["control"], ds_dir, work / "index" / "control", **serve)
    try:
        base.wait()
        rss_plain = rss_mb(base.proc.pid)
    finally:
        base.stop()
    events_db = work / "events.db"
    events_db.unlink(missing_ok=True)
    srv = Server(
        work,
        "ab",
        runs["control"],
        ds_dir,
        work / "index" / "control",
        event_log=str(events_db),
        experiment=str(work / "experiment.json"),
        **serve,
    )
    try:
        t = time.perf_counter()
        srv.wait()
        start_s = time.perf_counter() - t
        rss_ab = rss_mb(srv.proc.pid)
        days = customer_days(ds, served_ds, t_r, args.max_customer_days, args.seed)
        since = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        stats = replay(srv.target, ds, days, args.k)
        time.sleep(1.0)  # the served log is committed every served_log_flush_s (0.2 s)
        server_cpu = _cpu_seconds(srv.proc.pid)
    finally:
        srv.stop()
    report = online_report(
        events_db,
        since,
        dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1),
        baseline="control",
    )
    (work / "online.json").write_text(json.dumps(report, indent=2, default=float))
    rule = PromotionRule(
        metric=args.metric, min_impressions=args.min_impressions, margin=args.margin
    )
    totals = {v["variant"]: v for v in report.get("variant_totals", report["variants"])}
    candidates = []
    for role in ("worse", "better"):
        v = decide(report, rule, candidate=role, baseline="control", age_s=0.0)
        kind, params, until, what = roles[role]
        candidates.append(
            {
                "variant": role,
                "model": f"{what} (events before {iso(until)})",
                "params": params,
                "valid_ndcg@10": valid[role]["ndcg@10"],
                "impressions": v.impressions,
                "metric": rule.metric,
                "value": totals.get(role, {}).get("metrics", {}).get(rule.metric, {}).get("value"),
                "difference": {"value": v.value, "lo": v.lo, "hi": v.hi},
                "action": v.action,
                "reason": v.reason,
                "promoted": v.promoted,
            }
        )
    out = {
        "dataset": args.dataset,
        "replay_period": [iso(t_r), iso(end)],
        "validation_period": [iso(t_v), iso(t_r)],
        "control": {
            "model": f"{roles['control'][3]} (events before {iso(t_r - age)})",
            "valid_ndcg@10": valid["control"]["ndcg@10"],
            "impressions": totals.get("control", {}).get("impressions"),
            "value": totals.get("control", {}).get("metrics", {}).get(rule.metric, {}).get("value"),
        },
        "validation": valid,
        "candidates": candidates,
        "rule": {
            "metric": rule.metric,
            "min_impressions": rule.min_impressions,
            "margin": rule.margin,
            "text": "promote when each variant has >= min_impressions and the difference's "
            "interval lower bound > -margin; reject when its upper bound < 0",
        },
        "replay": {
            **stats,
            "server_cpu_seconds": server_cpu,
            "server_start_seconds": start_s,
            "client_cpu_ms_per_customer_day": 1e3
            * stats["client_cpu_seconds"]
            / max(stats["customer_days"], 1),
            "server_cpu_ms_per_customer_day": 1e3 * server_cpu / max(stats["customer_days"], 1),
        },
        "memory": {
            "server_rss_mb_plain": rss_plain,
            "server_rss_mb_three_variants": rss_ab,
            "per_extra_variant_mb": (rss_ab - rss_plain) / 2,
        },
        "report": {
            k: report[k] for k in ("variant_totals", "differences", "attribution") if k in report
        },
        "validation_seconds": valid_s,
        "total_seconds": time.perf_counter() - t_all,
        "load": os.getloadavg(),
        "command": " ".join(
            [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
        ),
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=float))
    path.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def markdown(out: dict[str, Any]) -> str:
    m = out["rule"]["metric"]
    c = out["control"]
    lines = [
        f"A/B replay of {out['dataset']} {out['replay_period'][0]} .. {out['replay_period'][1]} "
        f"({out['replay']['customer_days']:,} customer-days, "
        f"{out['replay']['wall_seconds']:.0f} s); validation {out['validation_period'][0]} .. "
        f"{out['validation_period'][1]}",
        "",
        f"| variant | model | valid NDCG@10 | impressions | {m} | difference vs control [95% interval] | decision | promoted |",
        "|---|---|---:|---:|---:|---|---|---|",
        f"| control | {c['model']} | {c['valid_ndcg@10']:.4f} | {c['impressions'] or 0:,} | "
        f"{(c['value'] or 0):.4f} | | | |",
    ]
    for x in out["candidates"]:
        d = x["difference"]
        diff = (
            f"{d['value']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"
            if d["value"] is not None
            else "n/a"
        )
        lines.append(
            f"| {x['variant']} | {x['model']} | {x['valid_ndcg@10']:.4f} | {x['impressions']:,} | "
            f"{(x['value'] or 0):.4f} | {diff} | {x['action']} | {str(x['promoted']).lower()} |"
        )
    mem = out["memory"]
    lines += [
        "",
        f"Rule: {out['rule']['text']} (min_impressions {out['rule']['min_impressions']}, margin "
        f"{out['rule']['margin']}). Server RSS {mem['server_rss_mb_plain']:.0f} MB with one engine, "
        f"{mem['server_rss_mb_three_variants']:.0f} MB with three ({mem['per_extra_variant_mb']:.0f} "
        f"MB per extra variant); server CPU {out['replay']['server_cpu_ms_per_customer_day']:.1f} ms "
        "per customer-day (Recommend + TrackEvents).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
