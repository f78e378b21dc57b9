"""Replay a shop week by week: refreshed vs stale vs fully retrained model.

Online Retail by default, its last ``--weeks`` weeks (boundaries b_0 < ... < b_W, b_W =
the last event + 1 s). Week 0: one model trained from scratch on the events before b_0;
it is the live model of the refresh state, the stale model (never refreshed again) and
week 0's retrain. Week k = 1..W-1: ``lifecycle.refresh.refresh`` with the events before
b_k (the real job: warm start, shadow evaluation, promotion decision, ONNX export,
re-embedding, index build + verify + swap), a full retrain from scratch on the same
events (same recipe and epochs as week 0), then all three models are scored on the next
week [b_k, b_{k+1}) with the history before b_k: full-ranking NDCG@10 (every item ranked,
history excluded; targets = new items each customer bought that week).

Week 0 and every retrain run ``ecomrec train``'s selection (``training.protocol``), so
the refreshed model is the family a shop is served (the basket tower or EASE on a
transaction log: refit by the refresh; the sequence tower: warm-started);
``--sequence-only`` trains the sequence tower with fixed epochs instead (the issue-16
replay).

    nice -n 5 python benchmarks/refresh.py --dataset online-retail --weeks 12 \
        --out results/refresh_online_retail.json

Writes the JSON ``{"weeks": [...], "summary": {...}}``, a PNG plot next to it and a
markdown table. Timings are wall seconds on the machine as it is (``load`` records the
load average); ``*_cpu_seconds`` are process CPU seconds (less sensitive to other jobs).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from intake.dataset import Dataset
from intake.loaders import load_dataset
from lifecycle.refresh import RefreshConfig, refresh
from lifecycle.shadow import ranking_metrics, window_targets
from towers.inference import load_run
from towers.sequences import Interactions
from training.trainer import Trainer, default_config_path, load_run_config

log = logging.getLogger("benchmarks.refresh")
WEEK = 7 * 86400
ROOT = Path(__file__).resolve().parent.parent


class PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 20 ms)."""

    def __init__(self) -> None:
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def cut(ds: Dataset, until: int) -> Dataset:
    """The shop as it was at ``until``: events before it (the catalogue stays whole)."""
    return Dataset(
        ds.name, ds.events.filter(pl.col("ts") < until), ds.items, ds.users, ds.item_ids, ds.report
    )


def train_scratch(ds: Dataset, cfg: Any, out: Path) -> tuple[Path, float, float]:
    """Train from scratch on every event of ``ds`` (fixed epochs, no validation)."""
    t, c = time.perf_counter(), time.process_time()
    inter = Interactions.from_events(ds.events, ds.n_users, ds.n_items)
    Trainer(cfg, ds.items, ds.item_ids.external_ids, out).fit(inter, None, resume=False)
    return out, time.perf_counter() - t, time.process_time() - c


def train_selected(
    ds: Dataset, config: Any, overrides: dict[str, Any], out: Path
) -> tuple[Path, float, float]:
    """What ``ecomrec train`` does (``training.protocol``): the split rule, the family's
    tower vs ALS/EASE chosen on validation, the winner refit and saved for serving."""
    from training.protocol import make_split, save_served, select_model

    t, c = time.perf_counter(), time.process_time()
    split = make_split(ds, "auto")
    sel = select_model(ds, split, config=config, overrides=overrides, run_dir=out, test=False)
    served = save_served(sel, ds, out)
    log.info("selected %s (%s) on %s", sel.served, served["kind"], split.protocol.get("rule"))
    return out, time.perf_counter() - t, time.process_time() - c


def score(run: Path, targets: Any, history: Interactions) -> float:
    tm = load_run(run)
    return float(ranking_metrics(tm.model, targets, history, tm.max_len).get("ndcg@10", 0.0))


def main(argv: list[str] | None = None) -> int:
    from ecomrec.cli import HelpFormatter  # shows each default once

    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--dataset", default="online-retail", help="dataset name or path")
    ap.add_argument("--weeks", type=int, default=12, help="weeks replayed at the end of the data")
    ap.add_argument(
        "--config",
        default=str(ROOT / "configs" / "towers" / "quick.toml"),
        help="two-tower config of the week-0 model and of every full retrain",
    )
    ap.add_argument("--epochs", type=int, default=4, help="epochs of week 0 and of each retrain")
    ap.add_argument(
        "--sequence-only",
        action="store_true",
        help="week 0 and the retrains train the sequence tower (fixed epochs, no selection); "
        "default: `ecomrec train`'s selection, so the refreshed family is the served one "
        "(the basket tower or EASE on a transaction log)",
    )
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="run config override of the selection (as `ecomrec train --set`)",
    )
    ap.add_argument("--refresh-epochs", type=int, default=2, help="warm-start epochs per refresh")
    ap.add_argument("--refresh-lr", type=float, default=1e-3, help="warm-start learning rate")
    ap.add_argument("--eval-days", type=float, default=3.0, help="refresh shadow window (days)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--work", default="results/refresh_bench", help="work directory (wiped)")
    ap.add_argument("--out", default="results/refresh_online_retail.json", help="JSON output")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ds = load_dataset(args.dataset)
    end = int(ds.events["ts"].max()) + 1  # type: ignore[arg-type]
    bounds = [end - (args.weeks - i) * WEEK for i in range(args.weeks + 1)]
    overrides = {"threads": args.threads, "tensorboard": False, "progress": False}
    cfg = load_run_config(
        args.config or default_config_path(),
        **overrides,
        pretrain={"epochs": args.epochs, "patience": args.epochs + 1},
    )
    rcfg = RefreshConfig(
        epochs=args.refresh_epochs,
        lr=args.refresh_lr,
        eval_days=args.eval_days,
        threads=args.threads,
    )
    inter_all = Interactions.from_events(ds.events, ds.n_users, ds.n_items)
    weeks: list[dict[str, Any]] = []
    from training.cli import parse_overrides

    sel_ov = {**overrides, **parse_overrides(args.set)}

    def retrain_on(d: Dataset, out: Path) -> tuple[Path, float, float]:
        if args.sequence_only:
            return train_scratch(d, cfg, out)
        return train_selected(d, args.config or default_config_path(), sel_ov, out)

    week0, w0_s, w0_cpu = retrain_on(cut(ds, bounds[0]), work / "week0")
    log.info("week 0 model trained in %.1f s", w0_s)
    live = week0
    index = work / "index"
    for k in range(args.weeks):
        lo, hi = bounds[k], bounds[k + 1]
        row: dict[str, Any] = {"week": k, "start": lo, "end": hi, "load": os.getloadavg()[0]}
        now = cut(ds, lo)
        if k == 0:
            retrain, row["retrain_seconds"], row["retrain_cpu_seconds"] = week0, w0_s, w0_cpu
            row.update(refresh_seconds=0.0, promoted=None, decision="initial")
        else:
            t, c = time.perf_counter(), time.process_time()
            with PeakRSS() as mem:
                res = refresh(week0, now, index, config=rcfg, since=bounds[0] if k == 1 else None)
            row["refresh_seconds"] = time.perf_counter() - t
            row["refresh_cpu_seconds"] = time.process_time() - c
            row["refresh_peak_rss_mb"] = mem.mb
            row["promoted"] = res.decision == "promoted"
            row["decision"] = res.decision
            row["reason"] = res.reason
            row["refresh_train_seconds"] = res.timings.get("train_seconds", 0.0) + res.timings.get(
                "refit_seconds", 0.0
            )
            row["index_build_seconds"] = res.timings.get("index_build_seconds")
            row["index_seconds"] = res.timings.get("index_seconds")
            row["alerts"] = res.alerts
            state = json.loads((index.parent / "index.refresh" / "deploy.json").read_text())
            live = Path(state["live"]["run"])
            retrain, row["retrain_seconds"], row["retrain_cpu_seconds"] = retrain_on(
                now, work / f"retrain{k}"
            )
        targets, history = window_targets(inter_all, lo, hi)
        row["scored_users"] = len(targets)
        row["refreshed"] = score(live, targets, history)
        row["stale"] = score(week0, targets, history)
        row["retrain"] = score(retrain, targets, history)
        log.info(
            "week %d: %s",
            k,
            {
                x: row[x]
                for x in ("refreshed", "stale", "retrain", "refresh_seconds", "retrain_seconds")
            },
        )
        weeks.append(row)
        if k > 1:
            shutil.rmtree(work / f"retrain{k - 1}", ignore_errors=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"weeks": weeks, "summary": summary(weeks, args)}, indent=2))
    write_outputs(weeks, args)
    return 0


def summary(weeks: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    ref = [w for w in weeks if w["week"] > 0]
    if not ref:
        return {}
    r = np.array([w["refreshed"] for w in ref])
    s = np.array([w["stale"] for w in ref])
    f = np.array([w["retrain"] for w in ref])
    rs = np.array([w["refresh_seconds"] for w in ref])
    fs = np.array([w["retrain_seconds"] for w in ref])
    rc = np.array([w.get("refresh_cpu_seconds", 0.0) for w in ref])
    fc = np.array([w.get("retrain_cpu_seconds", 0.0) for w in ref])
    return {
        "dataset": args.dataset,
        "weeks_refreshed": len(ref),
        "mean_refreshed": float(r.mean()),
        "mean_stale": float(s.mean()),
        "mean_retrain": float(f.mean()),
        "refreshed_ge_stale_weeks": int((r >= s).sum()),
        "refreshed_vs_retrain": float(r.mean() / f.mean() - 1.0) if f.mean() else None,
        "refresh_over_retrain_time": float(rs.sum() / fs.sum()) if fs.sum() else None,
        "refresh_over_retrain_cpu": float(rc.sum() / fc.sum()) if fc.sum() else None,
        "promoted_weeks": int(sum(bool(w["promoted"]) for w in ref)),
        "mean_refresh_seconds": float(rs.mean()),
        "mean_retrain_seconds": float(fs.mean()),
        "max_refresh_peak_rss_mb": float(max(w.get("refresh_peak_rss_mb", 0.0) for w in ref)),
        "mean_index_build_seconds": float(
            np.mean([w.get("index_build_seconds") or 0.0 for w in ref])
        ),
        "goals": {
            "refreshed >= stale every week": bool((r >= s).all()),
            "within 2% of retrain on average": bool(r.mean() >= 0.98 * f.mean()),
            "<= 25% of retrain time": bool(rs.sum() <= 0.25 * fs.sum()),
        },
        "config": {
            "model": args.config,
            "epochs": args.epochs,
            "refresh_epochs": args.refresh_epochs,
            "refresh_lr": args.refresh_lr,
            "eval_days": args.eval_days,
            "threads": args.threads,
        },
        "load_avg": [
            float(np.min([w["load"] for w in weeks])),
            float(np.max([w["load"] for w in weeks])),
        ],
    }


def write_outputs(weeks: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    x = [w["week"] for w in weeks]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, style in (("refreshed", "o-"), ("stale", "s--"), ("retrain", "^:")):
        a1.plot(x, [w[key] for w in weeks], style, label=key)
    for w in weeks:
        if w["promoted"] is False:
            a1.axvline(w["week"], color="grey", alpha=0.2)
    a1.set_xlabel("week (scored on the next week)")
    a1.set_ylabel("NDCG@10 (full ranking)")
    a1.set_title(f"{args.dataset}: refreshed vs stale vs retrain")
    a1.legend()
    ref = [w for w in weeks if w["week"] > 0]
    a2.bar(
        [w["week"] - 0.2 for w in ref],
        [w["refresh_seconds"] for w in ref],
        0.4,
        label="refresh (whole job)",
    )
    a2.bar(
        [w["week"] + 0.2 for w in ref],
        [w["retrain_seconds"] for w in ref],
        0.4,
        label="retrain (training only)",
    )
    a2.set_xlabel("week")
    a2.set_ylabel("wall seconds")
    a2.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    rows = [
        "| week | refreshed | stale | retrain | promoted | refresh s | retrain s | refresh peak RSS MB | index build s | load |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for w in weeks:
        rows.append(
            f"| {w['week']} | {w['refreshed']:.4f} | {w['stale']:.4f} | {w['retrain']:.4f} | "
            f"{'-' if w['promoted'] is None else ('yes' if w['promoted'] else 'no')} | "
            f"{w['refresh_seconds']:.1f} | {w['retrain_seconds']:.1f} | "
            f"{w.get('refresh_peak_rss_mb', 0):.0f} | {w.get('index_build_seconds') or 0:.1f} | {w['load']:.1f} |"
        )
    out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    print(json.dumps(summary(weeks, args), indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
