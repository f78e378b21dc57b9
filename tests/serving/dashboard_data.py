"""Planted inputs of the dashboard tests: a report, segment snapshots, warnings."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import polars as pl

METRIC_NAMES = ("ctr", "add_to_cart_rate", "conversion", "revenue_per_1000")


def planted_report() -> dict[str, Any]:
    """An online report in the interface's shape, with distinct numbers everywhere."""

    def iv(v: float, w: float) -> dict[str, float]:
        return {"value": v, "lo": v - w, "hi": v + w}

    variants = []
    for i, name in enumerate(("control", "candidate")):
        imp, clicks, carts, buys, rev = (
            12_345 + i * 111,
            321 + 57 * i,
            44 + i,
            13 + 2 * i,
            1234.5 + i,
        )
        variants.append(
            {
                "variant": name,
                "model_version": f"run-{i}",
                "recommendations": 2_000 + i,
                "impressions": imp,
                "clicks": clicks,
                "carts": carts,
                "purchases": buys,
                "revenue": rev,
                "metrics": {
                    "ctr": iv(clicks / imp, 0.0031),
                    "add_to_cart_rate": iv(carts / imp, 0.0007),
                    "conversion": iv(buys / imp, 0.0004),
                    "revenue_per_1000": iv(1000 * rev / (2_000 + i), 12.25),
                },
            }
        )
    return {
        "since": "2026-12-01T00:00:00+00:00",
        "until": "2026-12-07T00:00:00+00:00",
        "generated_at": "2026-12-07T09:00:00+00:00",
        "attribution": {"window_s": 86400, "rule": "planted"},
        "variants": variants,
        "differences": [
            {
                "variant": "candidate",
                "baseline": "control",
                "metric": m,
                "value": 0.0021 * (k + 1),
                "lo": -0.001 + 0.002 * k,
                "hi": 0.004 * (k + 1),
            }
            for k, m in enumerate(METRIC_NAMES)
        ],
        "daily": [
            {
                "day": f"2026-12-0{d}",
                "variant": v,
                "impressions": 100 * d,
                "clicks": 3 * d,
                "carts": d,
                "purchases": 1,
                "revenue": 10.0 * d,
            }
            for d in (1, 2, 3)
            for v in ("control", "candidate")
        ],
    }


def write_warnings(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def warning(customer: str, day: int, risk: float, text: str) -> dict[str, Any]:
    return {
        "customer_id": customer,
        "ts": f"2026-12-0{day}T10:00:00+00:00",
        "risk": risk,
        "threshold": 0.7,
        "reasons": [{"kind": "recency", "text": text}],
        "segment": "At Risk",
        "previous_segment": "Loyal",
    }


#: Planted movement: customer -> (previous RFM segment, current RFM segment).
MOVES = {
    "c1": ("Loyal", "Loyal"),
    "c2": ("Loyal", "At Risk"),
    "c3": ("Loyal", "At Risk"),
    "c4": ("Champions", "Loyal"),
    "c5": ("Champions", "Champions"),
    "c6": ("At Risk", "Hibernating"),
}
GONE = {"c7": "Loyal"}  # only in the previous snapshot
NEW = {"c8": "New"}  # only in the current one


def write_snapshots(root: Path) -> tuple[Path, Path]:
    """Two `segments export`-like folders (customers.parquet with customer_id)."""
    prev, cur = root / "prev", root / "cur"
    for folder, idx, extra in ((prev, 0, GONE), (cur, 1, NEW)):
        folder.mkdir(parents=True)
        rows = {c: seg[idx] for c, seg in MOVES.items()} | extra
        pl.DataFrame(
            {
                "customer_id": list(rows),
                "rfm_segment": list(rows.values()),
                "segment_name": ["B0" if c in ("c1", "c2") else "B1" for c in rows],
                "churn_probability": [0.5] * len(rows),
            }
        ).write_parquet(folder / "customers.parquet")
    return cur, prev


# --------------------------------------------------------------------------- reading pages
def variant_cells(html: str, table: str = "variants") -> dict[str, dict[str, tuple[str, str]]]:
    """variant -> field -> (data-value, shown text) of an overview variants table."""
    out: dict[str, dict[str, tuple[str, str]]] = {}
    body = html.split(f'<table id="{table}">', 1)[1].split("</table>", 1)[0]
    for name, row in re.findall(r'<tr data-variant="([^"]+)"[^>]*>(.*?)</tr>', body, re.S):
        cells = re.findall(
            r'data-field="(\w+)" data-value="([^"]+)"[^>]*>\s*(?:<span class="value">)?([^<]+)',
            row,
        )
        out[name] = {f: (v, text.strip()) for f, v, text in cells}
    return out


def parse_shown(text: str) -> float:
    """A number as a page shows it: '1,234.50', '2.60 %', '+0.21 pp'."""
    return float(text.replace(",", "").replace("%", "").replace("pp", "").strip())
