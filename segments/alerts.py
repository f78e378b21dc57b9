"""Churn warnings in real time: a watcher over the live event log, and the warnings sink.

The sink (the format other parts read; docs/segments.md "Churn warnings") is a JSON Lines
file, one warning per line, appended one whole line per ``write`` (``O_APPEND``) and
fsync'd before the watcher moves on::

    {"customer_id": "shop id", "ts": "2011-09-04T00:00:00+00:00", "risk": 0.83,
     "threshold": 0.7,
     "reasons": [{"kind": "recency", "text": "no purchase for 64 days (usual gap 21)"}],
     "segment": "At Risk", "previous_segment": "Loyal"}

``kind`` is one of :data:`REASON_KINDS`. ``ts`` is the watcher's clock when the warning
was made (UTC, ISO 8601). :func:`read_warnings` reads the file back, newest first, and
skips a torn last line (a writer killed mid-line).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pickle
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from ecomrec.errors import ConfigError, DataError, EcomrecError, MismatchError, NotFoundError
from intake.dataset import Dataset
from intake.live_log import EventLog, StoredEvent
from intake.schema import EVENTS_SCHEMA
from segments.churn import ChurnConfig, limited_threads
from segments.labels import LabelConfig, make_labels
from segments.rfm import FEATURE_COLUMNS, SEGMENTS, RFMScorer, customer_features

log = logging.getLogger(__name__)

REASON_KINDS: tuple[str, ...] = ("recency", "frequency_drop", "segment_move")


class DeliveryError(EcomrecError, ConnectionError):
    """A sink could not take the warnings (a webhook down or refusing them)."""


# --------------------------------------------------------------------------- format
@dataclass(frozen=True)
class Reason:
    """Why a customer is warned: ``kind`` (one of REASON_KINDS) and a sentence for people."""

    kind: str
    text: str

    def __post_init__(self) -> None:
        if self.kind not in REASON_KINDS:
            raise DataError(f"reason kind {self.kind!r} is not one of {', '.join(REASON_KINDS)}")


@dataclass(frozen=True)
class ChurnWarning:
    """One churn warning as the sink holds it (see the module docstring)."""

    customer_id: str
    ts: int  # unix seconds (written as ISO 8601, UTC)
    risk: float
    threshold: float
    reasons: tuple[Reason, ...]
    segment: str
    previous_segment: str
    extra: dict[str, Any] = field(default_factory=dict)  # written as-is after the fields

    def to_dict(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "ts": iso(self.ts),
            "risk": round(float(self.risk), 4),
            "threshold": float(self.threshold),
            "reasons": [{"kind": r.kind, "text": r.text} for r in self.reasons],
            "segment": self.segment,
            "previous_segment": self.previous_segment,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ChurnWarning:
        """Back from :meth:`to_dict` (unknown keys go to ``extra``)."""
        known = {"customer_id", "ts", "risk", "threshold", "reasons", "segment", "previous_segment"}
        return cls(
            customer_id=d["customer_id"],
            ts=int(_to_ts(d["ts"])),
            risk=float(d["risk"]),
            threshold=float(d["threshold"]),
            reasons=tuple(Reason(r["kind"], r["text"]) for r in d["reasons"]),
            segment=d["segment"],
            previous_segment=d["previous_segment"],
            extra={k: v for k, v in d.items() if k not in known},
        )


def iso(ts: float) -> str:
    """Unix seconds -> ISO 8601 in UTC (``2011-09-04T00:00:00+00:00``)."""
    return dt.datetime.fromtimestamp(int(ts), dt.UTC).isoformat()


def _to_ts(value: str | float | dt.datetime) -> float:
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    try:
        d = dt.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError as e:
        raise DataError(f"since: {value!r} is not an ISO 8601 time or unix seconds") from e
    return _to_ts(d)


def validate_warning(obj: Any, where: str) -> dict[str, Any]:
    """Check one parsed line has the sink's fields and types; return it (DataError names ``where``)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: a warning must be a JSON object")
    need = {
        "customer_id": str,
        "ts": str,
        "risk": (int, float),
        "threshold": (int, float),
        "reasons": list,
        "segment": str,
        "previous_segment": str,
    }
    for key, typ in need.items():
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], typ):  # type: ignore[arg-type]
            raise DataError(f"{where}: field {key!r} has the wrong type")
    for r in obj["reasons"]:
        if not isinstance(r, dict) or r.get("kind") not in REASON_KINDS or "text" not in r:
            raise DataError(f"{where}: a reason must be {{kind: {'|'.join(REASON_KINDS)}, text}}")
    _to_ts(obj["ts"])
    return obj


def read_warnings(path: str | Path, since: str | float | dt.datetime | None = None) -> list[dict]:
    """The warnings of a sink file, newest first (by ``ts``; file order breaks ties, later
    first). ``since`` (ISO 8601 text, a datetime, or unix seconds) keeps warnings with
    ``ts >= since``. A missing file is an empty list; a line that is not JSON (a torn write:
    a writer killed mid-line) is skipped with a log line; a JSON line without the sink's
    fields is a DataError naming the file and line."""
    p = Path(path)
    if not p.exists():
        return []
    if p.is_dir():
        raise ConfigError(f"warnings sink {p} is a folder; give a file path")
    lines = p.read_bytes().split(b"\n")
    cut = _to_ts(since) if since is not None else None
    out: list[tuple[float, int, dict]] = []
    for i, raw in enumerate(lines):
        if not raw.strip():
            continue
        where = f"{p}, line {i + 1}"
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            # a writer killed mid-line leaves truncated JSON (the next append starts a new
            # line after it): skipped, never a stop for the readers
            log.warning("%s: skipping a torn line (not JSON)", where)
            continue
        w = validate_warning(obj, where)
        ts = _to_ts(w["ts"])
        if cut is not None and ts < cut:
            continue
        out.append((ts, i, w))
    out.sort(key=lambda t: (t[0], t[1]), reverse=True)
    return [w for _, _, w in out]


# --------------------------------------------------------------------------- sinks
class Sink(Protocol):
    """Where warnings go: ``publish`` returns once they are delivered (or raises)."""

    def publish(self, warnings: list[ChurnWarning]) -> None: ...


class JsonlSink:
    """The required sink: appends one JSON line per warning to ``path`` and fsyncs.

    Each line is one ``os.write`` on an ``O_APPEND`` descriptor, so concurrent writers and
    readers never see two warnings interleaved; a crash leaves at most a torn last line,
    which :func:`read_warnings` skips.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ConfigError(f"warnings sink {self.path} is a folder; give a file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def publish(self, warnings: list[ChurnWarning]) -> None:
        if not warnings:
            return
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size > 0:  # repair a torn last line before appending
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        os.write(fd, b"\n")
            for w in warnings:
                line = json.dumps(w.to_dict(), ensure_ascii=False, separators=(",", ":")) + "\n"
                data = line.encode()
                if os.write(fd, data) != len(data):
                    raise OSError(f"short write to {self.path}")
            os.fsync(fd)
        finally:
            os.close(fd)


class WebhookSink:
    """Optional: POSTs ``{"warnings": [...]}`` as JSON to ``url``; retried ``retries`` times
    with exponential backoff (``backoff_s``: 0.5 s, 1 s, ...) on connection errors and 5xx answers; a 4xx
    answer is not retried. Raises :class:`DeliveryError` when every try failed (the watcher
    then keeps the warnings in its outbox and tries again next round)."""

    def __init__(
        self, url: str, *, retries: int = 3, timeout_s: float = 5.0, backoff_s: float = 0.5
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--webhook {url!r} must be an http:// or https:// URL")
        self.url = url
        self.retries = max(0, retries)
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s

    def publish(self, warnings: list[ChurnWarning]) -> None:
        if not warnings:
            return
        body = json.dumps({"warnings": [w.to_dict() for w in warnings]}).encode()
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(
                self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    resp.read()
                return
            except urllib.error.HTTPError as e:
                if e.code < 500:
                    raise DeliveryError(f"webhook {self.url} refused the warnings: {e.code}") from e
                last = e
            except (urllib.error.URLError, OSError) as e:
                last = e
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        raise DeliveryError(
            f"webhook {self.url} failed after {self.retries + 1} tries: {last}"
        ) from last


def publish_all(sinks: Iterable[Sink], warnings: list[ChurnWarning]) -> None:
    """Publish to every sink in order (the JSONL file first: it is the record)."""
    for s in sinks:
        s.publish(warnings)


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class AlertConfig:
    """How the watcher warns (``[alerts]`` of ecomrec/configs/segments/alerts.toml)."""

    # a warning when a customer's churn risk rises to >= threshold ...
    threshold: float = 0.7
    # ... once per crossing: the customer is re-armed only after the risk fell below this
    # (hysteresis), and never warned twice within cooldown_days
    rearm_below: float = 0.5
    cooldown_days: int = 30
    # at most this many warnings per round, highest risk first (0 = no limit); the others
    # stay armed and may be warned in a later round
    budget: int = 0
    # reasons: recency when days since the last purchase >= recency_ratio x the usual gap;
    # frequency_drop when the last trend_days hold <= drop_ratio x the purchases expected
    # from the rate before; segment_move = RFM segment now vs segment_lookback_days ago
    recency_ratio: float = 1.25
    trend_days: int = 56
    drop_ratio: float = 0.5
    segment_lookback_days: int = 28
    # the model: one GBDT fitted on train_cutoffs cutoffs train_step_days apart, the
    # latest one horizon before the model's cutoff (labels end at the cutoff)
    train_cutoffs: int = 4
    train_step_days: int = 14
    min_history_days: int = 28
    # the model reads the trend columns (recent purchases, their share, recency / usual
    # gap) beside the batch features; false = the batch features only (the ablation)
    trend_features: bool = True
    # every customer is re-scored once per full_rescore_s of the clock (recency grows
    # without events); customers with new events at every round
    full_rescore_s: int = 86400

    def __post_init__(self) -> None:
        if not 0.0 <= self.rearm_below <= self.threshold <= 1.0:
            raise ConfigError(
                f"alerts: need 0 <= rearm_below ({self.rearm_below}) <= threshold "
                f"({self.threshold}) <= 1 (with a lower --threshold, lower rearm_below too: "
                "--set alerts.rearm_below=...)"
            )
        for name in ("cooldown_days", "budget", "min_history_days"):
            if getattr(self, name) < 0:
                raise ConfigError(f"alerts.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("trend_days", "train_cutoffs", "train_step_days", "full_rescore_s"):
            if getattr(self, name) < 1:
                raise ConfigError(f"alerts.{name} must be >= 1, got {getattr(self, name)}")


# --------------------------------------------------------------------------- features
DAY = 86400
TREND_COLUMNS: tuple[str, ...] = ("recent_purchases", "recent_share", "recency_ratio")


def alert_features(
    events: pl.DataFrame, cutoff_ts: int, items: pl.DataFrame | None, trend_days: int
) -> pl.DataFrame:
    """The batch features (:func:`segments.rfm.customer_features`, the same code) plus the
    trend columns: ``recent_purchases`` (purchase occasions in the last ``trend_days``),
    ``recent_share`` (their share of all occasions) and ``recency_ratio`` (recency over the
    mean gap; 1 for a single purchase). Reads only ``ts < cutoff_ts``."""
    feats = customer_features(events, cutoff_ts, items)
    start = int(cutoff_ts) - trend_days * DAY
    recent = (
        events.filter(
            (pl.col("event_type") == "purchase")
            & (pl.col("ts") >= start)
            & (pl.col("ts") < int(cutoff_ts))
        )
        .group_by("user_id")
        .agg(pl.col("ts").n_unique().cast(pl.Float64).alias("recent_purchases"))
    )
    return (
        feats.join(recent, on="user_id", how="left")
        .with_columns(pl.col("recent_purchases").fill_null(0.0))
        .with_columns(
            (pl.col("recent_purchases") / pl.col("frequency")).alias("recent_share"),
            (pl.col("recency_days") / pl.col("mean_gap_days").clip(lower_bound=1.0)).alias(
                "recency_ratio"
            ),
        )
    )


MODEL_COLUMNS: tuple[str, ...] = (*FEATURE_COLUMNS, *TREND_COLUMNS)


def active(feats: pl.DataFrame, horizon_days: int) -> np.ndarray:
    """(n,) bool: customers not yet churned by the label's rule (a purchase in the last H days)."""
    return np.asarray(feats["recency_days"].to_numpy() < horizon_days)


# --------------------------------------------------------------------------- model
MODEL_VERSION = 1


@dataclass
class AlertModel:
    """The churn model the watcher scores with: GBDT on :data:`MODEL_COLUMNS` of the active
    customers at ``train_cutoffs`` cutoffs before ``cutoff_ts`` (labels: no purchase in the
    next H days, :func:`segments.labels.make_labels`; every label window ends by
    ``cutoff_ts``), and the RFM quintiles at ``cutoff_ts`` (for the segment names)."""

    clf: Any
    scorer: RFMScorer
    cutoff_ts: int
    horizon_days: int
    trend_days: int
    dataset_id: str
    train_rows: int
    train_cutoffs: tuple[int, ...]
    columns: tuple[str, ...] = MODEL_COLUMNS

    @classmethod
    def fit(
        cls,
        events: pl.DataFrame,
        items: pl.DataFrame | None,
        cutoff_ts: int,
        ccfg: ChurnConfig,
        acfg: AlertConfig,
        *,
        dataset_id: str = "",
    ) -> AlertModel:
        """Fit on ``events`` strictly before ``cutoff_ts`` (nothing later is read)."""
        from sklearn.ensemble import HistGradientBoostingClassifier

        ev = events.filter(pl.col("ts") < int(cutoff_ts))
        cols = MODEL_COLUMNS if acfg.trend_features else FEATURE_COLUMNS
        if ev.height == 0:
            raise DataError(f"no events before the model cutoff {iso(cutoff_ts)}")
        h = ccfg.horizon_days
        first = int(ev["ts"].min())  # type: ignore[arg-type]
        xs, ys, cuts = [], [], []
        for k in range(acfg.train_cutoffs):
            c = int(cutoff_ts) - h * DAY - k * acfg.train_step_days * DAY
            if c - first < acfg.min_history_days * DAY:
                break
            feats = alert_features(ev, c, items, acfg.trend_days)
            feats = feats.filter(pl.Series(active(feats, h)))
            if feats.height == 0:
                continue
            lab = make_labels(
                ev, feats["user_id"].to_numpy(), c, LabelConfig(h), data_end_ts=int(cutoff_ts)
            )
            feats = feats.join(lab.select("user_id", "churn"), on="user_id", how="left")
            xs.append(feats.select(cols).to_numpy().astype(np.float64))
            ys.append(feats["churn"].to_numpy().astype(np.int64))
            cuts.append(c)
        if not xs or sum(len(y) for y in ys) < 20 or len({int(v) for y in ys for v in y}) < 2:
            raise DataError(
                f"too little history before {iso(cutoff_ts)} to fit the alert model: it needs "
                f"purchases at least {h + acfg.min_history_days} days before it, and both "
                "customers who bought again and customers who did not"
            )
        x, y = np.concatenate(xs), np.concatenate(ys)
        with limited_threads(ccfg.threads):
            clf = HistGradientBoostingClassifier(
                max_iter=ccfg.gbdt_max_iter,
                learning_rate=ccfg.gbdt_learning_rate,
                max_leaf_nodes=ccfg.gbdt_max_leaf_nodes,
                min_samples_leaf=min(ccfg.gbdt_min_samples_leaf, max(1, len(y) // 10)),
                early_stopping=len(y) >= 200,
                validation_fraction=ccfg.valid_fraction,
                n_iter_no_change=20,
                random_state=ccfg.seed,
            ).fit(x, y)
        scorer = RFMScorer.fit(customer_features(ev, int(cutoff_ts), items))
        log.info(
            "alert model: %d rows at %d cutoffs (%s .. %s), churn rate %.3f",
            len(y),
            len(cuts),
            iso(cuts[-1])[:10],
            iso(cuts[0])[:10],
            float(y.mean()),
        )
        return cls(
            clf,
            scorer,
            int(cutoff_ts),
            h,
            acfg.trend_days,
            dataset_id,
            len(y),
            tuple(cuts),
            tuple(cols),
        )

    def risk(self, feats: pl.DataFrame) -> np.ndarray:
        """(n,) P(churn in the next H days) for rows of :func:`alert_features`."""
        if feats.height == 0:
            return np.zeros(0, np.float64)
        x = feats.select(self.columns).to_numpy().astype(np.float64)
        return np.asarray(self.clf.predict_proba(x)[:, 1], dtype=np.float64)

    def save(self, path: str | Path) -> None:
        """Pickle to ``path`` (temporary sibling, fsync, rename)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        with open(tmp, "wb") as f:
            pickle.dump({"version": MODEL_VERSION, "model": self}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)

    @classmethod
    def load(cls, path: str | Path, dataset_id: str | None = None) -> AlertModel:
        """Read a saved model; refuse one fitted on another dataset (MismatchError)."""
        p = Path(path)
        if not p.is_file():
            raise NotFoundError(f"alert model {p} not found")
        with open(p, "rb") as f:
            obj = pickle.load(f)  # our own file, written by save()
        if not isinstance(obj, dict) or obj.get("version") != MODEL_VERSION:
            raise DataError(f"{p}: not an alert model of format {MODEL_VERSION}")
        m: AlertModel = obj["model"]
        if dataset_id is not None and m.dataset_id and m.dataset_id != dataset_id:
            raise MismatchError(
                f"alert model {p} was fitted on dataset {m.dataset_id[:12]}, not "
                f"{dataset_id[:12]}: delete it (or give another --model) to refit"
            )
        return m


# --------------------------------------------------------------------------- watcher
# the canonical events frame's columns but the order id (the watcher needs no baskets)
_EVENT_SCHEMA = {k: v for k, v in EVENTS_SCHEMA.items() if k != "order"}
STATE_VERSION = 1


@dataclass
class _Alarm:
    armed: bool = True
    last_alert: int | None = None


class Watcher:
    """Keeps every customer's purchases (the dataset's, then the live events since) and warns
    when one's churn risk crosses the threshold upward.

    ``ingest`` takes stored log events (those at or before :attr:`position` are skipped,
    so a replay changes nothing); ``tick(now)`` re-scores the customers with new events
    and, once per ``full_rescore_s``, everyone (their recency grew), builds the reasons of
    the new crossings and publishes them to the sinks. ``poll(log)`` is one round of both:
    what ``ecomrec churn watch`` runs and ``benchmarks/churn_alerts.py`` replays.
    """

    def __init__(
        self,
        model: AlertModel,
        ds: Dataset,
        cfg: AlertConfig = AlertConfig(),
        sinks: list[Sink] | None = None,
        *,
        position: int | None = None,
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.sinks: list[Sink] = list(sinks or [])
        self.items: pl.DataFrame | None = ds.items
        self._users: dict[str, int] = {e: i + 1 for i, e in enumerate(ds.users.external_ids)}
        self._user_ext: list[str] = ["<pad>", *ds.users.external_ids]
        self._items: dict[str, int] = {e: i + 1 for i, e in enumerate(ds.item_ids.external_ids)}
        self._frames: list[pl.DataFrame] = [
            ds.events.filter(pl.col("event_type").is_in(["purchase", "return"]))
            .select(list(_EVENT_SCHEMA))
            .cast(_EVENT_SCHEMA)  # type: ignore[arg-type]
        ]
        self._pending: list[tuple[int, int, int, str, int, float | None]] = []
        self._events: pl.DataFrame | None = None
        self._changed: set[int] = set()
        self._alarms: dict[int, _Alarm] = {}
        live = ds.extra.get("live_log")
        start = live.get("position", 0) if isinstance(live, dict) else 0
        self.position = int(position if position is not None else start)
        last = ds.events["ts"].max()
        self.clock = int(last) + 1 if last is not None else 0  # type: ignore[arg-type]
        self.last_full: int | None = None
        self.last_risk: dict[int, float] = {}
        self.outbox: list[ChurnWarning] = []  # published to the file, not yet to the others

    # ---------------------------------------------------------------- state
    def _uid(self, ext: str) -> int:
        u = self._users.get(ext)
        if u is None:
            u = len(self._user_ext)
            self._users[ext] = u
            self._user_ext.append(ext)
        return u

    def _iid(self, ext: str) -> int:
        i = self._items.get(ext)
        if i is None:
            i = len(self._items) + 1
            self._items[ext] = i
        return i

    def ingest(self, stored: Iterable[StoredEvent]) -> int:
        """Add the purchases and returns of log events after :attr:`position`; returns how
        many events were new (views and carts move the position but not the features)."""
        n = 0
        for s in stored:
            if s.seq <= self.position:
                continue
            self.position = s.seq
            n += 1
            e = s.event
            self.clock = max(self.clock, int(e.ts) + 1)
            if e.event_type not in ("purchase", "return"):
                continue
            u = self._uid(e.customer_id)
            self._pending.append(
                (u, self._iid(e.product_id), int(e.ts), e.event_type, e.quantity, e.price)
            )
            self._changed.add(u)
        return n

    def events(self) -> pl.DataFrame:
        """Every purchase and return held (dataset + live), internal ids."""
        if self._pending:
            cols = list(zip(*self._pending))
            self._frames.append(
                pl.DataFrame(
                    {k: list(v) for k, v in zip(_EVENT_SCHEMA, cols)}, schema=_EVENT_SCHEMA
                )
            )
            self._pending = []
            self._events = None
        if self._events is None:
            self._events = pl.concat(self._frames) if len(self._frames) > 1 else self._frames[0]
            self._frames = [self._events]
        return self._events

    def customer_id(self, user_id: int) -> str:
        return self._user_ext[user_id]

    # ---------------------------------------------------------------- scoring
    def score(self, now: int, users: Iterable[int] | None = None) -> pl.DataFrame:
        """Features (the batch code + trend), ``risk``, ``active`` and ``rfm_segment`` at
        ``now`` for ``users`` (default: everyone), through the same functions as a full round."""
        ev = self.events()
        if users is not None:
            ev = ev.filter(pl.col("user_id").is_in(sorted(set(users))))
        ev = ev.filter(pl.col("ts") < int(now))
        if ev.filter(pl.col("event_type") == "purchase").height == 0:
            return pl.DataFrame()
        feats = alert_features(ev, int(now), self.items, self.model.trend_days)
        feats = self.model.scorer.score(feats)
        return feats.with_columns(
            pl.Series("risk", self.model.risk(feats), dtype=pl.Float64),
            pl.Series("active", active(feats, self.model.horizon_days), dtype=pl.Boolean),
        )

    def tick(self, now: int | None = None) -> list[ChurnWarning]:
        """Re-score (changed customers; everyone once per ``full_rescore_s``), publish the new
        crossings (highest risk first, at most ``budget``) and return them."""
        now = int(self.clock if now is None else now)
        self.clock = max(self.clock, now)
        self.deliver()  # what an earlier round could not hand to the other sinks
        full = self.last_full is None or now - self.last_full >= self.cfg.full_rescore_s
        if not full and not self._changed:
            return []
        scored = self.score(now, None if full else self._changed)
        self._changed = set()
        if full:
            self.last_full = now
        if scored.height == 0:
            return []
        users = scored["user_id"].to_numpy().astype(np.int64)
        risk = scored["risk"].to_numpy()
        act = scored["active"].to_numpy()
        cool = self.cfg.cooldown_days * DAY
        cand: list[int] = []
        for i, (u, r, a) in enumerate(zip(users.tolist(), risk.tolist(), act.tolist())):
            self.last_risk[u] = r
            al = self._alarms.setdefault(u, _Alarm())
            if r < self.cfg.rearm_below:
                al.armed = True
            if (
                a
                and al.armed
                and r >= self.cfg.threshold
                and (al.last_alert is None or now - al.last_alert >= cool)
            ):
                cand.append(i)
        cand.sort(key=lambda i: (-risk[i], users[i]))
        if self.cfg.budget:
            cand = cand[: self.cfg.budget]
        if not cand:
            return []
        rows = scored[cand]
        warnings = self._warnings(rows, now)
        if self.sinks:  # the record (the JSONL file): durable before the state moves on
            self.sinks[0].publish(warnings)
        for u in rows["user_id"].to_list():
            al = self._alarms[int(u)]
            al.armed = False
            al.last_alert = now
        log.info("churn watch %s: %d warning(s)", iso(now), len(warnings))
        self.outbox.extend(warnings)
        self.deliver()
        return warnings

    def deliver(self) -> bool:
        """Hand the outbox to the sinks after the first (a webhook); on a failure they stay
        in the outbox (and in the state) for the next round: at least once. True when the
        outbox is empty."""
        if not self.outbox:
            return True
        if len(self.sinks) < 2:
            self.outbox = []
            return True
        try:
            publish_all(self.sinks[1:], self.outbox)
        except (OSError, DeliveryError) as e:
            log.error(
                "churn warnings: %d not delivered yet (%s); retried next round", len(self.outbox), e
            )
            return False
        self.outbox = []
        return True

    def poll(
        self, event_log: EventLog, now: int | None = None, batch: int = 10_000
    ) -> list[ChurnWarning]:
        """One round: read the log after :attr:`position`, ingest, tick (``now`` default: the
        latest event time seen)."""
        while True:
            got = list(event_log.read(self.position, limit=batch))
            self.ingest(got)
            if len(got) < batch:
                break
        return self.tick(now)

    # ---------------------------------------------------------------- reasons
    def _warnings(self, rows: pl.DataFrame, now: int) -> list[ChurnWarning]:
        c = self.cfg
        users = rows["user_id"].to_list()
        back = int(now) - c.segment_lookback_days * DAY
        prev: dict[int, str] = {}
        ev = self.events().filter(pl.col("user_id").is_in(users) & (pl.col("ts") < back))
        if ev.filter(pl.col("event_type") == "purchase").height:
            old = self.model.scorer.score(customer_features(ev, back, self.items))
            prev = dict(zip(old["user_id"].to_list(), old["rfm_segment"].to_list()))
        out = []
        for row in rows.iter_rows(named=True):
            u = int(row["user_id"])
            seg = str(row["rfm_segment"])
            before = prev.get(u, "none")
            out.append(
                ChurnWarning(
                    customer_id=self.customer_id(u),
                    ts=int(now),
                    risk=float(row["risk"]),
                    threshold=c.threshold,
                    reasons=tuple(reasons_for(row, before, c)),
                    segment=seg,
                    previous_segment=before,
                )
            )
        return out

    # ---------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        """What a later run needs to go on without repeating a warning (JSON-able)."""
        return {
            "version": STATE_VERSION,
            "position": self.position,
            "clock": self.clock,
            "last_full": self.last_full,
            "model_cutoff": self.model.cutoff_ts,
            "outbox": [w.to_dict() for w in self.outbox],
            "customers": {
                self.customer_id(u): {"armed": a.armed, "last_alert": a.last_alert}
                for u, a in self._alarms.items()
                if not a.armed or a.last_alert is not None
            },
        }

    def restore(self, state: dict[str, Any], where: str = "state") -> None:
        """Take back the alarms, clock and full-rescore time of :meth:`state_dict`; the events
        up to its position are read again with :meth:`ingest` (they are not in the state)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"{where}: not a churn-watch state of format {STATE_VERSION}")
        if state.get("model_cutoff") != self.model.cutoff_ts:
            log.warning("%s: written with another alert model; its alarms are kept", where)
        self.clock = max(self.clock, int(state.get("clock") or 0))
        lf = state.get("last_full")
        self.last_full = None if lf is None else int(lf)
        for ext, a in state.get("customers", {}).items():
            self._alarms[self._uid(ext)] = _Alarm(bool(a["armed"]), a.get("last_alert"))
        self.outbox = [
            ChurnWarning.from_dict(validate_warning(w, f"{where}, outbox"))
            for w in state.get("outbox", [])
        ]

    def note_published(self, warnings: Iterable[dict[str, Any]]) -> int:
        """Disarm the customers of warnings already in the sink (read back with
        :func:`read_warnings`) that the state does not know of: a run killed between the
        sink's fsync and the state's write publishes nothing twice. Returns how many."""
        n = 0
        for w in warnings:
            ts = int(_to_ts(w["ts"]))
            al = self._alarms.setdefault(self._uid(w["customer_id"]), _Alarm())
            if al.last_alert is None or ts > al.last_alert:
                al.armed, al.last_alert = False, ts
                n += 1
        return n


def _worse(before: str, after: str) -> bool:
    """A move down :data:`segments.rfm.SEGMENTS` (listed best first): a reason to warn. A
    move up (a lapsed customer who came back once) is not named as one."""
    if before not in SEGMENTS or after not in SEGMENTS:
        return False
    return SEGMENTS.index(after) > SEGMENTS.index(before)


def reasons_for(row: dict[str, Any], previous_segment: str, cfg: AlertConfig) -> list[Reason]:
    """The reasons of one scored row (a dict of :meth:`Watcher.score`'s columns): recency
    against the usual gap, a frequency drop over the last ``trend_days``, an RFM segment move
    down the list of :data:`segments.rfm.SEGMENTS`. Never empty: recency is given when
    nothing else applies."""
    out: list[Reason] = []
    rec = float(row["recency_days"])
    freq = int(row["frequency"])
    gap = float(row["mean_gap_days"])
    if freq >= 2:
        rec_text = f"no purchase for {rec:.0f} days (usual gap {gap:.0f})"
        rec_hit = rec >= cfg.recency_ratio * gap
    else:
        rec_text = f"no purchase for {rec:.0f} days (one purchase so far)"
        rec_hit = True
    if rec_hit:
        out.append(Reason("recency", rec_text))
    recent = float(row["recent_purchases"])
    before = freq - recent
    span_before = float(row["tenure_days"]) - cfg.trend_days
    if before >= 2 and span_before > 0:
        expected = before / max(span_before, float(cfg.trend_days)) * cfg.trend_days
        if recent <= cfg.drop_ratio * expected:
            weeks = cfg.trend_days / 7
            out.append(
                Reason(
                    "frequency_drop",
                    f"{recent:.0f} purchase(s) in the last {weeks:.0f} weeks vs "
                    f"{expected:.1f} per {weeks:.0f} weeks before",
                )
            )
    seg = str(row["rfm_segment"])
    if _worse(previous_segment, seg):
        out.append(Reason("segment_move", f"RFM segment {previous_segment} -> {seg}"))
    if not out:  # the model finds the whole pattern risky (e.g. back once after a long pause)
        out.append(Reason("recency", f"{rec_text}; risky purchase pattern"))
    return out


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write the watcher state atomically (temporary sibling, fsync, rename)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)


def load_state(path: str | Path) -> dict[str, Any] | None:
    p = Path(path)
    if not p.exists():
        return None
    try:
        obj = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"watch state {p}: not JSON ({e.msg}, line {e.lineno})") from e
    if not isinstance(obj, dict):
        raise DataError(f"watch state {p}: not a JSON object")
    return obj


DEFAULT_CONFIG = "alerts"  # ecomrec/configs/segments/alerts.toml


def model_cutoff(ds: Dataset) -> int:
    """The day after the dataset's last event (the model then knows everything in it)."""
    last = ds.events["ts"].max()
    if last is None:
        raise DataError(f"dataset {ds.name} has no events")
    return (int(last) // DAY + 1) * DAY  # type: ignore[arg-type]


def obtain_model(
    ds: Dataset, ccfg: ChurnConfig, acfg: AlertConfig, path: str | Path | None
) -> AlertModel:
    """The saved model at ``path`` when it was fitted on this dataset, with this horizon and
    trend window; else fit it at :func:`model_cutoff` (and save it to ``path`` if given)."""
    fid = str(ds.fingerprint()["id"])
    if path is not None and Path(path).exists():
        m = AlertModel.load(path, fid)
        want = MODEL_COLUMNS if acfg.trend_features else FEATURE_COLUMNS
        same = m.horizon_days == ccfg.horizon_days and m.trend_days == acfg.trend_days
        if same and m.columns == tuple(want):
            return m
        log.warning("alert model %s: other horizon or trend window; refitting", path)
    t0 = time.process_time()
    m = AlertModel.fit(ds.events, ds.items, model_cutoff(ds), ccfg, acfg, dataset_id=fid)
    log.info("alert model fitted in %.1f s CPU", time.process_time() - t0)
    if path is not None:
        m.save(path)
    return m
