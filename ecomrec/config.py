"""Frozen config dataclasses: built from TOML or dicts, unknown keys are an error.

Every command loads its config the same way (:func:`read_config` / :func:`load_config`,
:func:`add_config_args` for the ``--config`` / ``--set`` options):

1. the TOML file of ``--config`` (a path, or the name of a config shipped in
   ``ecomrec/configs/<kind>/``, e.g. ``--config quick``);
2. ``--set SECTION.KEY=VALUE`` overrides (TOML literals; the same paths as in the file);
3. the command's own flags (``--port``, ``--index``, ...), documented as overrides.

Later steps win.  The merged table is built into a frozen dataclass with
:func:`from_dict` (unknown keys are an error); errors name the file and the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ecomrec.errors import ConfigError

T = TypeVar("T")


def _coerce(name: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a table, got {type(value).__name__}")
        return from_dict(tp, value, prefix=name + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(name, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: {value!r} matches none of {args}")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{name}: {value!r} is not one of {typing.get_args(tp)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}: expected a list, got {type(value).__name__}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(f"{name}[{i}]", inner, v) for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the frozen dataclass ``cls`` from ``data``; unknown keys raise ConfigError."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + u for u in unknown)} for {cls.__name__}; "
            f"known: {', '.join(sorted(fields))}"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {k: _coerce(prefix + k, hints[k], v) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (tuples become lists), JSON/TOML safe."""
    d = dataclasses.asdict(cfg)

    def fix(v: Any) -> Any:
        if isinstance(v, tuple | list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    return typing.cast(dict[str, Any], fix(d))


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, with errors that name the file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file {p} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {p}: {e}") from e
    except OSError as e:  # a folder, unreadable
        raise ConfigError(f"config file {p}: {e.strerror or e}") from e


def config_hash(*cfgs: Any) -> str:
    """Stable short hash of one or more configs (for manifests and exports)."""
    blob = json.dumps([to_dict(c) for c in cfgs], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


#: The tables of the one deployment file (deploy/config/serve.toml) that ``serve``,
#: ``index`` and ``refresh`` all read: each command takes its own and refuses a table
#: outside this set (a misspelt table name is an error, not a silent default).
DEPLOY_TABLES = ("serve", "index", "refresh", "drift", "dashboard")


# ----------------------------------------------------------------------- built-in configs
#: The configs shipped inside the package (package data: they are in the wheel).
BUILTIN_DIR = Path(__file__).resolve().parent / "configs"


def builtin_config(kind: str, name: str) -> Path:
    """Path of the shipped config ``ecomrec/configs/<kind>/<name>.toml`` (e.g. ``towers``,
    ``quick``); a name that is not shipped raises ConfigError listing those that are."""
    p = BUILTIN_DIR / kind / f"{name.removesuffix('.toml')}.toml"
    if not p.is_file():
        raise ConfigError(f"no built-in {kind} config {name!r}; built-in: {builtin_names(kind)}")
    return p


def builtin_names(kind: str) -> list[str]:
    """Names of the shipped configs of one kind (``towers`` -> default, gpu_minilm, quick)."""
    return sorted(p.stem for p in (BUILTIN_DIR / kind).glob("*.toml"))


def resolve_config(name_or_path: str | Path, kind: str | None = None) -> Path:
    """``--config`` value -> a TOML file: an existing path, else (for a bare name such as
    ``quick``) the shipped config of ``kind``; anything else raises ConfigError."""
    p = Path(name_or_path)
    if p.exists():
        return p
    text = str(name_or_path)
    if kind is not None and "/" not in text and "\\" not in text:
        names = builtin_names(kind)
        if text.removesuffix(".toml") in names:
            return builtin_config(kind, text)
        raise ConfigError(f"--config {text}: no such file, and not one of the built-in {names}")
    hint = f" (built-in {kind} configs by name: {', '.join(builtin_names(kind))})" if kind else ""
    raise ConfigError(f"config file {text} does not exist{hint}")


# ------------------------------------------------------------------ file + --set + flags
def parse_sets(items: Iterable[str]) -> dict[str, Any]:
    """``["user.dropout=0.3", "seed=1"]`` -> ``{"user": {"dropout": 0.3}, "seed": 1}``.

    Values are TOML literals (``3``, ``0.5``, ``true``, ``"x"``, ``[1, 2]``); anything
    that does not parse as one is taken as a string (``--set serve.host=0.0.0.0``)."""
    out: dict[str, Any] = {}
    for it in items:
        key, eq, val = it.partition("=")
        parts = [p.strip() for p in key.strip().split(".")]
        if not eq or not all(parts):
            raise ConfigError(f"--set wants SECTION.KEY=VALUE, got {it!r}")
        try:
            v = tomllib.loads(f"v = {val}")["v"]
        except tomllib.TOMLDecodeError:
            v = val
        d = out
        for p in parts[:-1]:
            nxt = d.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {it}: {p} is a value, not a table")
            d = nxt
        d[parts[-1]] = v
    return out


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` merged in: tables merge key by key, other values replace;
    ``None`` in ``over`` means "not given" and keeps the base value."""
    out = dict(base)
    for k, v in over.items():
        if v is None:
            continue
        if isinstance(v, Mapping):
            base_v = out.get(k)
            out[k] = merge(base_v if isinstance(base_v, Mapping) else {}, v)
        else:
            out[k] = v
    return out


@dataclasses.dataclass(frozen=True)
class ConfigSource:
    """A config file read once with its ``--set`` overrides merged in; :meth:`build` makes
    the config dataclass of one of its tables (errors name the file and the key)."""

    data: dict[str, Any]
    path: Path | None = None
    sets: tuple[str, ...] = ()

    @property
    def where(self) -> str:
        """Where the values came from, for error messages."""
        parts = [f"config file {self.path}"] if self.path is not None else []
        if self.sets:
            parts.append("--set " + " ".join(self.sets))
        return " + ".join(parts) or "defaults"

    def table(self, name: str | None) -> dict[str, Any]:
        """The table ``name`` (the whole file for None); missing -> empty."""
        if name is None:
            return dict(self.data)
        t = self.data.get(name, {})
        if not isinstance(t, dict):
            raise ConfigError(f"{self.where}: {name} must be a table, got {t!r}")
        return dict(t)

    def check_tables(self, allowed: Iterable[str]) -> None:
        """Refuse top-level keys outside ``allowed`` (a typo'd table name)."""
        unknown = sorted(set(self.data) - set(allowed))
        if unknown:
            raise ConfigError(
                f"{self.where}: unknown table(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(allowed))}"
            )

    def build(
        self,
        cls: type[T],
        table: str | None = None,
        overrides: Mapping[str, Any] | None = None,
        *,
        data: Mapping[str, Any] | None = None,
    ) -> T:
        """``cls`` from the table ``table`` (or ``data`` already taken from it), with the
        flags' ``overrides`` merged last (None = not given)."""
        raw = self.table(table) if data is None else dict(data)
        raw = merge(raw, overrides or {})
        try:
            return from_dict(cls, raw, prefix=f"{table}." if table else "")
        except ConfigError as e:
            raise ConfigError(f"{self.where}: {e}") from e


def read_config(
    path: str | Path | None, sets: Sequence[str] = (), *, kind: str | None = None
) -> ConfigSource:
    """The ``--config`` file (a path, or a built-in name of ``kind``) with ``--set`` merged."""
    p = resolve_config(path, kind) if path is not None else None
    data = load_toml(p) if p is not None else {}
    return ConfigSource(merge(data, parse_sets(sets)), p, tuple(sets))


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    sets: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
    *,
    table: str | None = None,
    kind: str | None = None,
) -> T:
    """One config dataclass: file (table ``table``) < ``--set`` < flag ``overrides``."""
    return read_config(path, sets, kind=kind).build(cls, table, overrides)


def add_config_args(
    p: argparse.ArgumentParser,
    *,
    tables: str,
    example: str,
    kind: str | None = None,
    flags: str = "",
    config_help: str | None = None,
) -> None:
    """Add ``--config`` and ``--set`` to a command (see the module docstring).

    ``tables`` says what the file holds (e.g. "[serve] and [index] tables"), ``example``
    one ``--set`` value, ``kind`` the built-in configs ``--config NAME`` may name,
    ``flags`` the command's options that override config values (named in the help)."""
    builtin = f"; or a built-in name: {', '.join(builtin_names(kind))}" if kind else ""
    p.add_argument(
        "--config",
        default=None,
        metavar="TOML",
        help=config_help or f"TOML file with {tables}{builtin}",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help=f"override one value of --config (a TOML literal; repeatable), e.g. --set "
        f"{example}" + (f"; {flags} win over --set" if flags else ""),
    )
