"""Plain-text tables and value formats for the analyst commands (what a person reads).

No column types, no box drawing: a header, a rule, one line per row; numbers right-aligned
and rounded for reading (probabilities as percentages, money with two decimals and the
shop's currency when known, days with one decimal). Files (``--out``) and ``--json`` keep
the raw values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

SYMBOLS = {"GBP": "£", "EUR": "€", "USD": "$", "JPY": "¥"}


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def percent(p: Any) -> str:
    """0.1234 -> ``12.3 %``."""
    return "" if _missing(p) else f"{100 * float(p):.1f} %"


def money(x: Any, currency: str | None = None) -> str:
    """1234.5 -> ``1,234.50``, ``£1,234.50`` (GBP) or ``1,234.50 CHF`` (other codes)."""
    if _missing(x):
        return ""
    v = f"{float(x):,.2f}"
    if not currency:
        return v
    sym = SYMBOLS.get(currency.upper())
    if sym:
        return f"-{sym}{v[1:]}" if v.startswith("-") else f"{sym}{v}"
    return f"{v} {currency}"


def days(x: Any) -> str:
    """1.3409722 -> ``1.3``."""
    return "" if _missing(x) else f"{float(x):.1f}"


def number(x: Any, digits: int = 3) -> str:
    """Integers as they are (thousands separated), floats rounded to ``digits`` decimals."""
    if _missing(x):
        return ""
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def text(x: Any) -> str:
    if _missing(x):
        return ""
    if isinstance(x, list | tuple):
        return ", ".join(str(v) for v in x)
    return str(x)


@dataclass(frozen=True)
class Column:
    """One column: the row key, its header, how a value is written and its alignment."""

    key: str
    header: str
    fmt: Callable[[Any], str] = text
    align: Literal["<", ">"] = "<"
    max_width: int = 48


def render(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """The table as text (no trailing newline); cells longer than ``max_width`` end in ``...``."""
    cells = []
    for r in rows:
        line = []
        for c in columns:
            s = c.fmt(r.get(c.key)).replace("\n", " ")
            if len(s) > c.max_width:
                s = s[: c.max_width - 3] + "..."
            line.append(s)
        cells.append(line)
    widths = [
        max([len(c.header), *(len(line[j]) for line in cells)]) for j, c in enumerate(columns)
    ]

    def fmt_line(values: Sequence[str]) -> str:
        parts = [f"{v:{c.align}{w}}" for v, c, w in zip(values, columns, widths)]
        return "  ".join(parts).rstrip()

    out = [fmt_line([c.header for c in columns]), "  ".join("-" * w for w in widths)]
    out += [fmt_line(line) for line in cells]
    return "\n".join(out)


def auto_columns(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[Column]:
    """Columns for arbitrary rows: numbers right-aligned and rounded, the rest as text."""
    cols = []
    for k in keys:
        vals = [r.get(k) for r in rows if not _missing(r.get(k))]
        numeric = bool(vals) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in vals
        )
        cols.append(Column(k, k, number if numeric else text, ">" if numeric else "<"))
    return cols


def key_values(pairs: Sequence[tuple[str, str]]) -> str:
    """``label   value`` lines, labels padded to one width."""
    w = max((len(k) for k, _ in pairs), default=0)
    return "\n".join(f"{k:<{w}}  {v}".rstrip() for k, v in pairs)
