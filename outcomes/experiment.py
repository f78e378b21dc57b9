"""A/B experiments: variants, traffic shares and the stable assignment of customers.

An experiment file (TOML or JSON, named by ``[serve] experiment`` or written by
``ecomrec refresh`` with ``promote = "online"`` as ``STATE/experiment.json``)::

    name = "retail-2026-12"          # part of the assignment hash: a new name reshuffles
    [[variants]]
    name = "control"                 # no run: the engine the service already serves
    share = 0.5
    [[variants]]
    name = "candidate"
    run = "runs/retail-v2"           # training run (model) of this variant
    dataset = "runs/retail-v2/dataset"   # optional: histories + catalogue (default: the service's)
    index = "artifacts/index"        # optional: index location (default: the service's)
    index_alias = "items"            # optional (default: the service's alias)
    index_version = "v000012"        # optional: pinned version (default: the alias' target)
    share = 0.5

Rules (checked by :func:`parse_experiment`, errors name the file and the field):
``name`` non-empty; 1..16 variants; variant names unique, non-empty, made of
``[A-Za-z0-9_.-]``; shares in [0, 1] summing to 1 (within 1e-6); a given ``run`` must be
a directory; at most one variant without a ``run``.

Assignment (:func:`bucket`, :meth:`Experiment.assign`): the first 8 bytes of
``sha256(experiment name + "\\x1f" + customer id)`` as a number in [0, 1); variants own
consecutive ranges of that interval in file order (control first). The same customer gets
the same variant in every process, replica and restart (no process state, never Python's
``hash``). Moving shares moves only the customers whose bucket crosses a boundary; a
customer without an id (anonymous, recent events only) gets the FIRST variant (the
control): anonymous traffic is not part of the test.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ecomrec.errors import ConfigError

MAX_VARIANTS = 16
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KEYS = {"name", "run", "dataset", "index", "index_alias", "index_version", "share"}


@dataclass(frozen=True)
class Variant:
    """One arm of an experiment. ``run`` empty = the engine the service already serves."""

    name: str
    share: float
    run: str = ""
    dataset: str = ""
    index: str = ""
    index_alias: str = ""
    index_version: str = ""

    @property
    def model_key(self) -> tuple[str, str, str, str, str]:
        """What its engine is built from: equal keys share one engine across reloads."""
        return (self.run, self.dataset, self.index, self.index_alias, self.index_version)


@dataclass(frozen=True)
class Experiment:
    """A named experiment: its variants in assignment order (the first is the control)."""

    name: str
    variants: tuple[Variant, ...]

    @property
    def control(self) -> Variant:
        return self.variants[0]

    def assign(self, customer_id: str) -> Variant:
        """The variant of ``customer_id`` (anonymous "" -> the control)."""
        if not customer_id:
            return self.control
        b = bucket(self.name, customer_id)
        edge = 0.0
        for v in self.variants:
            edge += v.share
            if b < edge:
                return v
        # rounding at the top end: the last variant with a share
        return next(v for v in reversed(self.variants) if v.share > 0)

    def shares(self) -> dict[str, float]:
        return {v.name: v.share for v in self.variants}

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "variants": [
                {k: getattr(v, k) for k in _KEYS if getattr(v, k) not in ("", None)}
                for v in self.variants
            ],
        }


def bucket(experiment: str, customer_id: str) -> float:
    """The customer's stable position in [0, 1) for this experiment (sha256)."""
    h = hashlib.sha256(f"{experiment}\x1f{customer_id}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64


def parse_experiment(data: Any, source: str = "experiment") -> Experiment:
    """Validate a decoded experiment file (see the module docstring for the rules)."""

    def bad(msg: str) -> ConfigError:
        return ConfigError(f"{source}: {msg}")

    if not isinstance(data, dict):
        raise bad("want a table with 'name' and [[variants]]")
    unknown = set(data) - {"name", "variants"}
    if unknown:
        raise bad(f"unknown key(s) {sorted(unknown)} (want name, variants)")
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise bad("name: want a non-empty string")
    raw = data.get("variants")
    if not isinstance(raw, list) or not raw:
        raise bad("variants: want a list of at least one [[variants]] table")
    if len(raw) > MAX_VARIANTS:
        raise bad(f"variants: at most {MAX_VARIANTS}, got {len(raw)}")
    out: list[Variant] = []
    for i, v in enumerate(raw):
        where = f"variants[{i}]"
        if not isinstance(v, dict):
            raise bad(f"{where}: want a table")
        extra = set(v) - _KEYS
        if extra:
            raise bad(f"{where}: unknown key(s) {sorted(extra)} (want {sorted(_KEYS)})")
        vname = v.get("name")
        if not isinstance(vname, str) or not _NAME.match(vname):
            raise bad(f"{where}.name: want 1-64 characters of A-Z a-z 0-9 _ . -, got {vname!r}")
        share = v.get("share")
        if isinstance(share, bool) or not isinstance(share, int | float):
            raise bad(f"{where}.share ({vname}): want a number in [0, 1], got {share!r}")
        share = float(share)
        if not (math.isfinite(share) and 0.0 <= share <= 1.0):
            raise bad(f"{where}.share ({vname}): want a number in [0, 1], got {share}")
        fields: dict[str, str] = {}
        for k in ("run", "dataset", "index", "index_alias", "index_version"):
            val = v.get(k, "")
            if not isinstance(val, str):
                raise bad(f"{where}.{k} ({vname}): want a string, got {val!r}")
            fields[k] = val
        if fields["run"] and not Path(fields["run"]).is_dir():
            raise bad(f"{where}.run ({vname}): {fields['run']} is not a run directory")
        if not fields["run"] and any(fields[k] for k in ("dataset", "index_version")):
            raise bad(f"{where} ({vname}): dataset/index_version need a run")
        out.append(Variant(name=vname, share=share, **fields))
    names = [v.name for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise bad(f"variants: names must be unique, repeated: {dup}")
    total = sum(v.share for v in out)
    if abs(total - 1.0) > 1e-6:
        raise bad(f"variants: shares must sum to 1, got {total:g} ({names})")
    if sum(1 for v in out if not v.run) > 1:
        raise bad("variants: at most one variant may omit run (the service's own engine)")
    return Experiment(name=name.strip(), variants=tuple(out))


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file (``.json``, else TOML); relative ``run`` /
    ``dataset`` / ``index`` paths are resolved against the file's folder."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"experiment file {p}: {e.strerror or e}") from e
    try:
        data = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(
            f"experiment file {p}: not valid {'JSON' if p.suffix == '.json' else 'TOML'}: {e}"
        ) from e
    if isinstance(data, dict) and isinstance(data.get("variants"), list):
        base = p.resolve().parent
        for v in data["variants"]:
            if isinstance(v, dict):
                for k in ("run", "dataset", "index"):
                    if isinstance(v.get(k), str) and v[k] and not Path(v[k]).is_absolute():
                        v[k] = str(base / v[k])
    return parse_experiment(data, f"experiment file {p}")


def write_experiment(path: str | Path, exp: Experiment) -> None:
    """Write ``exp`` as JSON atomically (temporary file + fsync + rename)."""
    import os

    p = Path(path)
    tmp = p.with_name(p.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(exp.to_dict(), f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
