"""The two-tower model behind the :class:`~training.retriever.Retriever` protocol.

``refit_on_train_valid`` is False: the model is chosen on validation and, at test
time, reads each user's train+validation sequence as its input.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ecomrec.config import to_dict
from ecomrec.errors import ModelError, NotFoundError
from towers.inference import MANIFEST_FILE, MODEL_FILE, SERVED_KEY, load_run, score_users
from towers.model import TwoTower
from towers.sequences import Interactions
from training.evaluation import evaluate
from training.fallback import compare_and_select, factor_scorer
from training.splits import Split, Targets, sample_validation
from training.trainer import (
    RunConfig,
    default_config_path,
    load_run_config,
    peak_rss_mb,
)

log = logging.getLogger(__name__)


class TwoTowerRetriever:
    """Retriever over a trained :class:`TwoTower` (cosine scores against every item)."""

    name = "two-tower"
    refit_on_train_valid = False

    def __init__(
        self,
        items: pl.DataFrame,
        item_ids: list[str],
        config: RunConfig | str | Path | None = None,
        run_dir: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        if isinstance(config, RunConfig):
            self.cfg = (
                config
                if not overrides
                else load_run_config(None, **{**to_dict(config), **overrides})
            )
        else:
            self.cfg = load_run_config(
                config if config is not None else default_config_path(), **(overrides or {})
            )
        self.items = items
        self.item_ids = list(item_ids)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if run_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="two-tower-")
            run_dir = self._tmp.name
        self.run_dir = Path(run_dir)
        self.model: TwoTower | None = None
        self.manifest: dict[str, Any] = {}

    @property
    def config(self) -> RunConfig:
        """The run configuration (recorded by the benchmark protocol)."""
        return self.cfg

    @classmethod
    def for_dataset(
        cls,
        ds: Any,
        config: RunConfig | str | Path | None = None,
        run_dir: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> TwoTowerRetriever:
        """Retriever for a loaded :class:`intake.dataset.Dataset` (its catalogue and id map)."""
        return cls(ds.items, ds.item_ids.external_ids, config, run_dir, overrides)

    def validation_split(self, split: Split) -> Split:
        """The split this model trains and validates on: ``valid_users`` of the config
        (:func:`training.splits.sample_validation`); test targets and history unchanged."""
        return sample_validation(
            split, self.cfg.valid_users, self.cfg.valid_users_min, seed=self.cfg.seed
        )

    def fit(
        self,
        train: Interactions,
        valid: Targets | None = None,
        resume: bool = True,
        t_start: float | None = None,
    ) -> None:
        """Train (stage 1 and/or 2); early stopping on ``valid`` NDCG@10 when given."""
        from training.distributed import trainer_class

        # a DistributedTrainer inside a torchrun job (ecomrec train --nproc N)
        trainer = trainer_class()(
            self.cfg, self.items, self.item_ids, self.run_dir, t_start=t_start
        )
        self.cfg = trainer.cfg  # item features adapted to what the catalogue holds
        self.model, self.manifest = trainer.fit(train, valid, resume=resume)
        self.model.eval()

    def score(self, users: np.ndarray, history: Interactions) -> np.ndarray:
        """(B, n_items + 1) cosine scores; column 0 is padding."""
        if self.model is None:
            raise ModelError("TwoTowerRetriever.score called before fit/load")
        return score_users(self.model, np.asarray(users, np.int64), history, self.cfg.user.max_len)

    def save(self, path: Path) -> None:
        """Copy the best checkpoint and manifest into ``path``."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        for f in (MODEL_FILE, MANIFEST_FILE):
            src = self.run_dir / f
            if src.exists() and src.resolve() != (p / f).resolve():
                shutil.copy2(src, p / f)

    @classmethod
    def load(cls, path: Path) -> TwoTowerRetriever:
        """Open a saved run directory (scores only; training needs the catalogue)."""
        tm = load_run(path)
        ck = tm.checkpoint
        from ecomrec.config import from_dict

        cfg = from_dict(RunConfig, ck.meta["run_config"])
        r = cls.__new__(cls)
        r.cfg = cfg
        r.items = pl.DataFrame()
        r.item_ids = ck.item_ids
        r._tmp = None
        r.run_dir = Path(path)
        r.model = tm.model
        mf = Path(path) / MANIFEST_FILE
        r.manifest = json.loads(mf.read_text()) if mf.exists() else {}
        return r


def test_finished_run(run_dir: Path, split: Split) -> dict[str, Any]:
    """Test metrics of a finished run (the tower in ``run_dir``; trained with ``--no-test``).

    For the "choose on validation, read test once" workflow: candidate configs are trained
    without the test, the chosen one is read here. ``split`` must be the run's split. The
    run's ``results.json`` gets ``test`` (it must not have one yet: test is read once).
    """
    res_path = run_dir / "results.json"
    if not (run_dir / MODEL_FILE).exists() or not res_path.exists():
        raise NotFoundError(f"{run_dir}: no finished run (model.pt and results.json)")
    out: dict[str, Any] = json.loads(res_path.read_text())
    if "test" in out:
        raise ModelError(f"{res_path} already holds a test result: test is read once per run")
    if out.get("split") != json.loads(json.dumps(split.protocol, default=float)):
        raise ModelError(f"{run_dir} was trained on split {out.get('split')}, not {split.protocol}")
    r = TwoTowerRetriever.load(run_dir)
    t0 = time.perf_counter()
    out["test"] = evaluate(r.score, split.test, split.train_valid, ks=(5, 10, 20))
    out["test"]["eval_seconds"] = time.perf_counter() - t0
    out["test_read_separately"] = True
    res_path.write_text(json.dumps(out, indent=2, default=float))
    return out


def hide_item_content(ds: Any) -> Any:
    """A copy of a loaded dataset whose catalogue holds ids only (no title, brand,
    category, price): what a shop without product text looks like (``--no-text``)."""
    import dataclasses

    items = ds.items.select("item_id", "external_id")
    return dataclasses.replace(ds, items=items, extra={**ds.extra, "content_hidden": True})


def train_and_evaluate(
    ds: Any,
    split: Split,
    config: RunConfig | str | Path | None,
    out_dir: Path,
    overrides: dict[str, Any] | None = None,
    resume: bool = True,
    test: bool = True,
    t_start: float | None = None,
) -> dict[str, Any]:
    """Fit on ``split.train`` (early stopping on validation), compare with the
    ``[fallback]`` baselines on validation (the winner is recorded as ``served`` and saved
    when it is a baseline, see :mod:`training.fallback`), then evaluate on test.

    Writes ``results.json`` in ``out_dir``; returns the same dict.
    """
    t0 = t_start if t_start is not None else time.perf_counter()
    r = TwoTowerRetriever.for_dataset(ds, config, out_dir, overrides)
    # tower and baselines are compared on the same validation users and training events
    vsplit = r.validation_split(split)
    r.fit(vsplit.train, vsplit.valid, resume=resume, t_start=t0)
    from training.distributed import is_main_process

    if not is_main_process():  # rank 0 evaluates and writes results.json
        return {}
    out: dict[str, Any] = {
        "dataset": ds.name,
        "split": split.protocol,
        "validation": vsplit.protocol.get(
            "valid_sample", {"users": len(split.valid), "of": len(split.valid), "fraction": 1.0}
        ),
        "config_hash": r.manifest.get("config_hash"),
        "chosen_stage": r.manifest.get("chosen_stage"),
        "valid": r.manifest["stages"][r.manifest["chosen_stage"]]["best_metrics"],
        "stages": {
            k: {
                kk: v[kk]
                for kk in (
                    "best_ndcg",
                    "best_epoch",
                    "epochs_run",
                    "seconds",
                    "seconds_to_best",
                    "trainable_params",
                )
            }
            for k, v in r.manifest["stages"].items()
        },
        # seconds from process start (raw files) to the chosen checkpoint
        "seconds_to_best": r.manifest["stages"][r.manifest["chosen_stage"]]["seconds_to_best"],
        "train_seconds_total": r.manifest.get("total_seconds"),
        "wall_seconds": time.perf_counter() - t0,
    }
    served = None
    if r.cfg.fallback.enabled and vsplit.valid is not None and len(vsplit.valid):
        import gc

        from training.memory import release_free_memory

        gc.collect()  # the trainer's batches and optimiser state, before the N x N fits
        release_free_memory()
        t1 = time.perf_counter()
        record, served = compare_and_select(
            r.cfg.fallback,
            vsplit,
            out["valid"],
            r.item_ids,
            out_dir,
            str(r.manifest.get("model_version", out_dir.name)),
        )
        record["seconds"] = time.perf_counter() - t1
        r.manifest["comparison"] = record
        r.manifest[SERVED_KEY] = record["served"]
        (out_dir / MANIFEST_FILE).write_text(json.dumps(r.manifest, indent=2, default=float))
        out["comparison"] = {
            k: {"valid_ndcg@10": c["valid"]["ndcg@10"], "params": c["params"]}
            if "valid" in c
            else c
            for k, c in record["candidates"].items()
        }
        out["fallback_seconds"] = record["seconds"]
    out["served"] = r.manifest.get(SERVED_KEY, {"kind": "two-tower", "path": MODEL_FILE})
    if test:
        out["test"] = evaluate(r.score, split.test, split.train_valid, ks=(5, 10, 20))
        if served is not None:  # the served baseline (refit on train+valid)
            out["test_served"] = evaluate(
                factor_scorer(served), split.test, split.train_valid, ks=(5, 10, 20)
            )
    out["peak_rss_mb"] = peak_rss_mb()
    (out_dir / "results.json").write_text(json.dumps(out, indent=2, default=float))
    return out
