"""Resolve a ``--dataset`` value (a bundled name, a dataset folder, a shop's files) to a Dataset.

One path in: a shop's own files are read through the data contract
(:mod:`intake.loaders.contract`, docs/data.md); ``ecomrec data import`` writes a dataset
folder from them, and that folder is what every command takes. The bundled datasets
have importers producing the same :class:`~intake.dataset.Dataset`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ecomrec.errors import DataError
from intake.dataset import Dataset

ENV_VAR = "ECOMREC_DATA_DIR"

# name -> (relative path inside the data directory, kind)
DATASETS: dict[str, tuple[str, str]] = {
    "beauty": ("amazon_s3rec/Beauty", "s3rec"),
    "online-retail": ("online_retail/online_retail_raw.parquet", "online_retail"),
    "cdnow": ("cdnow/CDNOW_master.txt", "cdnow"),
    "cdnow-sample": ("cdnow/CDNOW_sample.txt", "cdnow"),
    "synthetic": ("", "synthetic"),
}
DATASET_HELP = (
    "a dataset folder written by `ecomrec data import` / `data synth` (the usual case), a "
    "shop's events file in the data contract (.csv/.parquet, docs/data.md), or a bundled "
    "name: " + ", ".join(DATASETS)
)


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


def _contract_files(folder: Path) -> tuple[Path, Path | None] | None:
    """(events, catalogue) of a folder holding ``events.*`` (+ ``catalogue.*``/``items.*``)."""
    for ext in ("csv", "parquet", "tsv"):
        ev = folder / f"events.{ext}"
        if ev.exists() or (ext == "parquet" and (folder / "events").is_dir()):
            ev = ev if ev.exists() else folder / "events"
            for stem in ("catalogue", "catalog", "items", "products"):
                for e2 in ("csv", "parquet", "tsv"):
                    if (folder / f"{stem}.{e2}").exists():
                        return ev, folder / f"{stem}.{e2}"
            return ev, None
    return None


def load_dataset(name_or_path: str | Path, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by bundled name (:data:`DATASETS`) or by path.

    Paths: a saved dataset folder (``dataset.json``); a folder with ``events.csv|parquet``
    (+ ``catalogue.*``) in the data contract; a contract events file; an S3-Rec prefix
    (``.../Sports`` with ``Sports.txt`` beside it); a CDNOW text file; a file with the
    UCI Online Retail columns. Anything else is an error saying what is accepted.
    """
    key = str(name_or_path)
    if key == "synthetic":
        from intake.synthetic import make_shop

        return make_shop()
    from intake.loaders.cdnow import load_cdnow
    from intake.loaders.online_retail import COLUMNS as OR_COLUMNS
    from intake.loaders.online_retail import load_online_retail
    from intake.loaders.s3rec import load_s3rec

    if key in DATASETS:
        rel, kind = DATASETS[key]
        path = resolve_data_dir(data_dir) / rel
        if kind == "s3rec":
            return load_s3rec(path, key)
        if kind == "online_retail":
            return load_online_retail(path, key)
        return load_cdnow(path, key)
    p = Path(key).expanduser()
    if p.is_dir() and (p / "dataset.json").exists():
        return Dataset.load(p)
    from intake.loaders.contract import ContractOptions, load_contract, read_source

    if p.is_dir():
        files = _contract_files(p)
        if files is not None:
            return load_contract(files[0], files[1], ContractOptions(name=p.name))
    s3 = p.with_name(p.name.removesuffix(".txt") + ".txt") if p.suffix in ("", ".txt") else None
    if s3 is not None and s3.exists() and not p.is_dir():
        return load_s3rec(p)
    if p.name.startswith("CDNOW") and p.is_file():
        return load_cdnow(p, p.stem.lower())
    if p.suffix.lower() in (".csv", ".tsv", ".parquet") and p.exists():
        cols = read_source(p).frame.columns
        if set(OR_COLUMNS) <= set(cols):
            return load_online_retail(p, p.stem)
        return load_contract(p, None, ContractOptions(name=p.stem))
    if not p.exists() and ("/" in key or p.suffix):
        raise DataError(f"unknown dataset {key!r}: no such file or folder")
    raise DataError(
        f"unknown dataset {key!r}: give {DATASET_HELP}. A shop's own files: "
        "`ecomrec data import --events FILE --items FILE --out DATASET` (docs/data.md)"
    )
