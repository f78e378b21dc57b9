"""``ecomrec train``: train the two-tower model on a dataset split and report validation/test metrics."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    from ecomrec.config import add_config_args
    from intake.loaders.registry import DATASET_HELP

    p = sub.add_parser(
        "train",
        help="train the two-tower model, compare it with ALS/EASE on validation, serve the winner",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", required=True, help=DATASET_HELP)
    p.add_argument(
        "--out", required=True, help="run directory (checkpoints, manifest, TensorBoard)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run in --out that was trained on other data (else: refused)",
    )
    p.add_argument(
        "--data-dir", default=None, help="bundled datasets folder (default: $ECOMREC_DATA_DIR)"
    )
    p.add_argument(
        "--split",
        default="auto",
        help="auto (temporal for transaction and event logs with times of day, leave-one-out "
        "for day-granular review sequences; docs/towers.md) | loo-file | loo-shuffle | "
        "temporal (last 30 days of the log are the test window) | temporal:YYYY-MM-DD",
    )
    p.add_argument(
        "--family",
        choices=["auto", "sequence", "basket"],
        default="auto",
        help="the tower: sequence transformer, or the basket tower (auto: basket on "
        "transaction logs)",
    )
    p.add_argument(
        "--json", action="store_true", help="print the results as JSON instead of a table"
    )
    add_config_args(
        p,
        tables="a run config (RunConfig: [user], [item], [pretrain], [contrastive], ...)",
        example="user.dropout=0.3",
        kind="towers",
        config_help="run config: a TOML file (RunConfig: [user], [item], [pretrain], ...) or "
        "the name of a built-in one (default, gpu_minilm, quick); default: default",
    )
    p.add_argument(
        "--no-text",
        action="store_true",
        help="hide product content (title, brand, category, price): an id-only model, as for "
        "a catalogue without an items file",
    )
    p.add_argument(
        "--no-resume",
        action="store_true",
        help="ignore last.pt and start over (a run of the same data only)",
    )
    p.add_argument(
        "--no-test",
        action="store_true",
        help="skip the test evaluation (compare candidate configs on validation first)",
    )
    p.add_argument(
        "--test-only",
        action="store_true",
        help="no training: read the test of the finished run in --out (same --dataset, "
        "--split, --no-text), once the config was chosen on validation; adds `test` to "
        "its results.json",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="train with DistributedDataParallel on this many local processes (torchrun; "
        "gloo on CPU, nccl with one GPU each); give each --set threads=1 on CPU (default: 1)",
    )
    p.set_defaults(func=_run)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["user.dropout=0.3", "seed=1"]`` -> nested dict with TOML-parsed values
    (:func:`ecomrec.config.parse_sets`)."""
    from ecomrec.config import parse_sets

    return parse_sets(items)


def make_split(ds: Any, spec: str) -> Any:
    """A split of a loaded dataset from a CLI spec (:func:`training.protocol.make_split`,
    the same function benchmarks/quality.py calls)."""
    from training.protocol import make_split as protocol_split

    return protocol_split(ds, spec)


def resolve_config(name_or_path: str) -> Path:
    """A TOML path, or the name of a config shipped with the package (``quick``)."""
    from ecomrec.config import resolve_config as resolve

    return resolve(name_or_path, "towers")


RUN_FILES = ("model.pt", "last.pt", "manifest.json", "results.json", "fingerprint.json")


def prepare_run_dir(out: Path, ds: Any, *, overwrite: bool) -> None:
    """Record ``ds``'s fingerprint in ``out``; refuse a run dir holding a run of other data.

    Same data: kept (training resumes from ``last.pt``). Other or unknown data: a
    :class:`MismatchError` unless ``overwrite``, which empties the run directory first.
    A non-empty folder that is not a run directory is never emptied.
    """
    import shutil

    from ecomrec.errors import MismatchError
    from towers.inference import FINGERPRINT_FILE, read_run_fingerprint

    fp = ds.fingerprint()
    if out.exists() and not out.is_dir():
        raise MismatchError(f"--out {out} is a file, not a run directory")
    if out.is_dir() and any(out.iterdir()):
        is_run = any((out / f).exists() for f in RUN_FILES)
        old = read_run_fingerprint(out) if is_run else None
        if old is None or old.get("id") != fp["id"]:
            if not is_run:
                raise MismatchError(
                    f"--out {out} is a non-empty folder that is not a run directory; "
                    "choose an empty or new folder"
                )
            if not overwrite:
                was = (
                    f"dataset {old.get('name')!r} (fingerprint {old.get('id')})"
                    if old
                    else "unknown data (no fingerprint.json)"
                )
                raise MismatchError(
                    f"--out {out} holds a run trained on {was}, not on dataset {ds.name!r} "
                    f"(fingerprint {fp['id']}): choose another --out, or pass --overwrite "
                    "to replace that run"
                )
            log.warning("--overwrite: removing the run in %s", out)
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{FINGERPRINT_FILE}.tmp"  # a reader never sees half a fingerprint
    tmp.write_text(json.dumps({"dataset": fp}, indent=2, default=str))
    tmp.replace(out / FINGERPRINT_FILE)


def _prepare_run_dir_once(out: Path, ds: Any, *, overwrite: bool) -> None:
    """:func:`prepare_run_dir` on rank 0 only, the other ranks waiting for it.

    Every rank preparing the folder raced: one rank rewrote ``fingerprint.json`` while another
    read it half-written and refused the run (seen in CI on a resumed 2-process run)."""
    from training.distributed import barrier, is_main_process

    if is_main_process():
        prepare_run_dir(out, ds, overwrite=overwrite)
    barrier()


def _run(args: argparse.Namespace) -> int:
    from ecomrec.config import read_config
    from intake.loaders import load_dataset
    from training.distributed import DistEnv, init_process_group, relaunch
    from training.trainer import RunConfig, default_config_path
    from training.two_tower import train_and_evaluate

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    env = DistEnv.from_env()
    if args.nproc > 1 and env is None:
        return relaunch(args.nproc, _argv_without_nproc(args))
    overrides = parse_overrides(args.set)
    config = resolve_config(args.config) if args.config else default_config_path()
    read_config(config, args.set).build(RunConfig)  # a bad config fails now, before the data
    if env is not None:
        init_process_group(env, str(overrides.get("device", "auto")))
    t0 = time.perf_counter()
    ds = load_dataset(args.dataset, args.data_dir)
    if not args.test_only:
        _prepare_run_dir_once(Path(args.out), ds, overwrite=args.overwrite)
    if args.no_text:
        from training.two_tower import hide_item_content

        ds = hide_item_content(ds)
    split = make_split(ds, args.split)
    if args.test_only:
        from training.two_tower import test_finished_run

        print(json.dumps(test_finished_run(Path(args.out), split), indent=2, default=float))
        return 0
    if env is None:
        return _select_and_serve(args, ds, split, config, overrides, t0)
    # DistributedDataParallel (--nproc N): the sequence tower and its ALS/EASE comparison
    out = train_and_evaluate(
        ds,
        split,
        config,
        Path(args.out),
        overrides=overrides,
        resume=not args.no_resume,
        test=not args.no_test,
        t_start=t0,
    )
    if env.rank == 0:
        print(json.dumps(out, indent=2, default=float))
    import torch.distributed as dist

    dist.destroy_process_group()
    return 0


def _select_and_serve(
    args: argparse.Namespace, ds: Any, split: Any, config: Path, overrides: dict, t0: float
) -> int:
    """:func:`training.protocol.select_model` (what benchmarks/quality.py runs), then the
    winner saved for serving; ``results.json`` and a table (or JSON with ``--json``)."""
    from training.protocol import save_served, select_model, selection_text
    from training.trainer import peak_rss_mb

    out_dir = Path(args.out)
    sel = select_model(
        ds,
        split,
        family=args.family,
        config=config,
        overrides=overrides,
        run_dir=out_dir,
        test=not args.no_test,
        resume=not args.no_resume,
    )
    served = save_served(sel, ds, out_dir)
    tower = sel.results.get("sequence-tower") or sel.results.get("basket-tower")
    res: dict[str, Any] = {
        "dataset": ds.name,
        "split": split.protocol,
        "family": sel.family,
        "served": served,
        "candidates": {row.pop("model"): row for row in sel.table()},
        "skipped": sel.skipped,
        "valid": sel.results[sel.served].valid,
        "wall_seconds": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
    }
    if tower is not None:
        res["tower_valid"] = tower.valid
    if not args.no_test:
        res["test"] = sel.results[sel.served].test  # the served model's test
    (out_dir / "results.json").write_text(json.dumps(res, indent=2, default=float))
    print(json.dumps(res, indent=2, default=float) if args.json else selection_text(sel, served))
    return 0


def _argv_without_nproc(args: argparse.Namespace) -> list[str]:
    """The ``train`` arguments again, for the processes torchrun starts."""
    argv = ["train", "--dataset", args.dataset, "--out", args.out, "--split", args.split]
    argv += ["--family", args.family] + ["--json"] * args.json
    if args.config:
        argv += ["--config", args.config]
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    for s in args.set:
        argv += ["--set", s]
    argv += ["--no-resume"] * args.no_resume + ["--no-test"] * args.no_test
    return argv


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m training.cli train ...``."""
    parser = argparse.ArgumentParser(prog="ecomrec")
    sub = parser.add_subparsers(required=True)
    register(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
