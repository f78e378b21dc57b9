"""The benchmark protocol: choose hyperparameters on validation, then test honestly.

CF models (``refit_on_train_valid``): every grid point is fit on ``train`` and scored on
the validation targets; the best (by validation NDCG@10) is refit on ``train_valid`` and
tested with ``train_valid`` as history. Sequential models are fit once (their own early
stopping uses validation) and read ``train_valid`` as the input sequence at test time.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ecomrec.config import to_dict
from training.evaluation import evaluate
from training.retriever import Retriever
from training.splits import Split

log = logging.getLogger(__name__)

SELECT_METRIC = "ndcg@10"


@dataclass
class ModelResult:
    name: str
    config: dict[str, Any]
    test: dict[str, float]  # empty when the test was not read (ecomrec train --no-test)
    valid: dict[str, float]
    train_seconds: float
    eval_seconds: float
    grid: list[dict[str, Any]] = field(default_factory=list)
    model: Any = field(default=None, repr=False)  # the final fitted retriever


def _validation_split(model: Retriever, split: Split) -> Split:
    """The split ``model`` trains and validates on: a model may validate on a sample of
    users and train on the others' validation events (TwoTowerRetriever.validation_split);
    test targets and history are the same either way."""
    own = getattr(model, "validation_split", None)
    return own(split) if own is not None else split


def run_protocol(
    name: str,
    make: Callable[[dict[str, Any]], Retriever],
    grid: list[dict[str, Any]],
    split: Split,
    ks: tuple[int, ...] = (5, 10, 20),
    progress: bool = True,
    test: bool = True,
) -> ModelResult:
    """Fit, select on validation, (refit,) and test one model family (``test=False``:
    the test targets are not read)."""
    best: tuple[float, dict[str, Any], dict[str, float]] | None = None
    tried = []
    train_seconds = 0.0
    model: Retriever | None = None
    # buy-again protocol: history items stay rankable (repurchases are targets too)
    exclude = bool(split.protocol.get("exclude_seen", True))
    for params in grid:
        t0 = time.perf_counter()
        model = make(params)
        vsplit = _validation_split(model, split)
        model.fit(vsplit.train, vsplit.valid)
        dt = time.perf_counter() - t0
        train_seconds += dt
        v = evaluate(
            model.score,
            vsplit.valid,
            vsplit.train,
            ks,
            exclude_seen=exclude,
            progress=progress,
            desc=f"{name} valid",
        )
        tried.append(
            {"params": params, "valid_" + SELECT_METRIC: v[SELECT_METRIC], "fit_seconds": dt}
        )
        log.info("%s %s valid %s=%.4f (%.1fs)", name, params, SELECT_METRIC, v[SELECT_METRIC], dt)
        if best is None or v[SELECT_METRIC] > best[0]:
            best = (v[SELECT_METRIC], params, v)
    assert best is not None and model is not None
    _, params, valid = best
    t0 = time.perf_counter()
    final = make(params)
    if final.refit_on_train_valid:
        final.fit(split.train_valid, None)
    elif params is grid[-1]:
        final = model  # sequential model: the last one fitted is the chosen one
    else:
        vsplit = _validation_split(final, split)
        final.fit(vsplit.train, vsplit.valid)
    refit_seconds = time.perf_counter() - t0
    tested: dict[str, float] = {}
    if test:
        tested = evaluate(
            final.score,
            split.test,
            split.train_valid,
            ks,
            exclude_seen=exclude,
            progress=progress,
            desc=f"{name} test",
        )
    cfg = getattr(final, "config", None)
    return ModelResult(
        name=name,
        config=to_dict(cfg)
        if cfg is not None and hasattr(cfg, "__dataclass_fields__")
        else dict(params),
        test=tested,
        valid=valid,
        train_seconds=train_seconds + refit_seconds,
        eval_seconds=tested.get("eval_seconds", 0.0),
        grid=tried,
        model=final,
    )


def with_params(config: Any, params: dict[str, Any]) -> Any:
    """A copy of a frozen config with ``params`` replaced."""
    return replace(config, **params)


def is_transaction_log(dataset: Any) -> bool:
    """True for a shop's invoice log rather than a review/click stream, from the data's
    shape only (no dataset names, ids or dates): the events carry invoice numbers (the
    Online Retail columns), or purchases come in baskets: >= 3 items per (customer,
    timestamp) on average, or >= 1.5 with times of day (review logs such as the Amazon
    S3-Rec files have day-granular timestamps, so same-day reviews look like small
    baskets: Beauty 1.64 items per (customer, day); Online Retail 21.6 per invoice)."""
    ev = getattr(dataset, "events", None)
    if ev is None or ev.height == 0:
        return False
    if "InvoiceNo" in ev.columns:
        return True
    pur = ev.filter(ev["event_type"] == "purchase")
    if pur.height == 0:
        return False
    per_basket = pur.height / max(pur.select(["user_id", "ts"]).unique().height, 1)
    time_of_day = float((pur["ts"] % 86400 != 0).mean() or 0.0) > 0.5
    return per_basket >= 3.0 or (per_basket >= 1.5 and time_of_day)


def model_family(
    spec: str,
    dataset: Any = None,
    protocol: str = "new-items",
    tower_overrides: dict[str, Any] | None = None,
) -> tuple[str, Callable[[dict[str, Any]], Retriever], list[dict[str, Any]]]:
    """``popularity``, ``personal-top``, ``als``, ``bpr``, ``itemknn``, ``ease`` or
    ``two-tower[:CONFIG.toml | :basket | :sequence]`` -> (name, factory from grid params, grid).

    ``two-tower`` is the sequence transformer (:mod:`training.two_tower`) except on
    transaction logs (:func:`is_transaction_log`), where it is the basket tower
    (:mod:`training.basket`; ``two-tower:sequence`` / ``two-tower:basket`` force one).
    ``protocol="buy-again"`` trains the basket tower with repurchases as targets.
    ``tower_overrides`` (nested, as ``ecomrec train --set``) apply to the sequence tower's
    run config."""
    from ecomrec.config import from_dict
    from ecomrec.errors import ConfigError
    from training.baselines import BASELINES

    name, _, arg = spec.partition(":")
    if name in BASELINES:
        cls, cfg_cls = BASELINES[name]
        return name, (lambda p: cls(from_dict(cfg_cls, p))), list(cls.grid)
    if name == "two-tower":
        if arg == "basket" or (not arg and is_transaction_log(dataset)):
            from training.basket import BasketRetriever

            return name, basket_factory(protocol), list(BasketRetriever.grid)
        from training.two_tower import TwoTowerRetriever

        cfg_path = None if arg in ("", "sequence") else arg
        return (
            name,
            (lambda p: TwoTowerRetriever.for_dataset(dataset, cfg_path, overrides=tower_overrides)),
            [{}],
        )
    raise ConfigError(f"unknown model {spec!r}; known: {sorted(BASELINES)} and two-tower[:CONFIG]")


def basket_factory(
    protocol: str = "new-items", **overrides: Any
) -> Callable[[dict[str, Any]], Retriever]:
    """Factory of :class:`training.basket.BasketRetriever` for :func:`run_protocol`: the
    model fitted with validation picks its best epoch; the refit on train+validation that
    follows trains exactly that many epochs (as the CF baselines are refit)."""
    import json

    from ecomrec.config import from_dict
    from training.basket import BasketRetriever, BasketTrainConfig

    fitted: dict[str, BasketRetriever] = {}  # grid point -> the model fitted with validation
    targets = "all" if protocol == "buy-again" else "new"

    def make(params: dict[str, Any]) -> Retriever:
        cfg = from_dict(BasketTrainConfig, {"targets": targets, **overrides, **params})
        r = BasketRetriever(cfg)
        key = json.dumps(params, sort_keys=True)
        if key in fitted:
            r.refit_epochs = fitted[key].best_epoch
            r.refit_mix = fitted[key].mix
        else:
            fitted[key] = r
        return r

    return make


# --- one protocol and model selection for `ecomrec train` and benchmarks/quality.py ------
#
# The split rule (docs/towers.md, "Which protocol"):
# - a transaction log (invoices: baskets of items, see is_transaction_log) or an event log
#   whose timestamps carry a time of day (a click/session log, a shop's own export) gets the
#   TEMPORAL split with the cutoff from the data: test = the last `test_days` days, validation
#   the `valid_days` before (both capped at a sixth of the log's span for short logs); the
#   task is "what will this customer buy next", scored on the purchases in the window;
# - a review-style sequence (day-granular timestamps, e.g. the Amazon S3-Rec files) gets
#   LEAVE-ONE-OUT (last item test, second-to-last validation): same-day events have no
#   order there and the published numbers use it;
# - a temporal split that leaves no validation or test users falls back to leave-one-out
#   (recorded in split.protocol["rule"]).
# The family: the basket tower on transaction logs, the sequence transformer otherwise.

TOWER = "tower"  # the candidate name of the family's tower in a model list
REFERENCES = ("popularity", "co-bought-last")  # reported, never served
SERVABLE = ("sequence-tower", "basket-tower", "als", "ease")  # what select_model may serve


def has_time_of_day(dataset: Any) -> bool:
    """True when most event timestamps are not at midnight UTC (a real event log, not a
    day-granular review file)."""
    ev = getattr(dataset, "events", None)
    if ev is None or ev.height == 0:
        return False
    return float((ev["ts"] % 86400 != 0).mean() or 0.0) > 0.5


def split_rule(dataset: Any) -> tuple[str, str]:
    """(``temporal`` | ``loo``, the reason) of :func:`make_split`'s ``auto``."""
    if is_transaction_log(dataset):
        return "temporal", "transaction log (purchases come in baskets)"
    if has_time_of_day(dataset):
        return "temporal", "event log with times of day"
    return "loo", "review-style sequence (day-granular timestamps)"


def make_split(
    dataset: Any,
    spec: str = "auto",
    *,
    protocol: str = "new-items",
    test_start: str | None = None,
    test_days: int = 30,
    valid_days: int = 30,
    ties: str = "file",
    seed: int = 42,
) -> Split:
    """The split of a loaded dataset: ``auto`` (:func:`split_rule`), ``temporal``,
    ``temporal:YYYY-MM-DD``, ``loo`` / ``loo-file`` / ``loo-shuffle``.

    History holds every event of an event log (views and carts are the sequence tower's
    input) but only the purchases of a transaction log (a return or cancellation is not a
    positive signal for the basket tower or ALS/EASE); targets are purchases under the
    temporal split. ``protocol="buy-again"`` keeps history items rankable (temporal only)."""
    import polars as pl

    from ecomrec.errors import ConfigError, DataError
    from towers.sequences import Interactions
    from training.splits import default_test_start, leave_one_out, temporal_split

    events = dataset.events
    if is_transaction_log(dataset):
        events = events.filter(pl.col("event_type") == "purchase")
    inter = Interactions.from_events(events, dataset.n_users, dataset.n_items)
    kind, reason = split_rule(dataset) if spec == "auto" else (spec, f"--split {spec}")
    if kind.startswith("temporal:"):
        kind, test_start = "temporal", kind.split(":", 1)[1]
    if kind in ("loo-file", "loo-shuffle"):
        kind, ties = "loo", kind.removeprefix("loo-")
    if kind not in ("temporal", "loo"):
        raise ConfigError(
            f"unknown split {spec!r}: auto, temporal, temporal:YYYY-MM-DD, loo-file, loo-shuffle"
        )
    buy_again = protocol == "buy-again"
    if buy_again and kind != "temporal":
        raise ConfigError("the buy-again protocol needs a temporal split")
    if kind == "temporal":
        span_days = int((inter.ts.max(initial=0) - inter.ts.min(initial=0)) // 86400)
        if not test_start:  # short logs: at most a sixth of the span each
            test_days = max(1, min(test_days, span_days // 6))
            valid_days = max(1, min(valid_days, span_days // 6))
        cutoff: str | int = test_start or default_test_start(inter, test_days=test_days)
        try:
            split = temporal_split(inter, cutoff, valid_days=valid_days, exclude_seen=not buy_again)
        except DataError as e:
            if spec != "auto":
                raise
            log.warning("temporal split impossible (%s): leave-one-out instead", e)
            kind, reason = "loo", f"{reason}, but {e}: leave-one-out instead"
        else:
            split.protocol["cutoff_from"] = (
                "--test-start" if test_start else f"data: last {test_days} days are the test window"
            )
            split.protocol["repeat_share_test"] = repeat_share(split.test, split.train_valid)
            split.protocol["repeat_share_valid"] = repeat_share(split.valid, split.train)
    if kind == "loo":
        split = leave_one_out(inter, ties=ties, seed=seed)  # type: ignore[arg-type]
    split.protocol["rule"] = reason
    split.protocol["protocol"] = protocol
    split.protocol["history"] = (
        "purchases" if events is not dataset.events else "every event (views, carts, ...)"
    )
    return split


def repeat_share(targets: Any, history: Any) -> float:
    """Share of (customer, item) targets the customer had already bought (0 under new-items)."""
    import numpy as np

    lens = np.diff(targets.indptr)
    if lens.sum() == 0:
        return 0.0
    users = np.repeat(targets.users, lens)
    seen = history.to_csr()[users, targets.items.astype(np.int64)]
    return float(np.asarray(seen).ravel().mean())


class CoBoughtLast:
    """The trivial rule "bought with the last item": items co-occurring with the user's
    latest basket (the events at their newest timestamp), counted over the fitted log as
    same-basket pairs (same user, same timestamp) plus consecutive events; ties by
    popularity. A reference line of ``ecomrec train``'s table, never served."""

    name = "co-bought-last"
    refit_on_train_valid = True
    grid: list[dict[str, Any]] = [{}]  # noqa: RUF012

    def __init__(self) -> None:
        self.co: Any = None
        self.pop: Any = None

    @property
    def config(self) -> None:
        return None

    def fit(self, train: Any, valid: Any = None) -> None:
        import numpy as np
        import scipy.sparse as sp

        users = train.user_of_row()
        n = train.n_items + 1
        # baskets: (user, ts) groups -> basket x item incidence
        key = np.stack([users, train.ts], 1)
        _, basket = np.unique(key, axis=0, return_inverse=True) if len(key) else (None, users)
        basket = np.asarray(basket).ravel()
        x = sp.csr_matrix(
            (np.ones(len(users), np.float32), (basket, train.items.astype(np.int64))),
            shape=(int(basket.max(initial=-1)) + 1, n),
        )
        x.data[:] = 1.0
        co = (x.T @ x).tocsr()
        # consecutive events of one user
        nxt = np.flatnonzero(users[1:] == users[:-1])
        a, b = train.items[nxt].astype(np.int64), train.items[nxt + 1].astype(np.int64)
        t = sp.csr_matrix((np.ones(len(a), np.float32), (a, b)), shape=(n, n))
        co = (co + t + t.T).tocsr()
        co.setdiag(0)
        co.eliminate_zeros()
        self.co = co
        pop = train.item_counts().astype(np.float32)
        self.pop = pop / max(float(pop.max(initial=0.0)), 1.0)

    def score(self, users: Any, history: Any) -> Any:
        import numpy as np

        out = np.zeros((len(users), history.n_items + 1), np.float32)
        for r, u in enumerate(users):
            s, t = history.seq(int(u)), history.seq_ts(int(u))
            if len(s):
                last = s[t == t.max()].astype(np.int64)
                row = np.asarray(self.co[last].sum(0)).ravel()
                out[r, : len(row)] = row
        out[:, : len(self.pop)] += 1e-3 * self.pop
        return out

    def save(self, path: Any) -> None:
        raise NotImplementedError("co-bought-last is a reference rule, never saved")


class ServedBasket:
    """The basket tower evaluated in the form the index serves it
    (:class:`towers.basket.BasketServed` over :func:`towers.sequences.batch_for_users`):
    the validation and test numbers are those of the served model."""

    name = "two-tower"
    refit_on_train_valid = True

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.served: Any = None

    @property
    def config(self) -> Any:
        return self.inner.config

    @property
    def epochs(self) -> int:
        """Epochs of the fitted tower (the chosen epoch, or the refit's count)."""
        return int(self.inner.best_epoch)

    def fit(self, train: Any, valid: Any = None) -> None:
        from towers.basket import BasketServed

        self.inner.fit(train, valid)
        self.served = BasketServed(self.inner.model, train.item_counts() > 0)

    def served_model(self) -> Any:
        """The model ``load_run`` would return (:class:`towers.basket.BasketServed`)."""
        return self.served

    def score(self, users: Any, history: Any) -> Any:
        import numpy as np
        import torch

        from towers.inference import batch_tensors
        from towers.sequences import batch_for_users

        m = self.served
        with torch.no_grad():
            t = batch_tensors(batch_for_users(history, np.asarray(users), m.max_len))
            u = m.encode(t["items"], t["event_type"], t["gap"], t["lengths"])  # (B, 2(D+1))
            s = u @ m.item_table().T  # (B, N+1)
            s[:, m.item_tower.known == 0] = -torch.inf  # not in the index
        return s.numpy()

    def save(self, path: Any) -> None:
        self.inner.save(path)


@dataclass
class Selection:
    """What :func:`select_model` compared and chose (on validation only)."""

    split: Split
    family: str  # "sequence" | "basket"
    results: dict[str, ModelResult]  # every candidate and reference, in run order
    served: str  # the winner's name (a servable candidate)
    skipped: dict[str, str] = field(default_factory=dict)

    def table(self) -> list[dict[str, Any]]:
        """One row per candidate: name, role, valid/test NDCG@10 and Recall@10."""
        rows = []
        for name, r in self.results.items():
            rows.append(
                {
                    "model": name,
                    "role": "served"
                    if name == self.served
                    else ("candidate" if name in SERVABLE else "reference"),
                    "valid_ndcg@10": r.valid.get("ndcg@10"),
                    "valid_recall@10": r.valid.get("recall@10"),
                    "test_ndcg@10": r.test.get("ndcg@10"),
                    "test_recall@10": r.test.get("recall@10"),
                    "train_seconds": r.train_seconds,
                }
            )
        return rows


def family_of(dataset: Any, family: str = "auto") -> str:
    """``sequence`` or ``basket`` (``auto``: the basket tower on transaction logs)."""
    from ecomrec.errors import ConfigError

    if family == "auto":
        return "basket" if is_transaction_log(dataset) else "sequence"
    if family not in ("sequence", "basket"):
        raise ConfigError(f"unknown model family {family!r}: auto, sequence, basket")
    return family


def tower_name(family: str) -> str:
    return "basket-tower" if family == "basket" else "sequence-tower"


def select_model(
    dataset: Any,
    split: Split,
    *,
    family: str = "auto",
    config: Any = None,
    overrides: dict[str, Any] | None = None,
    models: list[str] | None = None,
    run_dir: Any = None,
    test: bool = True,
    progress: bool = False,
    resume: bool = True,
) -> Selection:
    """Fit every candidate on ``split`` (each chosen on validation NDCG@10 over its grid,
    CF models refit on train + validation), compare them on validation, and return the
    winner among the servable ones: the family's tower, ALS, EASE (the ``[fallback]``
    baselines of the run config, scored in the form they are served, see
    :mod:`training.fallback`). Popularity and the "co-bought with the last item" rule are
    reported beside them, never served. The test targets are read once per candidate
    after its choice and never for a choice.

    ``config``: the sequence tower's run config (TOML path / name / RunConfig; its
    ``[fallback]`` table lists the baselines, ``[basket]`` the basket tower's
    BasketTrainConfig with its ``dims`` grid); ``overrides``: nested ``--set`` values;
    ``models``: candidate list
    (``tower``, ``als``, ``ease``, ``popularity``, ``co-bought-last``, or any baseline of
    :func:`model_family`); ``run_dir``: where the sequence tower trains (checkpoints)."""
    from ecomrec.errors import ConfigError
    from training.fallback import factor_family
    from training.splits import sample_validation
    from training.trainer import default_config_path, load_run_config

    ov = dict(overrides or {})
    fam = family_of(dataset, family)
    if config is None:
        config = default_config_path()
    rcfg = (
        load_run_config(config, **ov)
        if isinstance(config, str | Path)
        else (load_run_config(None, **{**to_dict(config), **ov}) if ov else config)
    )
    if models is None:
        fb = rcfg.fallback
        models = [TOWER, *(fb.baselines if fb.enabled else ()), *REFERENCES]
    # every candidate trains and validates on the same users and events (the sequence
    # tower's validation sample under leave-one-out, training.splits.sample_validation)
    vsplit = sample_validation(split, rcfg.valid_users, rcfg.valid_users_min, seed=rcfg.seed)
    protocol = str(split.protocol.get("protocol", "new-items"))
    results: dict[str, ModelResult] = {}
    skipped: dict[str, str] = {}
    servable = set(SERVABLE)
    best: tuple[float, str] | None = None
    for spec in models:
        if spec == TOWER:
            name = tower_name(fam)
            if fam == "basket":
                bcfg = to_dict(rcfg.basket)
                bcfg.pop("targets")  # the protocol's (new items / buy-again)
                make_inner = basket_factory(protocol, **bcfg)
                grid = [{"model": {**bcfg["model"], "dim": d}} for d in rcfg.basket.dims]
                make = _served_basket_factory(make_inner, protocol)
            else:
                from training.two_tower import TwoTowerRetriever

                def make(p: dict[str, Any]) -> Any:
                    r = TwoTowerRetriever.for_dataset(dataset, rcfg, run_dir, None)
                    if not resume:
                        r.fit = functools.partial(r.fit, resume=False)  # type: ignore[method-assign]
                    return r

                grid = [{}]
        elif spec in ("als", "ease"):
            name = spec
            why = factor_family(rcfg.fallback, spec, split.train.n_items)
            if isinstance(why, str):
                skipped[name] = why
                continue
            make, grid = why
        elif spec == "co-bought-last":
            name, make, grid = spec, (lambda p: CoBoughtLast()), [{}]
        else:
            name, make, grid = model_family(spec, dataset=dataset, protocol=protocol)
            if name == "two-tower":
                raise ConfigError("name the family's tower `tower` in a model list")
        r = run_protocol(name, make, grid, vsplit, progress=progress, test=test)
        results[name] = r
        log.info("%s: valid ndcg@10 %.4f", name, r.valid["ndcg@10"])
        if name in servable and (best is None or r.valid["ndcg@10"] > best[0]):
            if best is not None:  # the previous leader lost: one model kept at a time
                _release(results[best[1]])
            best = (r.valid["ndcg@10"], name)
        else:
            _release(r)
    # a benchmark may compare baselines only: nothing to serve then ("")
    return Selection(
        split=split, family=fam, results=results, served=best[1] if best else "", skipped=skipped
    )


def _served_basket_factory(
    make_inner: Callable[[dict[str, Any]], Retriever], protocol: str
) -> Callable[[dict[str, Any]], Any]:
    """New items: the basket tower in its served form; buy-again: the benchmark's
    repeat/explore mixture (the service has its own buy-again mode)."""
    if protocol != "new-items":
        return make_inner
    return lambda p: ServedBasket(make_inner(p))


def _release(r: ModelResult) -> None:
    """Drop a candidate that lost (its matrices), keeping memory to one model at a time."""
    from training.memory import release_free_memory

    r.model = None
    release_free_memory()


def save_served(sel: Selection, dataset: Any, run_dir: Path) -> dict[str, Any]:
    """Save the winner of :func:`select_model` in ``run_dir`` so that
    :func:`towers.inference.load_run` serves it, and record the comparison in the run's
    ``manifest.json`` (``served`` = ``{kind, path, params, ...}``). Returns ``served``.

    The sequence tower is already in ``run_dir`` (``model.pt``, trained there); the basket
    tower is saved as ``served/basket.pt`` (:class:`towers.basket.BasketServed`), ALS/EASE
    as ``served/<kind>.pt`` (:class:`towers.factor.FactorTower`). The record holds what
    :func:`refit_served` needs to refit the same model on new data (``ecomrec refresh``)."""
    from ecomrec.errors import ConfigError

    if not sel.served:
        raise ConfigError("no servable candidate (the tower, als or ease) was compared")
    r = sel.results[sel.served]
    kind = SERVED_KIND.get(sel.served, sel.served)
    selection = {
        "family": sel.family,
        "split": sel.split.protocol,
        "select_metric": "valid ndcg@10",
        "candidates": sel.table(),
        "skipped": sel.skipped,
    }
    return write_served(
        Path(run_dir),
        kind,
        r.model,
        list(dataset.item_ids.external_ids),
        {"params": r.config, "valid_metrics": r.valid, "refit_on": "train+valid"},
        {"selection": selection},
    )


SERVED_KIND = {"sequence-tower": "two-tower", "basket-tower": "basket"}


def write_served(
    run_dir: Path,
    kind: str,
    model: Any,
    item_ids: list[str],
    meta: dict[str, Any],
    manifest_extra: dict[str, Any] | None = None,
    model_version: str | None = None,
) -> dict[str, Any]:
    """Write a fitted ``model`` (:class:`ServedBasket` or
    :class:`training.fallback.FactorRetriever`; ``two-tower``: already in ``run_dir``) and
    the manifest's ``served`` record; returns the record."""
    import json
    import time as _time

    from towers.basket import save_basket_served
    from towers.inference import MANIFEST_FILE, MODEL_FILE, SERVED_KEY

    run_dir.mkdir(parents=True, exist_ok=True)
    mf = run_dir / MANIFEST_FILE
    manifest: dict[str, Any] = json.loads(mf.read_text()) if mf.exists() else {}
    if model_version:
        manifest["model_version"] = model_version
    manifest.setdefault(
        "model_version", f"{run_dir.name}-{_time.strftime('%Y%m%dT%H%M%S', _time.gmtime())}"
    )
    meta = {**meta, "model_version": manifest["model_version"]}
    params = meta.get("params", {})
    if kind == "two-tower":
        served: dict[str, Any] = {"kind": "two-tower", "path": MODEL_FILE}
    elif kind == "basket":
        rel = "served/basket.pt"
        save_basket_served(run_dir / rel, model.served, item_ids, meta)
        served = {"kind": "basket", "path": rel, "params": params, "epochs": model.epochs}
    else:
        rel = f"served/{kind}.pt"
        model.save_served(run_dir / rel, item_ids, meta)
        served = {"kind": kind, "path": rel, "params": params, "fallback": to_dict(model.cfg)}
    manifest[SERVED_KEY] = served
    manifest.update(manifest_extra or {})
    tmp = mf.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, default=float))
    tmp.replace(mf)
    return served


def refit_served(run_dir: Path, train: Any) -> Any:
    """The served model of ``run_dir`` refit from scratch on ``train`` with the recipe it
    was chosen with (basket tower: its parameters and epoch count; ALS/EASE: their
    parameters). ``ecomrec refresh`` uses it for every family but the sequence tower (which
    it warm-starts). Returns the fitted :class:`ServedBasket` / ``FactorRetriever``."""
    import json

    from ecomrec.config import from_dict
    from ecomrec.errors import ModelError
    from towers.inference import MANIFEST_FILE, SERVED_KEY
    from training.basket import BasketRetriever, BasketTrainConfig
    from training.fallback import FactorRetriever, FallbackConfig

    served = json.loads((Path(run_dir) / MANIFEST_FILE).read_text()).get(SERVED_KEY, {})
    kind = served.get("kind", "two-tower")
    if kind == "basket":
        inner = BasketRetriever(from_dict(BasketTrainConfig, served["params"]))
        inner.refit_epochs = int(served.get("epochs", inner.config.epochs))
        r: Any = ServedBasket(inner)
    elif kind in ("als", "ease"):
        r = FactorRetriever(kind, served["params"], from_dict(FallbackConfig, served["fallback"]))
    else:
        raise ModelError(f"{run_dir} serves {kind!r}: refit_served covers basket, als, ease")
    r.fit(train, None)
    return r


def selection_text(sel: Selection, served: dict[str, Any] | None = None) -> str:
    """The short table ``ecomrec train`` prints: served model, protocol, then validation
    and test NDCG@10 / Recall@10 of every candidate and reference."""
    p = sel.split.protocol
    if p.get("split") == "temporal":
        proto = (
            f"temporal: validation {p['valid_start']}..{p['test_start']}, test from "
            f"{p['test_start']} ({p.get('cutoff_from', '')})"
        )
    else:
        proto = f"leave-one-out (ties {p.get('ties')})"
    lines = [
        f"served model: {sel.served or 'none'}"
        + (f" ({served['path']})" if served else "")
        + f"  [family {sel.family}, chosen on validation NDCG@10]",
        f"protocol: {proto}; rule: {p.get('rule', '-')}; {p.get('protocol', 'new-items')}",
        "",
        f"{'model':<18} {'valid ndcg@10':>13} {'valid r@10':>10} {'test ndcg@10':>12} "
        f"{'test r@10':>9}  role",
    ]

    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    for row in sel.table():
        lines.append(
            f"{row['model']:<18} {f(row['valid_ndcg@10']):>13} {f(row['valid_recall@10']):>10} "
            f"{f(row['test_ndcg@10']):>12} {f(row['test_recall@10']):>9}  {row['role']}"
        )
    for name, why in sel.skipped.items():
        lines.append(f"{name:<18} skipped: {why}")
    return "\n".join(lines)
