"""Resolve a dataset name or path to a loader."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from towers.dataset import Dataset
from towers.errors import DataError

ENV_VAR = "ECOMREC_DATA_DIR"

# name -> (relative path inside the data directory, kind)
DATASETS: dict[str, tuple[str, str]] = {
    "beauty": ("amazon_s3rec/Beauty", "s3rec"),
    "online-retail": ("online_retail/online_retail_raw.parquet", "online_retail"),
    "cdnow": ("cdnow/CDNOW_master.txt", "cdnow"),
    "cdnow-sample": ("cdnow/CDNOW_sample.txt", "cdnow"),
    "synthetic": ("", "synthetic"),
}


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """``data_dir`` if given, else ``$ECOMREC_DATA_DIR``; an error says how to set it."""
    d = data_dir or os.environ.get(ENV_VAR)
    if not d:
        raise DataError(
            f"no data directory: pass --data-dir or set {ENV_VAR} (e.g. ../shared/data)"
        )
    p = Path(d).expanduser()
    if not p.is_dir():
        raise DataError(f"data directory {p} does not exist")
    return p


def load_dataset(name_or_path: str | Path, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by name (see :data:`DATASETS`) or by path.

    Paths: an S3-Rec prefix (``.../Sports`` with ``Sports.txt`` beside it), a saved
    Dataset directory, an Online Retail parquet, a CDNOW text file.
    """
    key = str(name_or_path)
    if key == "synthetic":
        from towers.synthetic import make_shop

        return make_shop()
    loaders: dict[str, Callable[[Path, str], Dataset]] = {}
    from towers.loaders.cdnow import load_cdnow
    from towers.loaders.online_retail import load_online_retail
    from towers.loaders.s3rec import load_s3rec

    loaders = {
        "s3rec": lambda p, n: load_s3rec(p, n),
        "online_retail": lambda p, n: load_online_retail(p, n),
        "cdnow": lambda p, n: load_cdnow(p, n),
    }
    if key in DATASETS:
        rel, kind = DATASETS[key]
        return loaders[kind](resolve_data_dir(data_dir) / rel, key)
    p = Path(key).expanduser()
    if (p / "dataset.json").exists():
        return Dataset.load(p)
    s3 = p.with_name(p.name.removesuffix(".txt") + ".txt") if p.suffix in ("", ".txt") else None
    if s3 is not None and s3.exists():
        return load_s3rec(p)
    if p.suffix == ".parquet" and p.exists():
        return load_online_retail(p, p.stem)
    if p.name.startswith("CDNOW") and p.exists():
        return load_cdnow(p, p.stem.lower())
    raise DataError(
        f"unknown dataset {key!r}: not one of {sorted(DATASETS)} and not an S3-Rec prefix, "
        "saved dataset directory, Online Retail parquet or CDNOW file"
    )
